"""Attribution patching is the first-order term of exact patching: for a source that differs
from the receiver by a small perturbation, estimate and exact change agree to O(eps^2)."""

import pytest
import torch

from refusal_lab.models.hooked import ActivationCache
from refusal_lab.patching.attribution import agreement, attribution_grid, receiver_gradients
from refusal_lab.patching.engine import GRIDS, Batch, GridSpec, LogitDiff, Receiver, patch_grid, source_sites


@pytest.mark.parametrize("grid", GRIDS)
def test_attribution_is_first_order_of_exact(tiny, grid):
    g = torch.Generator().manual_seed(3)
    T = 8
    rec = Batch(torch.randint(0, tiny.cfg.d_vocab, (2, T), generator=g), torch.ones(2, T, dtype=torch.long))
    metric = LogitDiff(3, 7)
    receiver = Receiver.record(tiny, rec, metric)
    cols = [5, 7] if grid == "heads" else [3, 7]
    spec = GridSpec(grid, list(range(tiny.cfg.n_layers)), cols, list(range(tiny.cfg.n_heads)))
    sites = source_sites(tiny, spec)
    acts, grads = receiver_gradients(tiny, rec, sites, metric)
    eps = 1e-4
    source = ActivationCache({s: acts[s] + eps * torch.randn(acts[s].shape, generator=g) for s in sorted(sites)})
    exact = patch_grid(tiny, receiver, source, spec, metric, progress=False) - receiver.baseline[:, None, None]
    est = attribution_grid(tiny, rec, acts, grads, source, spec, receiver.baseline) - receiver.baseline[:, None, None]
    if grid.endswith("cumulative"):
        # AtP's cumulative estimate is the running sum of the single-layer estimates (it ignores that
        # patched later layers cut paths through earlier ones); its first row is single-layer AtP.
        single = GridSpec(grid.replace("_cumulative", ""), spec.layers, cols)
        one = attribution_grid(tiny, rec, acts, grads, source, single, receiver.baseline) - receiver.baseline[:, None, None]
        assert torch.allclose(est, one.cumsum(1), atol=1e-6)
        exact, est = exact[:, :1], est[:, :1]
    # first order: |exact - est| is O(eps^2) while the changes themselves are O(eps)
    assert exact.abs().max() > 1e-5
    assert (exact - est).abs().max() < 0.05 * exact.abs().max() + 1e-6


def test_agreement_of_identical_grids_is_perfect():
    x = torch.randn(4, 5)
    a = agreement(x, x.clone(), k=3)
    assert a["spearman"] == pytest.approx(1.0) and a["top_k_overlap"] == 1.0
    b = agreement(x, -x, k=3)
    assert b["spearman"] == pytest.approx(-1.0)
