"""Choosing the refusal direction among difference-in-means candidates (Arditi et al. 2024, §C).

The one direction-choice policy of the package: ``refusal-lab run``'s ``direction`` step and
``refusal-lab abliterate --select`` both call :func:`select_refusal_direction` with a
:class:`DirectionPolicy`, whose defaults are the only ones (the steering settings and abliterate's
CLI take theirs from it; the run config's defaults are held equal to them by a test).

Candidates ``r[l, p]`` are the diff-in-means of ``blocks.{l}.hook_resid_pre`` at every layer ``l``
and every end-of-instruction column ``p`` (train instructions). Each candidate is scored on held-out
(val) prompts:

* ``bypass``: mean refusal log-odds (last column) of the harmful val prompts under directional
  ablation of ``r̂`` (:func:`ablation_hooks`) — lower is better;
* ``induce``: mean refusal log-odds of the harmless val prompts with ``alpha * r`` added at
  ``blocks.{l}.hook_resid_pre`` at every column;
* ``kl``: mean KL(baseline || ablated) of the harmless val prompts' last-column distribution
  (:func:`refusal_lab.steering.damage.next_token_kl`).

A candidate is kept when ``kl < kl_max``, ``induce > 0`` and ``l < max_layer_frac * n_layers``; the
kept candidate with the lowest ``bypass`` is chosen. When none is kept the policy's fallback relaxes
the filters in stages (:data:`STAGES`, :func:`choose_candidate`) and says so;
:attr:`SelectionResult.filters` records the filters actually applied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from refusal_lab.errors import ConfigError, RefusalLabError
from refusal_lab.metrics import default_refusal_token_ids, refusal_log_odds
from refusal_lab.models.hooked import gradient_hooks
from refusal_lab.models.shared_prefix import SharedPrefix, repeat_rows, row_logits
from refusal_lab.prompts import build_instruction_prompts, eoi_tokens
from refusal_lab.steering.batching import instruction_sample, progress_bar, tensor_batches
from refusal_lab.steering.damage import next_token_kl
from refusal_lab.steering.interventions import ablation_hooks, addition_hooks
from refusal_lab.steering.vectors import diff_in_means_all_layers

__all__ = ["STAGES", "DirectionPolicy", "InstructionSelection", "SelectionResult", "applied_filters",
           "choose_candidate", "select_direction", "select_refusal_direction"]

STAGES = ("configured", "induce_relaxed", "layer_only")
"""Which filters chose the candidate: the configured ones (``kl < kl_max``, ``induce > 0``, layer
limit); ``induce > 0`` relaxed to ``induce >`` the unsteered harmless log-odds (KL and layer kept);
the layer limit alone."""

ON_EMPTY = ("best", "raise")
"""What :class:`DirectionPolicy` does when every candidate is filtered out: relax the filters
(:data:`STAGES`) and say so, or raise."""

KL_CHUNK = 4
"""Prompts per forward of the top_k mode's KL scoring: KL >= 0 per prompt, so once the chunks run so
far sum to ``kl_max × n`` the candidate fails ``kl < kl_max`` whatever the rest give, and the rest
are not run (its row's ``kl`` is then that lower bound of the mean, ``kl_prompts`` the prompts it
covers; the verdict, hence the choice, is exact). On the default model the ten candidates that fail
have KL 0.16-0.93 against ``kl_max`` 0.1. The top_k mode scores kl before bypass and induce, so
a candidate that the kl filter rejects (14 of the 16 on the default model) costs only the chunks
that decide it."""

GRADIENT_BATCH = 4
"""Prompts per backward of the selection's first-order estimate: a backward holds the whole graph
of its batch, so it sets the direction step's peak memory (default model, fp32: 4.66 GiB at 16
prompts, 3.73 at 8, 3.21 at 4, weights 2.35) while the estimate, a sum over prompts, is the same up
to float64 rounding (9e-16) and no slower (117.6 / 108.8 / 110.6 s for the whole selection)."""


@dataclass(frozen=True)
class DirectionPolicy:
    """How the refusal direction is chosen: the instruction samples, the filters and the fallback.

    The defaults are the package's one set (``refusal-lab run`` and ``refusal-lab abliterate``
    choose with them): 32 train and 16 val instructions per side, seed 0, ``kl < 0.1``,
    ``layer < 0.8 * n_layers``, ``induce`` scored with the raw vector (alpha 1), and the relaxing
    fallback (``on_empty="best"``)."""

    n_train: int = 32  # harmful and harmless train instructions each (the candidates' means)
    n_val: int = 16  # harmful and harmless val instructions each (the candidates' scores)
    seed: int = 0
    kl_max: float = 0.1
    max_layer_frac: float = 0.8
    induce_alpha: float = 1.0
    on_empty: str = "best"
    exhaustive: bool = False  # score every candidate exactly (the paper's procedure) instead of the top_k
    top_k: int = 16  # candidates whose bypass is scored exactly, by the first-order estimate's rank

    def __post_init__(self):
        if self.on_empty not in ON_EMPTY:
            raise ConfigError(f"on_empty must be 'raise' or 'best', got {self.on_empty!r}.")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be a positive number of candidates, got {self.top_k}.")
        if self.n_train < 1 or self.n_val < 1:
            raise ConfigError(f"n_train and n_val must be positive numbers of instructions, got {self.n_train} "
                              f"and {self.n_val}.")


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
    fallback: str | None = None  # set when every candidate was filtered out and the policy relaxed the filters
    baseline: dict = field(default_factory=dict)  # unsteered mean refusal log-odds: {"harmful", "harmless"} val
    stage: str = "configured"  # one of STAGES: which filters the chosen candidate passed
    filters: dict = field(default_factory=dict)  # the filters actually applied (applied_filters)
    agreement: dict = field(default_factory=dict)  # the scoring mode, its cost and the estimate's agreement
    per_prompt: dict = field(default_factory=dict)
    """What the scoring computed per prompt, for later steps to reuse instead of recomputing, float64:
    ``harmful_baseline`` and ``harmful_ablated`` [n_val] (the harmful val refusal log-odds unedited
    and with the chosen direction ablated); in the top_k mode also ``train_harmful`` and
    ``train_harmless`` [n_train, d] (each train prompt's residual at the chosen site)."""

    @property
    def chosen(self) -> dict:
        return next(r for r in self.table if r["layer"] == self.layer and r["position"] == self.position)


@torch.no_grad()
def _last_logits(model, ids, mask, hooks, batch_size) -> torch.Tensor:
    out = [model(i, m, fwd_hooks=list(hooks), logits="last").to(torch.float64)
           for i, m in tensor_batches(ids, mask, batch_size, model.device)]
    return torch.cat(out)


@torch.no_grad()
def _last_logits_and_resid(model, ids, mask, layers: Sequence[int], batch_size) -> tuple[torch.Tensor, list[dict]]:
    """Unedited last-column logits (float64) and, per batch, ``blocks.{l}.hook_resid_pre`` of ``layers``
    (the cone's starting points: an edit at layer l leaves every layer before it unchanged)."""
    names = [f"blocks.{l}.hook_resid_pre" for l in layers]
    out, resid = [], []
    for i, m in tensor_batches(ids, mask, batch_size, model.device):
        pre = model.prefill(i, m, names=names, logits="last")
        out.append(pre.logits.to(torch.float64))
        resid.append({l: pre.cache[n] for l, n in zip(layers, names)})
    return torch.cat(out), resid


@torch.no_grad()
def _cone_last_logits(model, ids, mask, hooks, layer: int, resid: list[dict], batch_size) -> torch.Tensor:
    """:func:`_last_logits` of an edit at ``layer`` or later, started from the cached residual at
    ``layer`` (the same batches as the cache): the blocks before it are not recomputed."""
    out = [model.prefill(i, m, fwd_hooks=list(hooks), logits="last", start_layer=layer,
                         resid=r[layer] if layer else None).logits.to(torch.float64)
           for (i, m), r in zip(tensor_batches(ids, mask, batch_size, model.device), resid)]
    return torch.cat(out)


def _to64(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.float64)


def ablation_sites(model) -> list[str]:
    """The residual writes directional ablation edits (:func:`ablation_hooks`): ``hook_embed`` and
    every ``blocks.{l}.hook_attn_out`` / ``blocks.{l}.hook_mlp_out``."""
    return [name for name, _ in ablation_hooks(model, torch.ones(model.cfg.d_model))]


def first_order_bypass(model, ids, mask, directions: torch.Tensor, refusal_ids: Sequence[int],
                       batch_size: int = 16) -> tuple[torch.Tensor, float]:
    """First-order estimate of every candidate's ``bypass`` from one forward and one backward pass.

    Directional ablation of a unit ``r`` writes ``Δ_s = -(x_s · r) r`` at every residual write ``s``
    (:func:`ablation_sites`) and column; to first order the mean refusal log-odds then move by
    ``Σ_s Σ_col g_s · Δ_s = -Σ_s Σ_col (x_s · r)(g_s · r)``, with ``g_s`` the gradient of the
    metric with respect to an additive change at ``s`` in the unedited run. This is exactly the
    derivative at ``ε = 0`` of ablating ``ε`` of the projection (``x - ε (x·r) r`` at every site), so
    it agrees with a finite difference for small ``ε``; for the full ablation (``ε = 1``) it is an
    estimate, used to rank candidates.

    The prompts' common beginning (the chat template's) runs once per batch (:class:`SharedPrefix`).
    ``directions`` [C, d] (normalised here; zero rows give 0); returns ``(estimates [C], baseline)``:
    the estimated bypass of each candidate (baseline + change) and the unedited mean log-odds, float64.
    """
    estimates, baseline, _ = _first_order_bypass(model, ids, mask, directions, refusal_ids, batch_size)
    return estimates, baseline


def _first_order_bypass(model, ids, mask, directions: torch.Tensor, refusal_ids: Sequence[int],
                        batch_size: int) -> tuple[torch.Tensor, float, torch.Tensor]:
    """:func:`first_order_bypass` and the unedited log-odds of every prompt (float64 [n])."""
    D = directions.to(torch.float64)
    norms = D.norm(dim=-1, keepdim=True)
    U = torch.where(norms > 0, D / norms.clamp_min(1e-300), torch.zeros_like(D))
    sites = ablation_sites(model)
    delta = torch.zeros(U.shape[0], dtype=torch.float64)
    Ud = U.to(model.device)

    def project(acts: dict) -> None:  # delta -= sum over sites, rows and columns of (x . u)(g . u)
        for name in sites:
            x, g = acts[name].detach(), acts[name].grad
            if g is not None:
                delta.sub_(((x.to(torch.float64) @ Ud.T) * (g.to(torch.float64) @ Ud.T)).sum((0, 1)).cpu())

    # the prompts' common beginning runs once per batch as one row whose keys and values every row
    # continues (SharedPrefix): its activations are every row's, so its gradient (the sum over the
    # rows, through the expanded keys and values) gives the rows' summed terms exactly
    split = SharedPrefix.split(ids, mask, batch_size, model.device)
    total, n, per_prompt = 0.0, 0, []
    for _, sid, smask, last in split.batches:
        b = sid.shape[0]
        kv, pre_acts = None, None
        with torch.enable_grad():
            if split.prefix_len:
                pre_hooks, pre_acts = gradient_hooks(sites)
                kv = model.prefill(split.prefix, fwd_hooks=pre_hooks, record_kv=True, detach=False, logits="none").kv
            hooks, acts = gradient_hooks(sites)
            resid = model.prefill(sid, smask, fwd_hooks=hooks, kv_prefix=repeat_rows(kv, b), logits="none").resid
            values = refusal_log_odds(row_logits(model, resid, last), refusal_ids)
            values.sum().backward()
        total += float(values.detach().sum())
        per_prompt.append(values.detach().to(torch.float64).cpu())
        n += b
        project(acts)
        if pre_acts is not None:
            project(pre_acts)
    return total / n + delta / n, total / n, torch.cat(per_prompt)


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < 3:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr(list(a), list(b)).statistic
    return float(rho) if rho == rho else None


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


def choose_candidate(table: list[dict], kl_max: float, layer_limit: float, harmless_baseline: float,
                     on_empty: str = DirectionPolicy.on_empty) -> tuple[dict, str | None, str]:
    """``(row, fallback, stage)``: the kept candidate of ``table`` with the lowest bypass, None and
    ``"configured"``; or, when every candidate is filtered out and ``on_empty="best"``, a relaxed
    choice, the sentence saying so and the stage (:data:`STAGES`) that chose.

    Relaxations, in order: (1) ``induce > 0`` becomes ``induce > harmless_baseline`` (adding the
    direction raises the harmless prompts' refusal log-odds at all — ``> 0`` presumes log-odds on
    which harmful prompts score above 0, which small models may not reach), KL and layer filters
    kept; (2) the layer filter alone. ``on_empty="raise"`` (or nothing usable below the layer
    limit) raises :class:`RefusalLabError` with the counts per filter.
    """
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
    loosen = "; loosen kl_max or raise max_layer_frac (or use more/other validation prompts)."
    if on_empty == "raise":
        raise RefusalLabError(msg + loosen)
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
    raise RefusalLabError(msg + loosen)


@torch.no_grad()
def select_direction(
    model,
    harmful_train: tuple[torch.Tensor, torch.Tensor | None],
    harmless_train: tuple[torch.Tensor, torch.Tensor | None],
    harmful_val: tuple[torch.Tensor, torch.Tensor | None],
    harmless_val: tuple[torch.Tensor, torch.Tensor | None],
    *,
    positions: Sequence[int],
    policy: DirectionPolicy = DirectionPolicy(),
    refusal_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> SelectionResult:
    """Score every (layer, position) diff-in-means candidate and choose by ``policy`` (see the module
    doc); ``policy``'s sample sizes and seed are not used (the splits are given).

    Each split is an ``(ids, mask)`` pair of left-padded prompts (``mask`` may be None);
    ``positions`` are the candidate columns (the end-of-instruction ones). When the filters reject
    every candidate, ``policy.on_empty`` decides (:func:`choose_candidate`): ``"best"`` relaxes the
    filters and says so in ``fallback``, ``"raise"`` raises :class:`RefusalLabError` with the counts
    per filter; ``stage`` and ``filters`` record what was applied. ``progress`` shows a bar over the
    ``n_layers x len(positions)`` candidates on stderr.
    """
    kl_max, max_layer_frac = policy.kl_max, policy.max_layer_frac
    positions = tuple(int(p) for p in positions)
    if refusal_ids is None:
        if model.tokenizer is None:
            raise RefusalLabError("The model has no tokenizer, so give refusal_ids (the refusal token ids) explicitly.")
        refusal_ids = default_refusal_token_ids(model.tokenizer)
    refusal_ids = list(refusal_ids)
    L, P = model.cfg.n_layers, len(positions)
    layer_limit = max_layer_frac * L
    if policy.exhaustive:  # [L, P, d]
        cands = diff_in_means_all_layers(model, *harmful_train, *harmless_train, positions=positions,
                                         batch_size=batch_size)
    else:  # the same means (summed in row order, as mean_resid does), each side's common chat-template
        # beginning run once; the rows are kept for the chosen site (per_prompt)
        train_rows = {side: SharedPrefix.split(*x, batch_size, model.device).row_resid(model, range(L), positions)
                      for side, x in (("harmful", harmful_train), ("harmless", harmless_train))}
        cands = _row_mean(train_rows["harmful"]) - _row_mean(train_rows["harmless"])
    hf_ids, hf_mask = harmful_val
    hl_ids, hl_mask = harmless_val
    # what every candidate compares against, computed once: the unedited harmless logits and the
    # residual entering every layer (the addition's cone starts there); the harmful baseline and
    # the first-order bypass estimate of every candidate from one forward + backward
    if policy.exhaustive:  # the paper's forwards: whole prompts; the addition in its cone
        cone_layers = list(range(L))
        base_hl_logits, hl_resid = _last_logits_and_resid(model, hl_ids, hl_mask, cone_layers, batch_size)
    else:  # every scored forward runs the prompts' common beginning (the chat template's) once; the
        # addition in its cone from the unedited residuals of the layers that can be chosen
        shared_hf = SharedPrefix.split(hf_ids, hf_mask, batch_size, model.device)
        shared_hl = SharedPrefix.split(hl_ids, hl_mask, batch_size, model.device)
        kl_split = SharedPrefix.split(hl_ids, hl_mask, KL_CHUNK, model.device)
        base_hl_logits, hl_cone = shared_hl.record(model, [l for l in range(1, L) if l < layer_limit])
        base_hl_logits = _to64(base_hl_logits)
    base_hl_induce = float(refusal_log_odds(base_hl_logits, refusal_ids).mean())  # harmless val, unsteered
    estimates, base_hf_bypass, base_hf_prompts = _first_order_bypass(model, hf_ids, hf_mask, cands.reshape(L * P, -1),
                                                                     refusal_ids, min(batch_size, GRADIENT_BATCH))
    estimates = estimates.reshape(L, P)

    def mean_log_odds(logits) -> float:
        return float(refusal_log_odds(logits, refusal_ids).mean())

    rows: dict[tuple[int, int], dict] = {}
    for l in range(L):
        for j, p in enumerate(positions):
            norm = float(cands[l, j].norm())
            rows[l, j] = {"layer": l, "position": p, "norm": norm,
                          "bypass": float("nan"), "induce": float("nan"), "kl": float("nan"),
                          "bypass_estimate": float(estimates[l, j]) if math.isfinite(norm) and norm else float("nan")}
    usable = [k for k, r in rows.items() if math.isfinite(r["norm"]) and r["norm"] > 0]
    eligible = [k for k in usable if k[0] < layer_limit]  # the candidates that can be chosen
    by_estimate = sorted(eligible, key=lambda k: rows[k]["bypass_estimate"])
    to_score = usable if policy.exhaustive else by_estimate[:policy.top_k]
    bar = progress_bar(len(to_score), "direction: scoring candidates", progress, unit="candidate")

    def harmful(hooks):
        if policy.exhaustive:
            return _last_logits(model, hf_ids, hf_mask, hooks, batch_size)
        return _to64(shared_hf.last_logits(model, hooks))

    def harmless(hooks, cone_layer=None):
        if not policy.exhaustive:
            return _to64(shared_hl.last_logits(model, hooks, cone=hl_cone, start_layer=cone_layer or 0))
        if cone_layer is not None:
            return _cone_last_logits(model, hl_ids, hl_mask, hooks, cone_layer, hl_resid, batch_size)
        return _last_logits(model, hl_ids, hl_mask, hooks, batch_size)

    ablated_prompts: dict[tuple[int, int], torch.Tensor] = {}

    def score_bypass(k):
        ablated_prompts[k] = refusal_log_odds(harmful(ablation_hooks(model, cands[k])), refusal_ids)
        rows[k]["bypass"] = float(ablated_prompts[k].mean())

    def score_kl(k):
        if policy.exhaustive:
            rows[k]["kl"] = float(next_token_kl(base_hl_logits, harmless(ablation_hooks(model, cands[k]))).mean())
            return
        hooks, n, total, m = ablation_hooks(model, cands[k]), len(base_hl_logits), 0.0, 0
        # KL >= 0: stop once the sum so far decides kl >= kl_max (the edited prefix runs once per candidate)
        for idx, logits in kl_split.iter_last_logits(model, hooks):
            total += float(next_token_kl(base_hl_logits[idx], _to64(logits)).sum())
            m += len(idx)
            if total >= kl_max * n:
                break
        rows[k]["kl"], rows[k]["kl_prompts"] = total / n, m

    def score_induce(k):
        l, r = k[0], cands[k]
        rows[k]["induce"] = mean_log_odds(harmless(addition_hooks(r.to(model.dtype), l, policy.induce_alpha), l))

    def score_rest(k):
        score_kl(k)
        score_induce(k)

    if policy.exhaustive:  # every candidate, every score (the paper's procedure)
        for k in to_score:
            score_bypass(k)
            score_rest(k)
            bar.update(1)
    else:  # the top_k by estimate: kl first (it rejects most), stopped once it decides; exact bypass only
        # of the candidates that pass it, induce (in its cone) only where a stage's walk needs it
        for k in to_score:
            score_kl(k)
            if rows[k]["kl"] < kl_max:
                score_bypass(k)
            bar.update(1)
        order = sorted((k for k in to_score if rows[k]["kl"] < kl_max), key=lambda k: rows[k]["bypass"])

        def stage_found(induce_min) -> bool:
            """Walk a stage of choose_candidate in exact-bypass order over the candidates that pass
            kl: its first with induce > induce_min is its choice, so induce is scored up to that one."""
            for k in order:
                if rows[k]["induce"] != rows[k]["induce"]:
                    score_induce(k)
                if rows[k]["induce"] > induce_min:
                    return True
            return False

        if not stage_found(0.0) and not stage_found(base_hl_induce):
            for k in to_score:  # the layer-only stage: the lowest bypass of them all, kl not asked
                if rows[k]["bypass"] != rows[k]["bypass"]:
                    score_bypass(k)
    bar.close()

    scored_keys = set(to_score)  # every one got kl (top_k) or every score (exhaustive)
    table: list[dict] = []
    for k, row in rows.items():
        l = k[0]
        reasons = []
        if k not in usable:
            reason = "zero direction"
        elif k not in scored_keys:
            reason = (f"layer {l} >= max_layer_frac*L = {layer_limit:g} (not scored)" if l >= layer_limit
                      else f"not scored: bypass estimate rank {by_estimate.index(k) + 1} > top_k {policy.top_k}")
        elif row["kl"] == row["kl"] and not row["kl"] < kl_max and row["induce"] != row["induce"]:
            reason = _kl_failed(row, kl_max, hl_ids.shape[0]) + (
                "; bypass and induce not scored (the kl filter already rejects it)" if row["bypass"] != row["bypass"]
                else "; induce not scored (the kl filter already rejects it)")
        elif row["induce"] != row["induce"]:
            reason = "not scored further: exact bypass above the chosen candidate's"
        else:
            if not row["kl"] < kl_max:
                reasons.append(_kl_failed(row, kl_max, hl_ids.shape[0]))
            if not row["induce"] > 0:
                reasons.append(f"induce {row['induce']:.4g} <= 0")
            if not l < layer_limit:
                reasons.append(f"layer {l} >= max_layer_frac*L = {layer_limit:g}")
            reason = "; ".join(reasons) or "kept"
        table.append(row | {"kept": reason == "kept", "reason": reason})

    # the policy, applied to the candidates scored (all of them when exhaustive; the top_k otherwise,
    # so a fallback relaxes the filters among the top_k)
    scored_rows = [r for r in table if policy.exhaustive or r["kl"] == r["kl"]]
    best, fallback, stage = choose_candidate(scored_rows, kl_max, layer_limit, base_hl_induce, policy.on_empty)
    j = positions.index(best["position"])
    scored = [r for r in table if r["bypass"] == r["bypass"] and r["bypass_estimate"] == r["bypass_estimate"]
              and r["layer"] < layer_limit]
    rank = by_estimate.index((best["layer"], j)) + 1 if (best["layer"], j) in by_estimate else None
    agreement = {
        "mode": "exhaustive" if policy.exhaustive else "top_k",
        "top_k": policy.top_k, "n_candidates": L * P, "n_eligible": len(eligible),
        "n_scored": {key: sum(1 for r in table if r[key] == r[key]) for key in ("bypass", "induce", "kl")},
        "n_forwards": _n_forwards(table, hf_ids.shape[0], hl_ids.shape[0], L),
        "spearman_estimate_exact": _spearman([r["bypass_estimate"] for r in scored], [r["bypass"] for r in scored]),
        "n_spearman": len(scored),
        "chosen_estimate_rank": rank,
        "chosen_in_top_k": None if rank is None else rank <= policy.top_k,
    }
    if policy.exhaustive:  # would the top_k mode have chosen the same? (the policy among the top_k, by bypass)
        top = [table[l * P + j] for l, j in by_estimate[:policy.top_k]]
        kept_top = sorted((r for r in top if r["kept"]), key=lambda r: r["bypass"])
        fast = kept_top[0] if kept_top else choose_candidate(top, kl_max, layer_limit, base_hl_induce)[0] if top else None
        agreement["top_k_agrees"] = fast is not None and (fast["layer"], fast["position"]) == (best["layer"], best["position"])
    per_prompt = {"harmful_baseline": base_hf_prompts}
    if (best["layer"], j) in ablated_prompts:
        per_prompt["harmful_ablated"] = ablated_prompts[best["layer"], j].cpu()
    if not policy.exhaustive:
        per_prompt.update({f"train_{side}": x[:, best["layer"], j].clone() for side, x in train_rows.items()})
    return SelectionResult(direction=cands[best["layer"], j].clone(), layer=best["layer"], position=best["position"],
                           bypass=best["bypass"], induce=best["induce"], kl=best["kl"], table=table,
                           candidates=cands, positions=positions, fallback=fallback,
                           baseline={"harmful": base_hf_bypass, "harmless": base_hl_induce}, stage=stage,
                           filters=applied_filters(stage, kl_max, max_layer_frac, base_hl_induce), agreement=agreement,
                           per_prompt=per_prompt)


def _kl_failed(row: dict, kl_max: float, n: int) -> str:
    """Why ``row`` fails ``kl < kl_max``, saying when its kl is the lower bound of a stopped scoring."""
    m = row.get("kl_prompts")
    return (f"kl {row['kl']:.4g} >= kl_max {kl_max:g}" if m is None or m == n else
            f"kl >= {row['kl']:.4g} >= kl_max {kl_max:g} (a lower bound: {m} of {n} prompts already sum past "
            f"kl_max x {n})")


def _row_mean(rows: torch.Tensor) -> torch.Tensor:
    """Mean over the first axis, summed row by row in order (:meth:`SharedPrefix.mean_resid`'s bits)."""
    total = torch.zeros(rows.shape[1:], dtype=rows.dtype)
    for x in rows:
        total += x
    return total / rows.shape[0]


def _n_forwards(table: list[dict], n_harmful: int, n_harmless: int, n_layers: int) -> dict:
    """How much model work the scoring took, in whole-prompt forwards (one prompt through every
    layer; the top_k mode's shared chat-template beginning, which saves more, is not counted): the
    ablated forwards of bypass and kl, and induce counted by the layers its cone ran."""
    bypass = sum(1 for r in table if r["bypass"] == r["bypass"]) * n_harmful
    kl = sum(r.get("kl_prompts", n_harmless) for r in table if r["kl"] == r["kl"])
    induce = sum((n_layers - r["layer"]) / n_layers for r in table if r["induce"] == r["induce"]) * n_harmless
    return {"bypass": bypass, "kl": kl, "induce": round(induce, 2), "estimate": 3 * n_harmful,
            "total": round(bypass + kl + induce + 3 * n_harmful, 2)}


# ------------------------------------------------------------------ on the packaged instructions


@dataclass
class InstructionSelection:
    """:func:`select_refusal_direction`'s result: the selection and the instructions it used."""

    result: SelectionResult
    train: dict[str, list[str]]
    val: dict[str, list[str]]
    eoi: list[str]

    @property
    def position_token(self) -> str | None:
        p, eoi = self.result.position, self.eoi
        return eoi[p] if eoi and -len(eoi) <= p < 0 else None


def select_refusal_direction(model, policy: DirectionPolicy = DirectionPolicy(), *, batch_size: int = 16,
                             progress: bool = True) -> InstructionSelection:
    """The direction choice of ``refusal-lab run`` (its ``direction`` step) and of
    ``refusal-lab abliterate --select``: :func:`select_direction` over every layer and
    end-of-instruction column, on ``policy.n_train`` train and ``policy.n_val`` val packaged
    instructions per side (seed ``policy.seed``)."""
    tok = model.tokenizer
    train = instruction_sample("train", policy.n_train, policy.seed)
    val = instruction_sample("val", policy.n_val, policy.seed)
    enc = {(split, k): build_instruction_prompts(tok, v[k]) for split, v in (("train", train), ("val", val))
           for k in ("harmful", "harmless")}
    eoi = eoi_tokens(tok)
    positions = list(range(-max(len(eoi), 1), 0))  # the end-of-instruction columns
    res = select_direction(model, enc["train", "harmful"], enc["train", "harmless"], enc["val", "harmful"],
                           enc["val", "harmless"], positions=positions, policy=policy, batch_size=batch_size,
                           progress=progress)
    return InstructionSelection(res, train, val, eoi)
