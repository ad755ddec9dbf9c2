"""The cone engine equals the naive one-forward-per-cell loop (TransformerLens's `patching` way)
on every architecture and every grid, with left padding and sliding windows exercised."""

import pytest
import torch

from refusal_lab.patching.engine import GRIDS, GridSpec, LogitDiff, Receiver, patch_grid
from refusal_lab.patching.naive import naive_patch
from tests.conftest import log_odds_metric, patch_pair

TOL = 1e-4  # fp32; observed differences are ~1e-6


@pytest.mark.parametrize("grid", GRIDS)
def test_cone_equals_naive(tiny, grid):
    src, rec = patch_pair(tiny)
    metric = LogitDiff(3, 7)
    receiver = Receiver.record(tiny, rec, metric)
    _, source = tiny.run_with_cache(src.ids, src.mask)
    cols = [4, 6] if grid == "heads" else [4, 5, 8]
    spec = GridSpec(grid, list(range(tiny.cfg.n_layers)), cols, list(range(tiny.cfg.n_heads)))
    fast = patch_grid(tiny, receiver, source, spec, metric, progress=False, max_rows=5)
    ref = naive_patch(tiny, rec, source, spec, metric)
    assert fast.shape == ref.shape == (3, tiny.cfg.n_layers, spec.shape[1])
    assert torch.allclose(fast, ref, atol=TOL), float((fast - ref).abs().max())
    assert ref.std() > 1e-3  # the patches do something: the comparison is not vacuous


def test_patching_everything_gives_source_metric(tiny):
    """resid_pre patched at layer 0 at every column from the object on = the source run."""
    src, rec = patch_pair(tiny)
    metric = LogitDiff(3, 7)
    receiver = Receiver.record(tiny, rec, metric)
    source_rec = Receiver.record(tiny, src, metric)
    _, source = tiny.run_with_cache(src.ids, src.mask)
    spec = GridSpec("resid_pre", [0], [4])
    got = patch_grid(tiny, receiver, source, spec, metric, progress=False)[:, 0, 0]
    assert torch.allclose(got, source_rec.baseline.cpu(), atol=TOL)
    # patching a column with its own value leaves the receiver baseline
    _, own = tiny.run_with_cache(rec.ids, rec.mask)
    same = patch_grid(tiny, receiver, own, GridSpec("mlp_out", [1], [5, 8]), metric, progress=False)
    assert torch.allclose(same, receiver.baseline.cpu()[:, None, None].expand_as(same), atol=TOL)


def test_log_odds_metric_cone_equals_naive(tiny):
    src, rec = patch_pair(tiny)
    metric = log_odds_metric([3, 5, 11])
    receiver = Receiver.record(tiny, rec, metric)
    _, source = tiny.run_with_cache(src.ids, src.mask)
    spec = GridSpec("attn_out", [0, 2], [4, 8])
    fast = patch_grid(tiny, receiver, source, spec, metric, progress=False)
    ref = naive_patch(tiny, rec, source, spec, metric)
    assert torch.allclose(fast, ref, atol=TOL)
