"""Out of memory inside the cone engine: the batch is halved and retried, results are unchanged,
one warning is given, and a clear error when even one row does not fit."""

import warnings

import pytest
import torch

from refusal_lab.errors import RefusalLabError
from refusal_lab.patching import engine
from refusal_lab.patching.engine import GridSpec, patch_grid
from tests.conftest import patch_setup
from tests.numeric import assert_tensors_close


def _limit(monkeypatch, k, exc=None):
    real = engine._run_group
    sizes = []

    def limited(model, receiver, rows, *args, **kwargs):
        sizes.append(len(rows))
        if len(rows) > k:
            raise exc or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, receiver, rows, *args, **kwargs)

    monkeypatch.setattr(engine, "_run_group", limited)
    return sizes


@pytest.mark.parametrize("grid", ["resid_pre", "attn_out_cumulative", "heads"])
@pytest.mark.parametrize("oom", ["torch", "runtime"])
def test_oom_halves_batch_and_gives_same_values(tiny, monkeypatch, grid, oom):
    receiver, source, metric = patch_setup(tiny)
    spec = GridSpec(grid, list(range(tiny.cfg.n_layers)), [4, 6] if grid == "heads" else [4, 5, 8],
                    list(range(tiny.cfg.n_heads)))
    # batch composition changes float rounding: compare with an unwrapped run in the batches it ends up using
    ref = patch_grid(tiny, receiver, source, spec, metric, max_rows=2, progress=False)
    big = patch_grid(tiny, receiver, source, spec, metric, max_rows=8, progress=False)
    exc = None if oom == "torch" else RuntimeError("CUDA error: out of memory")
    sizes = _limit(monkeypatch, 2, exc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = patch_grid(tiny, receiver, source, spec, metric, max_rows=8, progress=False)
    assert_tensors_close(got, ref)  # halved batches: to fp32 rounding
    assert torch.allclose(got, big, atol=1e-5)
    assert any(s > 2 for s in sizes)  # it really ran out of memory
    msgs = [str(w.message) for w in caught if "out of memory" in str(w.message)]
    first = 3 if grid == "attn_out_cumulative" else 8  # the trunks come in groups of 3 (one per prompt)
    assert msgs[0] == f"out of memory with {first} rows per batch; continuing with 2", msgs
    # one warning per pass over the rows (the cumulative grid makes two: trunks, then branches)
    assert len(msgs) == (2 if grid == "attn_out_cumulative" else 1), msgs


def test_other_errors_are_not_swallowed(tiny, monkeypatch):
    receiver, source, metric = patch_setup(tiny)
    _limit(monkeypatch, 3, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        patch_grid(tiny, receiver, source, GridSpec("resid_pre", [0, 1], [4, 5]), metric, max_rows=8, progress=False)


def test_oom_with_one_row_is_a_clear_error(tiny, monkeypatch):
    receiver, source, metric = patch_setup(tiny)
    _limit(monkeypatch, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RefusalLabError, match="single patched row"):
            patch_grid(tiny, receiver, source, GridSpec("resid_pre", [0, 1], [4, 5]), metric, max_rows=8,
                       progress=False)
