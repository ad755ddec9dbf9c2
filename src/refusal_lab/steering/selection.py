"""Selecting the refusal direction among difference-in-means candidates (Arditi et al. 2024, §C).

Candidates ``r[l, p]`` are the diff-in-means of ``blocks.{l}.hook_resid_pre`` at every layer ``l``
and every end-of-instruction column ``p``. Each candidate is scored on held-out prompts:

* ``bypass``: mean refusal log-odds (last column) of the harmful val prompts under directional
  ablation of ``r̂`` (:func:`ablation_hooks`) — lower is better;
* ``induce``: mean refusal log-odds of the harmless val prompts with ``alpha * r`` added at
  ``blocks.{l}.hook_resid_pre`` at every column;
* ``kl``: mean KL(baseline || ablated) of the harmless val prompts' last-column distribution.

A candidate is kept when ``kl < kl_max``, ``induce > 0`` and ``l < max_layer_frac * n_layers``; the
kept candidate with the lowest ``bypass`` is chosen. :attr:`SelectionResult.filters` records the
filters actually applied (they differ from the configured ones after a fallback, see
:func:`choose_candidate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from refusal_lab.errors import RefusalLabError
from refusal_lab.metrics import default_refusal_token_ids, refusal_log_odds
from refusal_lab.steering.interventions import ablation_hooks, addition_hooks
from refusal_lab.steering.sweep import progress_bar
from refusal_lab.steering.vectors import diff_in_means_all_layers

__all__ = ["STAGES", "SelectionResult", "applied_filters", "choose_candidate", "select_direction"]

STAGES = ("configured", "induce_relaxed", "layer_only")
"""Which filters chose the candidate: the configured ones (``kl < kl_max``, ``induce > 0``, layer
limit); ``induce > 0`` relaxed to ``induce >`` the unsteered harmless log-odds (KL and layer kept);
the layer limit alone."""


@dataclass
class SelectionResult:
    """The chosen direction and every candidate's scores."""

    direction: torch.Tensor  # float64 [d], un-normalised diff-in-means r[layer, position]
    layer: int
    position: int
    bypass: float
    induce: float
    kl: float
    table: list[dict] = field(default_factory=list)  # one row per (layer, position)
    candidates: torch.Tensor | None = None  # float64 [L, P, d]
    positions: tuple[int, ...] = ()
    fallback: str | None = None  # set when every candidate was filtered out and on_empty="best"
    baseline: dict = field(default_factory=dict)  # unsteered mean refusal log-odds: {"harmful", "harmless"} val
    stage: str = "configured"  # one of STAGES: which filters the chosen candidate passed
    filters: dict = field(default_factory=dict)  # the filters actually applied (applied_filters)

    @property
    def chosen(self) -> dict:
        return next(r for r in self.table if r["layer"] == self.layer and r["position"] == self.position)


def _batches(ids, mask, batch_size, device):
    if mask is None:
        mask = torch.ones_like(ids)
    for s in range(0, ids.shape[0], batch_size):
        yield ids[s : s + batch_size].to(device), mask[s : s + batch_size].to(device)


@torch.no_grad()
def _last_logits(model, ids, mask, hooks, batch_size) -> torch.Tensor:
    out = [model(i, m, fwd_hooks=list(hooks), logits="last").to(torch.float64)
           for i, m in _batches(ids, mask, batch_size, model.device)]
    return torch.cat(out)


def _kl(base_logp: torch.Tensor, edit_logits: torch.Tensor) -> float:
    edit = torch.log_softmax(edit_logits, -1)
    return float((base_logp.exp() * (base_logp - edit)).sum(-1).mean())


