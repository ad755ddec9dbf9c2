"""A patching grid interrupted mid-way resumes from its checkpoint to the uninterrupted values."""

import pytest
import torch

from refusal_lab.artifacts import load_tensors
from refusal_lab.patching import engine
from refusal_lab.patching.engine import GridSpec, LogitDiff, patch_grid
from tests.conftest import patch_setup
from tests.numeric import assert_tensors_close


def _count(monkeypatch, fail_on: int | None = None):
    real = engine._run_group
    calls = []

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        if fail_on is not None and len(calls) == fail_on:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_run_group", counted)
    return calls


@pytest.mark.parametrize("grid", ["resid_pre", "mlp_out", "heads"])
def test_interrupted_grid_resumes_to_identical_values(tiny, monkeypatch, tmp_path, grid):
    receiver, source, metric = patch_setup(tiny)
    spec = GridSpec(grid, list(range(tiny.cfg.n_layers)), [4, 6] if grid == "heads" else [4, 5, 8],
                    list(range(tiny.cfg.n_heads)))
    ckpt = tmp_path / "partial" / "grid.safetensors"
    with monkeypatch.context() as m:
        full_calls = _count(m)
        ref = patch_grid(tiny, receiver, source, spec, metric, max_rows=4, progress=False)
    with monkeypatch.context() as m:
        _count(m, fail_on=2)
        with pytest.raises(KeyboardInterrupt):
            patch_grid(tiny, receiver, source, spec, metric, max_rows=4, progress=False, checkpoint=ckpt)
    saved = load_tensors(ckpt)
    assert int(saved["done"].sum()) == 4  # the first batch was saved
    with monkeypatch.context() as m:
        calls = _count(m)
        got = patch_grid(tiny, receiver, source, spec, metric, max_rows=4, progress=False, checkpoint=ckpt)
    assert_tensors_close(got, ref)  # resumed vs uninterrupted: to fp32 rounding
    assert len(calls) == len(full_calls) - 1 and sum(calls) == sum(full_calls) - 4
    assert bool(load_tensors(ckpt)["done"].all())


def test_checkpoint_of_another_grid_is_ignored(tiny, monkeypatch, tmp_path):
    receiver, source, metric = patch_setup(tiny)
    ckpt = tmp_path / "grid.safetensors"
    spec = GridSpec("resid_pre", [0, 1], [4, 5])
    ref = patch_grid(tiny, receiver, source, spec, metric, max_rows=4, progress=False)
    patch_grid(tiny, receiver, source, GridSpec("resid_pre", [0, 2], [4, 5]), metric, max_rows=4, progress=False,
               checkpoint=ckpt)
    calls = _count(monkeypatch)
    got = patch_grid(tiny, receiver, source, spec, metric, max_rows=4, progress=False, checkpoint=ckpt)
    assert_tensors_close(got, ref)
    assert sum(calls) == 12  # every row recomputed
    other = LogitDiff(7, 3)  # another metric: also recomputed
    calls.clear()
    patch_grid(tiny, receiver, source, spec, other, max_rows=4, progress=False, checkpoint=ckpt)
    assert sum(calls) == 12
