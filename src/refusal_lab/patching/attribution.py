"""Attribution patching: the first-order (gradient × activation difference) estimate of every
cell of a patching grid, from one forward and one backward pass on the receiving prompts.

For a cell that writes the source activation a_S into site s (receiver value a_R), the estimate is

    Δmetric ≈ (a_S - a_R) · ∂metric/∂a  evaluated on the receiving run,

summed over the patched columns (and over d_head for a head's ``hook_z``). Cumulative grids add
the estimates of layers 0..l. This is AtP (Nanda 2023; Kramár et al. 2024). Agreement with the
exact grid is reported as Spearman's ρ over cells and the overlap of the top-k cells.
"""

from __future__ import annotations

import torch
from scipy.stats import spearmanr

from refusal_lab.models.hooked import ActivationCache, HookedChatModel
from refusal_lab.patching.engine import GRID_SITES, Batch, GridSpec, NormedMetric


def receiver_gradients(
    model: HookedChatModel, receiver: Batch, sites: set[str], metric: NormedMetric
) -> tuple[ActivationCache, ActivationCache]:
    """(activations, gradients of sum(metric) w.r.t. them) at ``sites`` on the receiving run."""
    acts: dict[str, torch.Tensor] = {}

    def start_graph(x, hook):
        return x.detach().requires_grad_(True)

    def keep(x, hook):
        x.retain_grad()
        acts[hook.name] = x
        return None

    hooks = [("hook_embed", start_graph)] + [(s, keep) for s in sorted(sites)]
    with torch.enable_grad():
        _, resid = model._run_full(receiver.ids, receiver.mask, model._make_run(hooks, None), logits="none")
        normed = model.adapter.final_norm(resid[:, -1].to(model.adapter.final_norm.weight.device))
        idx = torch.arange(receiver.n, device=normed.device)
        metric(model, normed, idx).sum().backward()
    values = ActivationCache({k: v.detach() for k, v in acts.items()})
    grads = ActivationCache({k: v.grad.detach() for k, v in acts.items()})
    return values, grads


def attribution_grid(
    model: HookedChatModel,
    receiver: Batch,
    receiver_acts: ActivationCache,
    grads: ActivationCache,
    source: ActivationCache,
    spec: GridSpec,
    baseline: torch.Tensor,
) -> torch.Tensor:
    """Estimated metric per prompt and cell [n, rows, cols] (baseline + estimated change)."""
    site = GRID_SITES[spec.grid]
    L = model.cfg.n_layers
    layers = range(L) if spec.grid.endswith("cumulative") else spec.layers
    per_layer = {}
    for l in layers:
        name = f"blocks.{l}.{site}"
        diff = (source[name].to(grads[name].device) - receiver_acts[name]).float() * grads[name].float()
        if spec.grid == "heads":
            per_layer[l] = diff[:, spec.cols].sum(dim=(1, 3))[:, spec.heads].cpu()  # [n, heads]
        else:  # (on the CPU: with a device_map each layer's estimate is on its layer's device)
            per_layer[l] = diff[:, spec.cols].sum(-1).cpu()  # [n, cols]
    if spec.grid.endswith("cumulative"):
        running, cum = 0, {}
        for l in range(L):
            running = running + per_layer[l]
            cum[l] = running
        per_layer = cum
    est = torch.stack([per_layer[l] for l in spec.layers], 1).cpu()
    return baseline.cpu()[:, None, None].float() + est


def agreement(exact: torch.Tensor, approx: torch.Tensor, k: int = 10) -> dict:
    """Spearman ρ over cells and the overlap of the top-k cells (by value) of two grids."""
    e, a = exact.flatten().numpy(), approx.flatten().numpy()
    k = min(k, e.size)
    rho = float(spearmanr(e, a).statistic) if e.size > 1 else float("nan")
    top_e = set(e.argsort()[::-1][:k].tolist())
    top_a = set(a.argsort()[::-1][:k].tolist())
    return {"spearman": rho, "top_k": k, "top_k_overlap": len(top_e & top_a) / k}
