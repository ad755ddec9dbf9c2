"""The run is its step list: a new step is one module (compute + publish) and one line in
``step_list`` — shown here with a step defined in the test, as the README's "How to add a step"
describes it: its record is stored, read back on the next run (not recomputed), and published."""

from __future__ import annotations

import pytest

from refusal_lab.models.loading import load_model
from refusal_lab.run import pipeline
from refusal_lab.run.config import RunConfig
from refusal_lab.run.folder import public
from refusal_lab.run.step import RunContext, Step
from tests.helpers_tiny_chat import make_tiny_chat_model

CFG = dict(grids=["resid_pre"], attribution=False, steering=False, generate_tokens=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_chat_model(tmp_path_factory.mktemp("model"))
    return folder, load_model(str(folder), device="cpu")


def test_step_list_follows_the_config():
    names = [s.name for s in pipeline.step_list(RunConfig(**CFG))]
    assert names == ["baseline", "sanity", "dla", "patch_resid_pre_sufficiency"]
    full = [s.name for s in pipeline.step_list(RunConfig(grids=["resid_pre", "heads"], directions=["sufficiency", "necessity"]))]
    assert full == ["baseline", "sanity", "dla", "patch_resid_pre_sufficiency", "patch_heads_sufficiency",
                    "patch_resid_pre_necessity", "patch_heads_necessity", "attribution", "heads", "direction",
                    "steering", "evaluation", "geometry"]


def test_a_new_step_is_one_function_and_one_line(tiny, tmp_path, monkeypatch):
    folder, model = tiny
    calls = []

    def compute(ctx: RunContext) -> dict:  # reads an earlier record and the inputs
        calls.append(1)
        gap = ctx.records["sanity"]["gap"]["mean"]
        return {"gap_twice": 2 * gap, "n_pairs": ctx.inputs.n_pairs}

    def publish(ctx: RunContext) -> dict:
        return {"my_step": public(ctx.records["my_step"])}

    original = pipeline.step_list
    monkeypatch.setattr(pipeline, "step_list", lambda cfg: [*original(cfg), Step("my_step", compute, publish)])
    cfg = RunConfig(model=str(folder), **CFG)
    first = pipeline.Pipeline(model, cfg, tmp_path / "run", progress=False).run()
    assert (tmp_path / "run" / "steps" / "my_step.json").is_file()
    assert first["my_step"] == {"gap_twice": 2 * first["sanity"]["gap"]["mean"], "n_pairs": 7}
    assert "my_step" in first["timings"]
    again = pipeline.Pipeline(model, cfg, tmp_path / "run", progress=False).run()
    assert calls == [1] and again["my_step"] == first["my_step"]  # read back, not recomputed


def test_resid_post_reuses_resid_pre_rows(tiny, tmp_path):
    """resid_post at layer l is resid_pre at layer l + 1: after the resid_pre step, the resid_post
    step computes only its last layer and takes the rest from resid_pre; the grid equals the whole
    resid_post grid computed by the engine on its own (to fp32 rounding of other batch shapes)."""
    import torch

    from refusal_lab.patching.engine import patch_grid

    folder, model = tiny
    cfg = RunConfig(model=str(folder), **(CFG | {"grids": ["resid_pre", "resid_post"]}))
    pipe = pipeline.Pipeline(model, cfg, tmp_path / "run", progress=False)
    pipe.run()
    ctx, L = pipe.ctx, model.cfg.n_layers
    rec = ctx.records["patch_resid_post_sufficiency"]
    assert rec["reused"] == {"from": "patch_resid_pre_sufficiency", "layers": list(range(L - 1))}
    inputs = ctx.inputs
    whole = patch_grid(model, inputs.receiver("harmless"), inputs.source_cache("harmful"), inputs.grid_spec("resid_post"),
                       inputs.metric, progress=False)
    got = torch.as_tensor(rec["per_pair"])
    assert got.shape == whole.shape
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
    alone = pipeline.Pipeline(model, RunConfig(model=str(folder), **(CFG | {"grids": ["resid_post"]})),
                              tmp_path / "alone", progress=False)
    alone.run()
    rec = alone.ctx.records["patch_resid_post_sufficiency"]
    assert "reused" not in rec
    torch.testing.assert_close(torch.as_tensor(rec["per_pair"]), whole, rtol=1e-5, atol=1e-5)
