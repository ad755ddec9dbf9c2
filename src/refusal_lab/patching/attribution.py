"""Attribution patching: the first-order (gradient × activation difference) estimate of every
cell of a patching grid, from one forward and one backward pass on the receiving prompts.

For a cell that writes the source activation a_S into site s (receiver value a_R), the estimate is

    Δmetric ≈ (a_S - a_R) · ∂metric/∂a  evaluated on the receiving run,

summed over the patched columns (and over d_head for a head's ``hook_z``). Cumulative grids add
the estimates of layers 0..l. This is AtP (Nanda 2023; Kramár et al. 2024). Agreement with the
exact grid is reported as Spearman's ρ over cells and the overlap of the top-k cells.

For the head grid, :func:`receiver_gradients_qk` + ``attribution_grid(..., attention=...)`` give
AtP*: AtP with the QK fix of :mod:`refusal_lab.patching.qk_fix` (each head's direct effect on
later layers' attention logits stays linear, their softmax is computed exactly). Without
``attention`` every grid, heads included, is plain AtP.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr

from refusal_lab.models.forward import default_position_ids
from refusal_lab.models.hooked import ActivationCache, HookedChatModel, gradient_hooks
from refusal_lab.patching.engine import GRID_SITES, Batch, GridSpec, NormedMetric
from refusal_lab.patching.qk_fix import AttentionRecord, qk_fix_correction, recording


def receiver_gradients(
    model: HookedChatModel, receiver: Batch, sites: set[str], metric: NormedMetric
) -> tuple[ActivationCache, ActivationCache]:
    """(activations, gradients of sum(metric) w.r.t. them) at ``sites`` on the receiving run."""
    acts, grads, _ = _receiver_pass(model, receiver, sites, metric, attention=False)
    return acts, grads


@dataclass
class AttentionGradients:
    """What AtP*'s QK fix needs from the receiving run: every layer's q, k, mask and ∂metric/∂pattern,
    the residual entering every block and the position ids."""

    records: dict[int, AttentionRecord]
    resid_pre: dict[int, torch.Tensor]
    position_ids: torch.Tensor


def receiver_gradients_qk(
    model: HookedChatModel, receiver: Batch, sites: set[str], metric: NormedMetric
) -> tuple[ActivationCache, ActivationCache, AttentionGradients]:
    """:func:`receiver_gradients` plus the attention record of every layer (one forward and one
    backward pass, with an eager attention that keeps the pattern in the graph)."""
    return _receiver_pass(model, receiver, sites, metric, attention=True)


def _receiver_pass(model, receiver, sites, metric, attention: bool):
    resid: dict[int, torch.Tensor] = {}

    def keep_resid(x, hook):
        resid[hook.layer] = x.detach()
        return None

    hooks, acts = gradient_hooks(sorted(sites))
    if attention:
        hooks += [(f"blocks.{l}.hook_resid_pre", keep_resid) for l in range(model.cfg.n_layers)]
    ctx = recording(model) if attention else contextlib.nullcontext()
    with torch.enable_grad(), ctx as rec:
        out = model.prefill(receiver.ids, receiver.mask, fwd_hooks=hooks, logits="none").resid
        normed = model.adapter.final_norm(out[:, -1].to(model.adapter.final_norm.weight.device))
        idx = torch.arange(receiver.n, device=normed.device)
        metric(model, normed, idx).sum().backward()
    values = ActivationCache({k: v.detach() for k, v in acts.items()})
    grads = ActivationCache({k: v.grad.detach() for k, v in acts.items()})
    if not attention:
        return values, grads, None
    for l, r in rec.records.items():
        g = rec.probs[l].grad
        r.grad_probs = torch.zeros_like(rec.probs[l]) if g is None else g.detach()
    return values, grads, AttentionGradients(rec.records, resid, default_position_ids(receiver.mask))


def attribution_grid(
    model: HookedChatModel,
    receiver: Batch,
    receiver_acts: ActivationCache,
    grads: ActivationCache,
    source: ActivationCache,
    spec: GridSpec,
    baseline: torch.Tensor,
    attention: AttentionGradients | None = None,
) -> torch.Tensor:
    """Estimated metric per prompt and cell [n, rows, cols] (baseline + estimated change).

    With ``attention`` (from :func:`receiver_gradients_qk`) the head grid is AtP* (AtP plus the QK
    fix of :mod:`refusal_lab.patching.qk_fix`); other grids are plain AtP either way."""
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
    if attention is not None and spec.grid == "heads":
        est = est + qk_correction(model, receiver_acts, source, attention, spec).to(est.dtype)
    return baseline.cpu()[:, None, None].float() + est


def qk_correction(
    model: HookedChatModel, receiver_acts: ActivationCache, source: ActivationCache,
    attention: AttentionGradients, spec: GridSpec,
) -> torch.Tensor:
    """AtP* − AtP on the head grid [n, layers, heads]: Σ over later layers of the QK-fixed minus the
    linearised contribution through their attention patterns."""
    return qk_fix_correction(model, receiver_acts, source, attention.records, attention.resid_pre,
                             attention.position_ids, spec.layers, spec.heads, spec.cols)[2]


NOISE_FLOOR = 1e-5
"""Cells within ``NOISE_FLOOR × max |value|`` of each other tie in :func:`agreement` (and cells that
close to zero are zero): a patch that cannot change anything (the same activation in source and
receiver) gives 0 up to fp32 rounding, and two cells that differ only by what the patch cannot
change (a cumulative grid's consecutive layers where the added component writes ~nothing) are equal
up to rounding; that rounding (~1e-7, set by batch shape and CPU) must not decide ranks."""


def _tie_rounding(x: np.ndarray) -> np.ndarray:
    """``x`` (float64) with each run of sorted values whose consecutive gaps are at most
    ``NOISE_FLOOR × max |x|`` replaced by the run's smallest value; values that close to zero by 0."""
    x = x.astype(np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return x
    tol = NOISE_FLOOR * float(np.abs(x[finite]).max())
    x = np.where(np.abs(x) <= tol, 0.0, x)
    idx = np.flatnonzero(finite)
    order = idx[np.argsort(x[idx], kind="stable")]
    out = x.copy()
    for prev, cur in zip(order[:-1], order[1:]):
        if x[cur] - x[prev] <= tol:
            out[cur] = out[prev]
    return out


def agreement(exact: torch.Tensor, approx: torch.Tensor, k: int = 10) -> dict:
    """Spearman ρ over cells and the overlap of the top-k cells (by value) of two grids. Cells equal
    to fp32 rounding (:data:`NOISE_FLOOR`) tie; ties in the top-k go to the earlier cell."""
    e = _tie_rounding(exact.flatten().double().numpy())
    a = _tie_rounding(approx.flatten().double().numpy())
    k = min(k, e.size)
    rho = float(spearmanr(e, a).statistic) if e.size > 1 else float("nan")
    top_e = set(np.argsort(-e, kind="stable")[:k].tolist())
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    return {"spearman": rho, "top_k": k, "top_k_overlap": len(top_e & top_a) / k}
