"""Alpha sweeps: how refusal changes as a steering vector is added to harmless prompts (+alpha) or
subtracted from harmful ones (-alpha), so that the steering step can show a dose-response curve and
choose alpha on validation prompts.

* :func:`alpha_sweep`: instructions (the selected direction, the val split), plus directional
  ablation on the harmful ones; each row has the refusal rate of greedy completions (substring judge
  by default) with its Wilson 95 % interval and ``n``, and the mean refusal log-odds at the last
  prompt column (:func:`refusal_lab.metrics.refusal_log_odds`), the cheap score that tracks it.
* :func:`object_alpha_sweep`: the replication's object prompts, scored with the run's refusal
  metric, normalised so that 0 = the harmless baseline and 1 = the harmful one (:func:`refusal_lab.metrics.normalise`),
  with standard errors, and the refusal fraction of their completions.

Both run their settings through :func:`refusal_lab.steering.evaluation.evaluate_many` (every
alpha of one side at once, sharing the blocks below the steered layer; both sides' rows decoded
together) and take
``bar``: anything with ``update(n)`` (a ``tqdm`` bar), advanced by one per batch of prompts;
:func:`sweep_units` gives :func:`alpha_sweep`'s total, so a caller can run one bar over several sweeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from refusal_lab.metrics import normalise
from refusal_lab.steering.batching import n_batches
from refusal_lab.steering.evaluation import HookEvaluation, Judge, evaluate_many, refusal_log_odds_score
from refusal_lab.steering.interventions import ablation_hooks, addition_hooks
from refusal_lab.stats import mean_se

__all__ = ["alpha_sweep", "object_alpha_sweep", "sweep_units"]


def sweep_units(n_alphas: int, n_harmless: int, n_harmful: int, batch_size: int, ablate: bool = True) -> int:
    """Progress units of :func:`alpha_sweep` (batches over every setting)."""
    return (n_alphas * (n_batches(n_harmless, batch_size) + n_batches(n_harmful, batch_size))
            + (n_batches(n_harmful, batch_size) if ablate else 0))


def alpha_sweep(model, vector: torch.Tensor, layer: int, alphas: Sequence[float],
                harmless_instructions: Sequence[str], harmful_instructions: Sequence[str], *,
                positions="all", ablate: bool = True, judge: Judge | None = None,
                refusal_ids: Sequence[int] | None = None, max_new_tokens: int = 24,
                batch_size: int = 16, n_samples: int = 3, bar=None) -> dict:
    """Sweep the steering coefficient.

    For each alpha: ``induce`` = harmless prompts with ``+alpha * vector`` added at
    ``blocks.{layer}.hook_resid_pre`` (``positions`` as in :func:`addition_hooks`), ``suppress`` =
    harmful prompts with ``-alpha * vector``. ``alpha = 0`` is the unsteered baseline. With
    ``ablate``, also directional ablation of ``vector``'s direction on the harmful prompts.

    Returns ``{"rows": [{alpha, induce_refusal_rate, induce_refusal_rate_ci95, induce_n,
    suppress_refusal_rate, suppress_refusal_rate_ci95, suppress_n, induce_refusal_score,
    suppress_refusal_score, n_harmless, n_harmful}], "ablation": {refusal_rate, refusal_rate_ci95, n,
    refusal_score} | None, "samples": [...]}`` where ``*_ci95`` is the Wilson 95 % interval of the
    rate beside it and samples hold the first ``n_samples`` completions of each setting. ``bar``
    advances by one per batch (:func:`sweep_units` in all).
    """
    kw = dict(score=refusal_log_odds_score(model, refusal_ids), batch_size=batch_size, full_texts=n_samples)
    alphas = [float(a) for a in alphas]
    harmless = {i: addition_hooks(vector, layer, a, positions) if a else [] for i, a in enumerate(alphas)}
    harmful = {i: addition_hooks(vector, layer, -a, positions) if a else [] for i, a in enumerate(alphas)}
    if ablate:
        harmful["ablate"] = ablation_hooks(model, vector)
    # both sides' settings decode together (evaluate_many)
    induce, suppress = evaluate_many(model, [dict(prompts=harmless_instructions, settings=harmless, **kw),
                                             dict(prompts=harmful_instructions, settings=harmful, **kw)],
                                     judge=judge, max_new_tokens=max_new_tokens, bar=bar)
    rows, samples = [], []
    for i, alpha in enumerate(alphas):
        ind, sup = induce[i], suppress[i]
        rows.append({"alpha": alpha,
                     "induce_refusal_rate": ind.rate, "induce_refusal_rate_ci95": ind.ci95, "induce_n": ind.n,
                     "suppress_refusal_rate": sup.rate, "suppress_refusal_rate_ci95": sup.ci95, "suppress_n": sup.n,
                     "induce_refusal_score": ind.score, "suppress_refusal_score": sup.score,
                     "n_harmless": ind.n, "n_harmful": sup.n})
        samples += ind.samples(n_samples, {"setting": "induce", "alpha": alpha})
        samples += sup.samples(n_samples, {"setting": "suppress", "alpha": alpha})
    ablation = None
    if ablate:
        abl = suppress["ablate"]
        ablation = {"refusal_rate": abl.rate, "refusal_rate_ci95": abl.ci95, "n": abl.n, "refusal_score": abl.score}
        samples += abl.samples(n_samples, {"setting": "ablate", "alpha": None})
    return {"rows": rows, "ablation": ablation, "samples": samples}


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@torch.no_grad()
def object_alpha_sweep(model, vector: torch.Tensor, layer: int, alphas: Sequence[float],
                       object_batches: dict[str, tuple[torch.Tensor, torch.Tensor]], objects: dict[str, list[str]], *,
                       metric_fn: Callable[[torch.Tensor], torch.Tensor], harmful_mean: float, harmless_mean: float,
                       judge: Judge | None = None, max_new_tokens: int = 16, n_samples: int = 3, bar=None,
                       unsteered: dict[str, HookEvaluation] | None = None) -> dict:
    """+alpha * ``vector`` at ``blocks.{layer}.hook_resid_pre`` on the harmless object prompts,
    -alpha on the harmful ones (``object_batches[side]`` = ``(ids, mask)``, one row per object of
    ``objects[side]``, run as one batch): the refusal metric and the refusal rate per alpha.

    Per side and alpha: ``{side}_metric`` (``metric_fn`` of the last-column logits, mean over the
    objects) and ``{side}_metric_se`` (its standard error), ``{side}_normalised`` (:func:`refusal_lab.metrics.normalise`
    with the baselines ``harmless_mean`` / ``harmful_mean``) and ``{side}_normalised_se`` (= metric
    SE / |harmful - harmless|, the baselines held fixed), ``{side}_n`` (objects), and with generation
    (``max_new_tokens > 0``) ``{side}_refusal_fraction`` with its Wilson interval
    ``{side}_refusal_fraction_ci95``. Returns ``{"rows", "samples"}``; ``bar.update(1)`` per
    (alpha, side). ``unsteered``: a dict kept across sweeps of the same prompts and settings (e.g. two
    vectors): the alpha = 0 evaluation of each side is computed once and read from it afterwards."""
    rows, samples = [], []
    gap = harmful_mean - harmless_mean

    def metric_of_logits(logits):
        return metric_fn(logits.float())

    alphas = [float(a) for a in alphas]
    sides = (("harmless", 1.0), ("harmful", -1.0))
    cached = {side: unsteered is not None and side in unsteered for side, _ in sides}
    jobs = []
    for side, sign in sides:
        ids, mask = object_batches[side]
        settings = {i: addition_hooks(vector, layer, sign * a) if a else [] for i, a in enumerate(alphas)
                    if a or not cached[side]}
        jobs.append(dict(prompts=objects[side], settings=settings, score=metric_of_logits,
                         batches=[(list(range(ids.shape[0])), ids, mask)], full_texts=n_samples))
    # both sides' settings decode together (7 object prompts per setting are too few rows alone)
    runs = dict(zip((side for side, _ in sides),
                    evaluate_many(model, jobs, judge=judge, max_new_tokens=max_new_tokens, bar=bar)))
    for side, _ in sides:
        for i, a in enumerate(alphas):
            if not a:
                if cached[side]:
                    runs[side][i] = unsteered[side]
                    if bar is not None:
                        bar.update(1)
                elif unsteered is not None:
                    unsteered[side] = runs[side][i]
    for i, alpha in enumerate(alphas):
        row = {"alpha": alpha}
        for side, sign in (("harmless", 1.0), ("harmful", -1.0)):
            ev = runs[side][i]
            mean, se = mean_se(ev.scores)
            mean, se = float(mean), float(se)
            row[f"{side}_metric"] = mean
            row[f"{side}_metric_se"] = _finite_or_none(se)
            row[f"{side}_normalised"] = float(normalise(mean, harmless_mean, harmful_mean))
            row[f"{side}_normalised_se"] = _finite_or_none(se / abs(gap))
            row[f"{side}_n"] = ev.n
            if ev.refused is not None:
                row[f"{side}_refusal_fraction"] = ev.rate
                row[f"{side}_refusal_fraction_ci95"] = ev.ci95
                samples += ev.samples(n_samples, {"side": side, "alpha": alpha * sign}, prompt_key="object")
        rows.append(row)
    return {"rows": rows, "samples": samples}