def applied_filters(stage: str, kl_max: float, max_layer_frac: float, harmless_baseline: float) -> dict:
    """The filters a candidate chosen at ``stage`` (:data:`STAGES`) passed, JSON-ready:
    ``{"kl_max", "max_layer_frac", "induce_min", "stage"}``; a filter that was dropped is None
    (kept candidates satisfy ``kl < kl_max``, ``induce > induce_min`` and
    ``layer < max_layer_frac * n_layers``)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}.")
    return {"kl_max": None if stage == "layer_only" else float(kl_max),
            "max_layer_frac": float(max_layer_frac),
            "induce_min": {"configured": 0.0, "induce_relaxed": float(harmless_baseline), "layer_only": None}[stage],
            "stage": stage}


def _choose(table: list[dict], kl_max: float, layer_limit: float, harmless_baseline: float,
            on_empty: str) -> tuple[dict, str | None, str]:
    """:func:`choose_candidate` plus the stage (:data:`STAGES`) that chose."""
    kept = [r for r in table if r["kept"]]
    if kept:
        return min(kept, key=lambda r: r["bypass"]), None, "configured"
    n = len(table)
    n_kl = sum(1 for r in table if "kl " in r["reason"])
    n_ind = sum(1 for r in table if "induce " in r["reason"])
    n_lay = sum(1 for r in table if "layer " in r["reason"])
    n_zero = sum(1 for r in table if r["reason"] == "zero direction")
    zero = f", {n_zero} were zero vectors" if n_zero else ""
    msg = (f"All {n} candidate directions were filtered out ({n_kl} failed KL < kl_max={kl_max:g}, "
           f"{n_ind} failed induce > 0, {n_lay} failed layer < max_layer_frac*L={layer_limit:g}{zero})")
    if on_empty == "raise":
        raise RefusalLabError(msg + "; loosen kl_max or raise max_layer_frac (or use more/other validation prompts).")
    usable = [r for r in table if r["reason"] != "zero direction" and r["layer"] < layer_limit]
    relaxed = [r for r in usable if r["kl"] < kl_max and r["induce"] > harmless_baseline]
    if relaxed:
        return min(relaxed, key=lambda r: r["bypass"]), (
            msg + f"; relaxed induce > 0 to induce > the unsteered harmless log-odds ({harmless_baseline:.3g}), "
                  "keeping the KL and layer filters, and took the lowest bypass."), "induce_relaxed"
    if usable:
        return min(usable, key=lambda r: r["bypass"]), (
            msg + "; no candidate passed even with induce relaxed, so the lowest bypass below the layer limit "
                  "was taken."), "layer_only"
    raise RefusalLabError(msg + "; loosen kl_max or raise max_layer_frac (or use more/other validation prompts).")


def choose_candidate(table: list[dict], kl_max: float, layer_limit: float, harmless_baseline: float,
                     on_empty: str = "raise") -> tuple[dict, str | None]:
    """The kept candidate with the lowest bypass, and None; or, when every candidate is filtered
    out and ``on_empty="best"``, a relaxed choice and the sentence saying so.

    Relaxations, in order: (1) ``induce > 0`` becomes ``induce > harmless_baseline`` (adding the
    direction raises the harmless prompts' refusal log-odds at all — ``> 0`` presumes log-odds on
    which harmful prompts score above 0, which small models may not reach), KL and layer filters
    kept; (2) the layer filter alone. :attr:`SelectionResult.stage` / ``filters`` say which applied.
    """
    best, fallback, _stage = _choose(table, kl_max, layer_limit, harmless_baseline, on_empty)
    return best, fallback


@torch.no_grad()
def select_direction(
    model,
    harmful_train: tuple[torch.Tensor, torch.Tensor | None],
    harmless_train: tuple[torch.Tensor, torch.Tensor | None],
    harmful_val: tuple[torch.Tensor, torch.Tensor | None],
    harmless_val: tuple[torch.Tensor, torch.Tensor | None],
    positions: Sequence[int] = (-5, -4, -3, -2, -1),
    refusal_ids: Sequence[int] | None = None,
    kl_max: float = 0.1,
    max_layer_frac: float = 0.8,
    alpha: float = 1.0,
    batch_size: int = 16,
    on_empty: str = "raise",
    progress: bool = False,
) -> SelectionResult:
    """Score every (layer, eoi position) diff-in-means candidate and pick the best (see module doc).

    Each split is an ``(ids, mask)`` pair of left-padded prompts (``mask`` may be None).
    When the filters reject every candidate, ``on_empty="raise"`` raises :class:`RefusalLabError`
    with the counts per filter; ``on_empty="best"`` relaxes the filters (see :func:`choose_candidate`)
    and says so in ``fallback``; ``stage`` and ``filters`` record what was applied. ``progress``
    shows a bar over the ``n_layers x len(positions)`` candidates on stderr.
    """
    if on_empty not in ("raise", "best"):
        raise RefusalLabError(f"on_empty must be 'raise' or 'best', got {on_empty!r}.")
    positions = tuple(int(p) for p in positions)
    if refusal_ids is None:
        if model.tokenizer is None:
            raise RefusalLabError("The model has no tokenizer, so give refusal_ids (the refusal token ids) explicitly.")
        refusal_ids = default_refusal_token_ids(model.tokenizer)
    refusal_ids = list(refusal_ids)
    L = model.cfg.n_layers
    cands = diff_in_means_all_layers(model, *harmful_train, *harmless_train, positions=positions,
                                     batch_size=batch_size)  # [L, P, d]

    hf_ids, hf_mask = harmful_val
    hl_ids, hl_mask = harmless_val
    base_hl_logits = _last_logits(model, hl_ids, hl_mask, (), batch_size)
    base_hl_logp = torch.log_softmax(base_hl_logits, -1)
    base_hl_induce = float(refusal_log_odds(base_hl_logits, refusal_ids).mean())  # harmless val, unsteered
    base_hf_bypass = float(refusal_log_odds(_last_logits(model, hf_ids, hf_mask, (), batch_size), refusal_ids).mean())
    layer_limit = max_layer_frac * L

    table: list[dict] = []
    bar = progress_bar(L * len(positions), "direction: scoring candidates", progress, unit="candidate")
    for l in range(L):
        for j, p in enumerate(positions):
            r = cands[l, j]
            row = {"layer": l, "position": p, "norm": float(r.norm())}
            if not torch.isfinite(r.norm()) or float(r.norm()) == 0.0:
                table.append(row | {"bypass": float("nan"), "induce": float("nan"), "kl": float("nan"),
                                    "kept": False, "reason": "zero direction"})
                bar.update(1)
                continue
            abl = ablation_hooks(model, r)
            bypass = float(refusal_log_odds(_last_logits(model, hf_ids, hf_mask, abl, batch_size), refusal_ids).mean())
            kl = _kl(base_hl_logp, _last_logits(model, hl_ids, hl_mask, abl, batch_size))
            add = addition_hooks(r.to(model.dtype), l, alpha, positions=None)
            induce = float(refusal_log_odds(_last_logits(model, hl_ids, hl_mask, add, batch_size), refusal_ids).mean())
            reasons = []
            if not kl < kl_max:
                reasons.append(f"kl {kl:.4g} >= kl_max {kl_max:g}")
            if not induce > 0:
                reasons.append(f"induce {induce:.4g} <= 0")
            if not l < layer_limit:
                reasons.append(f"layer {l} >= max_layer_frac*L = {layer_limit:g}")
            table.append(row | {"bypass": bypass, "induce": induce, "kl": kl,
                                "kept": not reasons, "reason": "; ".join(reasons) or "kept"})
            bar.update(1)
    bar.close()

    best, fallback, stage = _choose(table, kl_max, layer_limit, base_hl_induce, on_empty)
    j = positions.index(best["position"])
    return SelectionResult(direction=cands[best["layer"], j].clone(), layer=best["layer"], position=best["position"],
                           bypass=best["bypass"], induce=best["induce"], kl=best["kl"], table=table,
                           candidates=cands, positions=positions, fallback=fallback,
                           baseline={"harmful": base_hf_bypass, "harmless": base_hl_induce}, stage=stage,
                           filters=applied_filters(stage, kl_max, max_layer_frac, base_hl_induce))
