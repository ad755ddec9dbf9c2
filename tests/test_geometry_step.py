"""The run's ``geometry`` step on tiny Qwen2 and Gemma 2 chat models: its section validates, its
numbers equal hand computations from the run's own saved vectors and ``run_with_cache``, its
r̂ ablation equals the direction step's bypass, a second run reads the record back, and the report
and figures render it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from refusal_lab.models.loading import load_model
from refusal_lab.prompts import build_instruction_prompts
from refusal_lab.run import pipeline
from refusal_lab.run.config import RunConfig
from refusal_lab.run.results import read_results
from refusal_lab.steering import geometry as geo
from refusal_lab.steering.batching import instruction_sample
from refusal_lab.steering.interventions import unit
from refusal_lab.steering.vectors import load_vector
from tests.helpers_tiny_chat import SMALL_STEERING, make_tiny_chat_model

CFG = dict(grids=["resid_pre", "heads"], attribution=False, generate_tokens=0, threshold=-1.0, **SMALL_STEERING)
"""Every head selected (threshold -1), so heads -> direction always runs."""


@pytest.fixture(scope="module", params=("qwen2", "gemma2"))
def run(request, tmp_path_factory):
    folder = make_tiny_chat_model(tmp_path_factory.mktemp("model"), request.param)
    model = load_model(str(folder), device="cpu")
    cfg = RunConfig(model=str(folder), **CFG)
    out = tmp_path_factory.mktemp("run")
    pipeline.Pipeline(model, cfg, out, progress=False).run()
    return model, cfg, out, json.loads((out / "results.json").read_text())


def test_the_section_validates_and_renders(run):
    _, _, out, r = run
    g = read_results(out)["geometry"]
    L = r["model"]["n_layers"]
    assert len(g["separation"]["gap"]) == L and len(g["cosines"]["candidates"]) == L
    assert g["separation"]["split"] == "test" and g["separation"]["n_harmful"] == SMALL_STEERING["steering_n_test"]
    assert [x["k"] for x in g["subspace"]["rows"]] == [1, 2, 3, 4, 5]
    assert g["heads"] is not None and len(g["heads"]["heads"]) == len(r["heads"]["selected"])
    assert g["cosines"]["vectors"] == ["direction", "objects_difference", "objects_heads", "principal_1"]
    assert len(g["findings"]) == 7 and all("n = " in g["findings"][i] for i in (0, 2, 3, 4, 5))
    # every head is selected (threshold -1), the last layer's too: nothing lies downstream of the set
    assert g["heads"]["downstream"]["n_sites"] == 0 and "not measured" in g["findings"][6]
    assert "reads" in g["heads"] and "paths" in g["heads"] and "downstream" in g["heads"]
    assert "_per_prompt" not in g["heads"]["reads"] and "_per_pair" not in g["heads"]["paths"]
    assert "_projections" not in g["separation"] and "_per_pair" not in g["heads"]
    assert "geometry" in r["timings"]
    for stem in ("separation", "cosines", "vectors", "subspace", "heads", "head_reads", "head_paths"):
        assert (out / "figures" / f"geometry_{stem}.png").stat().st_size > 0
    for name in ("separation", "subspace", "heads", "head_writes", "head_reads", "head_paths"):
        assert (out / "tables" / f"geometry_{name}.csv").is_file()
    html = (out / "report.html").read_text()
    assert 'id="geometry"' in html and "Is one dimension enough?" in html and g["findings"][0][:30] in html
    assert 'id="geometry-head-reads"' in html
    assert (out / "vectors" / "geometry_basis.safetensors").is_file()


def test_separation_equals_a_hand_projection_of_the_test_prompts(run):
    model, cfg, out, r = run
    g, d = r["geometry"], r["direction"]
    rhat = unit(load_vector(out / "vectors" / "direction.safetensors")[0])
    test = instruction_sample("test", cfg.steering_n_test, cfg.seed)
    for side in ("harmful", "harmless"):
        ids, mask = build_instruction_prompts(model.tokenizer, test[side])
        _, cache = model.run_with_cache(ids, mask, names=lambda n: n.endswith("hook_resid_pre"), logits="none")
        for l in range(model.cfg.n_layers):
            p = cache[f"blocks.{l}.hook_resid_pre"][:, d["position"]].to(torch.float64) @ rhat
            assert math.isclose(g["separation"][f"{side}_mean"][l], float(p.mean()), rel_tol=1e-6, abs_tol=1e-6)
            assert math.isclose(g["separation"][f"{side}_sd"][l], float(p.std()), rel_tol=1e-5, abs_tol=1e-6)
        # what the curve read: the evaluation step's unedited prefills of the same prompts, every layer
        kept = load_vector(out / "vectors" / f"evaluation_test_resid_{side}.safetensors")[0]
        assert kept.shape == (len(test[side]), model.cfg.n_layers, model.cfg.d_model)
        want = torch.stack([cache[f"blocks.{l}.hook_resid_pre"][:, d["position"]] for l in range(model.cfg.n_layers)], 1)
        torch.testing.assert_close(kept, want, rtol=1e-5, atol=1e-5)
        proj = kept.to(torch.float64) @ rhat.to(torch.float64)  # [n, L]
        for l in range(model.cfg.n_layers):
            assert math.isclose(g["separation"][f"{side}_mean"][l], float(proj[:, l].mean()), rel_tol=1e-12, abs_tol=1e-12)


def test_ablating_rhat_reproduces_the_direction_steps_bypass(run):
    """The subspace check's unedited and r̂-ablated rows are the direction step's per-prompt scores
    (reused, not rerun): equal to whole forwards of the harmful val prompts, mean and SE."""
    model, cfg, out, r = run
    sub, d = r["geometry"]["subspace"], r["direction"]
    assert math.isclose(sub["direction"]["mean"], d["bypass"], rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(sub["baseline"]["mean"], d["baseline"]["harmful_val_log_odds"], rel_tol=1e-5, abs_tol=1e-6)
    assert sub["direction"]["n"] == d["n_val"]["harmful"]
    from refusal_lab.metrics import default_refusal_token_ids, refusal_log_odds
    from refusal_lab.steering.interventions import ablation_hooks

    val = instruction_sample("val", cfg.steering_n_val, cfg.seed)
    ids, mask = build_instruction_prompts(model.tokenizer, val["harmful"])
    rv = load_vector(out / "vectors" / "direction.safetensors")[0]
    ref = default_refusal_token_ids(model.tokenizer)
    for key, hooks in (("baseline", []), ("direction", ablation_hooks(model, rv))):
        x = refusal_log_odds(model(ids, mask, fwd_hooks=hooks, logits="last"), ref).to(torch.float64)
        assert math.isclose(sub[key]["mean"], float(x.mean()), rel_tol=1e-5, abs_tol=1e-5), key
        assert math.isclose(sub[key]["se"], float(x.std() / len(x) ** 0.5), rel_tol=1e-4, abs_tol=1e-5), key


def test_the_basis_from_the_direction_steps_train_rows_equals_one_from_whole_forwards(run):
    """The principal directions come from the train residuals the direction step kept at its site:
    equal (up to sign) to those of whole forwards of the train prompts, and their mean difference
    is the saved direction."""
    model, cfg, out, r = run
    d = r["direction"]
    train = instruction_sample("train", cfg.steering_n_train, cfg.seed)
    acts = {}
    for side in ("harmful", "harmless"):
        ids, mask = build_instruction_prompts(model.tokenizer, train[side])
        acts[side] = geo.column_activations(model, ids, mask, [d["site"]], d["position"], 4)[:, 0]
        kept = load_vector(out / "vectors" / f"direction_train_{side}.safetensors")[0]
        torch.testing.assert_close(kept, acts[side], rtol=1e-5, atol=1e-5)
    rv = load_vector(out / "vectors" / "direction.safetensors")[0].to(torch.float64)
    torch.testing.assert_close(acts["harmful"].mean(0) - acts["harmless"].mean(0), rv, rtol=1e-5, atol=1e-5)
    want, e = geo.difference_basis(acts["harmful"], acts["harmless"], 6)
    got = load_vector(out / "vectors" / "geometry_basis.safetensors")[0].to(torch.float64)
    sub = r["geometry"]["subspace"]
    for k in range(got.shape[0]):  # (directions of well-separated eigenvalues only: the others may rotate)
        gap = min(abs(e[k] - e[j]) for j in (k - 1, k + 1) if 0 <= j < len(e))
        if gap > 1e-3 * e[0]:
            assert math.isclose(abs(float(got[k] @ want[k])), 1.0, abs_tol=1e-3), k
    assert sub["explained"] == pytest.approx(e[:got.shape[0]].tolist(), rel=1e-4, abs=1e-6)


def test_cosines_equal_the_saved_vectors(run):
    _, _, out, r = run
    c, d = r["geometry"]["cosines"], r["direction"]
    cands = load_vector(out / "vectors" / "direction_candidates.safetensors")[0].to(torch.float64)
    col = cands[:, d["positions"].index(d["position"])]
    for i in range(col.shape[0]):
        for j in range(col.shape[0]):
            ni, nj = float(col[i].norm()), float(col[j].norm())
            if ni == 0 or nj == 0:
                assert c["candidates"][i][j] is None
            else:
                assert math.isclose(c["candidates"][i][j], float(col[i] @ col[j]) / (ni * nj), abs_tol=1e-9)
    vec = {n: load_vector(out / "vectors" / f"{n}.safetensors")[0].to(torch.float64)
           for n in ("direction", "objects_difference", "objects_heads")}
    vec["principal_1"] = load_vector(out / "vectors" / "geometry_basis.safetensors")[0][0]
    for i, a in enumerate(c["vectors"]):
        for j, b in enumerate(c["vectors"]):
            ref = float(vec[a] @ vec[b]) / float(vec[a].norm() * vec[b].norm())
            assert math.isclose(c["vector_matrix"][i][j], ref, abs_tol=1e-9), (a, b)


def test_a_second_run_reads_the_record_back(run, monkeypatch):
    model, cfg, out, r = run

    def boom(*a, **k):
        raise AssertionError("the geometry step was recomputed")

    monkeypatch.setattr(geo, "separation_curve", boom)
    monkeypatch.setattr(geo, "heads_to_direction", boom)
    pipeline.Pipeline(model, cfg, out, progress=False).run()
    again = json.loads((out / "results.json").read_text())
    assert again["geometry"] == r["geometry"]


def test_the_heads_reads_and_paths_agree_with_the_heads_step_and_the_cache(run):
    """The downstream ablation's unablated sufficiency is the heads step's; the reads are the cached
    pattern of the run's object prompts; the path split's total at the heads' columns is the same patch."""
    model, cfg, _, r = run
    h, g = r["heads"], r["geometry"]["heads"]
    d, p, rd = g["downstream"], g["paths"], g["reads"]
    assert math.isclose(d["sufficiency"], h["sufficiency"], rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(p["heads"]["total"]["mean"], d["effect"]["mean"], abs_tol=1e-6)
    assert p["heads"]["cols"] == h["cols"] == rd["heads_cols"] and d["n_pairs"] == h["n_pairs"] == rd["n_pairs"]
    assert d["after_layer"] == max(x["layer"] for x in h["selected"])
    from refusal_lab.run.inputs import RunInputs

    inputs = RunInputs(model, cfg)
    assert rd["keys"] == inputs.cols and rd["key_roles"][0] == "obj" and rd["query_roles"][-1] == "last"
    b = inputs.batches
    names = [f"blocks.{x['layer']}.attn.hook_pattern" for x in rd["heads"]]
    caches = {s: model.run_with_cache(b[s].ids, b[s].mask, names=names)[1] for s in ("harmful", "harmless")}
    for row in rd["rows"]:
        for i, x in enumerate(rd["heads"]):
            att = {s: c[f"blocks.{x['layer']}.attn.hook_pattern"][:, x["head"], row["index"]][:, rd["keys"]]
                   .to(torch.float64) for s, c in caches.items()}
            assert torch.allclose(torch.tensor(row["difference"][i], dtype=torch.float64),
                                  (att["harmful"] - att["harmless"]).mean(0), atol=1e-6)


def test_without_the_evaluation_steps_residuals_the_step_runs_the_test_prompts(run, tmp_path):
    """A run folder whose evaluation step kept no test residuals (an older run, or a deleted file):
    the geometry step runs the test prompts itself and finds the same separation (to 1e-6)."""
    import shutil

    model, cfg, out, r = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for side in ("harmful", "harmless"):
        (copy / "vectors" / f"evaluation_test_resid_{side}.safetensors").unlink()
    (copy / "steps" / "geometry.json").unlink()
    pipeline.Pipeline(model, cfg, copy, progress=False).run()
    again = json.loads((copy / "results.json").read_text())["geometry"]["separation"]
    for key in ("harmful_mean", "harmless_mean", "harmful_sd", "harmless_sd"):
        for a, b in zip(again[key], r["geometry"]["separation"][key]):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6), key
