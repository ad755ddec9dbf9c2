"""The cone engine equals the naive one-forward-per-cell loop (TransformerLens's `patching` way)
on every architecture and every grid, with left padding and sliding windows exercised; a head set
patched by the cone engine, in a full forward and in generation is one patch."""

import pytest
import torch

from refusal_lab.models.edits import Patch, Replace
from refusal_lab.models.sites import HookPoint
from refusal_lab.patching.engine import GRIDS, Edit, GridSpec, LogitDiff, Receiver, Row, patch_grid, run_rows
from refusal_lab.patching.heads import head_patch_hooks, patch_heads
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


# ------------------------------------------------------------------------------ head sets
def _heads_case(tiny):
    src, rec = patch_pair(tiny)
    metric = LogitDiff(3, 7)
    receiver = Receiver.record(tiny, rec, metric)
    _, source = tiny.run_with_cache(src.ids, src.mask)
    L, H = tiny.cfg.n_layers, tiny.cfg.n_heads
    heads = [(L - 1, H - 1), (0, 1), (1, 0)]  # unsorted, several layers
    return rec, receiver, source, metric, heads, [4, 6]


def test_patch_heads_is_the_rows_the_run_built(tiny):
    """patch_heads gives exactly what the run's heads step computed with hand-built rows."""
    rec, receiver, source, metric, heads, cols = _heads_case(tiny)
    rows = [Row(i, min(l for l, _ in heads), min(cols),
                [Edit(l, "attn.hook_z", c, source[f"blocks.{l}.attn.hook_z"][i, c, h], h) for l, h in heads for c in cols])
            for i in range(rec.n)]
    want = run_rows(tiny, receiver, rows, metric, 2)
    got = patch_heads(tiny, receiver, source, heads, cols, metric, max_rows=2)
    assert torch.equal(got, want)
    assert (got - receiver.baseline.cpu()).abs().max() > 1e-3  # the patch does something


def test_head_patch_hooks_are_the_same_patch_in_a_full_forward(tiny):
    """The generate hooks in a plain forward equal the cone value, and the old Replace hooks bit for bit."""
    rec, receiver, source, metric, heads, cols = _heads_case(tiny)
    hooks = head_patch_hooks(source, heads, cols)
    assert len(hooks) == len({l for l, _ in heads})  # one Patch per layer
    logits = tiny(rec.ids, rec.mask, fwd_hooks=hooks, logits="last")
    cone = patch_heads(tiny, receiver, source, heads, cols, metric)
    assert torch.allclose(metric.from_logits(logits, None).cpu(), cone, atol=TOL)
    old = [(f"blocks.{l}.attn.hook_z", Replace(positions=cols, head=h, value=source[f"blocks.{l}.attn.hook_z"][:, cols, h]))
           for l, h in heads]
    assert torch.equal(tiny(rec.ids, rec.mask, fwd_hooks=old, logits="last"), logits)
    new = tiny.generate(rec.ids, rec.mask, max_new_tokens=5, fwd_hooks=hooks, stop_at_eos=False)
    assert torch.equal(new, tiny.generate(rec.ids, rec.mask, max_new_tokens=5, fwd_hooks=old, stop_at_eos=False))


def test_patch_skips_columns_outside_the_call(tiny):
    """A Patch of prompt columns leaves a call at other columns alone and writes exactly its entries."""
    act = torch.randn(2, 3, 4)
    p = Patch(torch.tensor([0, 1, 1]), torch.tensor([5, 6, 9]), torch.ones(3, 4))
    out = p(act, HookPoint("blocks.0.hook_resid_pre", 0, torch.arange(5, 8)))  # columns 5..7: entry 3 is not here
    want = act.clone()
    want[0, 0], want[1, 1] = 1.0, 1.0
    assert torch.equal(out, want) and not torch.equal(act, want)  # a copy; the input untouched
    assert p(act, HookPoint("blocks.0.hook_resid_pre", 0, torch.tensor([12]))) is act
