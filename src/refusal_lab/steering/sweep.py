"""Alpha sweeps: how refusal changes as the steering vector is added (harmless prompts, +alpha)
or subtracted (harmful prompts, -alpha), plus directional ablation on the harmful prompts.

Each row reports the refusal rate of greedy completions (substring judge by default) and the mean
refusal log-odds at the last prompt column (:func:`refusal_lab.metrics.refusal_log_odds`), the
cheap score that tracks it, with the Wilson 95 % interval and the number of prompts beside every
rate (:func:`refusal_lab.stats.wilson_interval`). Prompts are tokenized once and batched by length.

Both functions take ``bar``: anything with ``update(n)`` (a ``tqdm`` bar), advanced by one per
batch of prompts (one forward plus generation); :func:`sweep_units` / :func:`n_batches` give the
totals, so a caller can run one bar over several sweeps.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch

from refusal_lab.metrics import default_refusal_token_ids, refusal_log_odds
from refusal_lab.steering.evaluation import Judge, SubstringJudge, _length_batches
from refusal_lab.steering.interventions import ablation_hooks, addition_hooks
from refusal_lab.stats import wilson_interval

__all__ = ["alpha_sweep", "evaluate_hooks", "n_batches", "progress_bar", "rate_ci95", "sweep_units"]


def progress_bar(total: int, desc: str, progress: bool = True, unit: str = "batch"):
    """The steering steps' tqdm bar on stderr (n of N, ETA); disabled when ``progress`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not progress, file=sys.stderr)


def n_batches(n: int, batch_size: int) -> int:
    """Batches :func:`evaluate_hooks` runs for ``n`` prompts (its progress units)."""
    return math.ceil(n / max(int(batch_size), 1)) if n > 0 else 0


def sweep_units(n_alphas: int, n_harmless: int, n_harmful: int, batch_size: int, ablate: bool = True) -> int:
    """Progress units of :func:`alpha_sweep` (batches over every setting)."""
    return (n_alphas * (n_batches(n_harmless, batch_size) + n_batches(n_harmful, batch_size))
            + (n_batches(n_harmful, batch_size) if ablate else 0))


def rate_ci95(k: int | None, n: int) -> list[float] | None:
    """The Wilson 95 % interval ``[lo, hi]`` of ``k / n``; None without a count or prompts."""
    if k is None or n <= 0:
        return None
    lo, hi = wilson_interval(int(k), int(n))
    return [lo, hi]


@torch.no_grad()
def evaluate_hooks(model, instructions: Sequence[str], fwd_hooks, *, judge: Judge | None = None,
                   refusal_ids: Sequence[int] | None = None, max_new_tokens: int = 24,
                   batch_size: int = 16, generate: bool = True, bar=None) -> dict:
    """Refusal rate and mean refusal log-odds of ``instructions`` under ``fwd_hooks``:
    ``{"refusal_rate", "k", "ci95", "refusal_score", "n", "completions", "refused"}`` (``k`` = refusals
    counted, ``ci95`` = Wilson interval of the rate; rate/k/ci95/completions are None when
    ``generate=False``). The log-odds come from the same prompt pass as generation would need,
    computed with one extra forward per batch. ``bar.update(1)`` after each batch."""
    refusal_ids = list(refusal_ids) if refusal_ids is not None else default_refusal_token_ids(model.tokenizer)
    n = len(instructions)
    scores = torch.zeros(n, dtype=torch.float64)
    comps: list[str | None] = [None] * n
    for idx, ids, mask in _length_batches(model, list(instructions), batch_size):
        hooks = list(fwd_hooks)
        logits = model(ids, mask, fwd_hooks=hooks, logits="last")
        scores[idx] = refusal_log_odds(logits, refusal_ids).cpu()
        if generate:
            new = model.generate(ids, mask, max_new_tokens=max_new_tokens, fwd_hooks=hooks)
            for i, t in zip(idx, model.tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)):
                comps[i] = t
        if bar is not None:
            bar.update(1)
    out = {"n": n, "refusal_score": float(scores.mean()) if n else float("nan"),
           "refusal_rate": None, "k": None, "ci95": None, "completions": None, "refused": None}
    if generate:
        refused = [bool(r) for r in (judge or SubstringJudge())(list(instructions), comps)]
        k = sum(refused)
        out |= {"refusal_rate": k / n if n else float("nan"), "k": k, "ci95": rate_ci95(k, n),
                "completions": comps, "refused": refused}
    return out


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
    kw = dict(judge=judge, refusal_ids=refusal_ids, max_new_tokens=max_new_tokens, batch_size=batch_size, bar=bar)
    rows, samples = [], []

    def sample(setting, alpha, instructions, res):
        for ins, comp, ref in list(zip(instructions, res["completions"], res["refused"]))[:n_samples]:
            samples.append({"setting": setting, "alpha": alpha, "instruction": ins, "completion": comp, "refused": ref})

    for alpha in alphas:
        alpha = float(alpha)
        ind = evaluate_hooks(model, harmless_instructions,
                             addition_hooks(vector, layer, alpha, positions) if alpha else [], **kw)
        sup = evaluate_hooks(model, harmful_instructions,
                             addition_hooks(vector, layer, -alpha, positions) if alpha else [], **kw)
        rows.append({"alpha": alpha,
                     "induce_refusal_rate": ind["refusal_rate"], "induce_refusal_rate_ci95": ind["ci95"],
                     "induce_n": ind["n"],
                     "suppress_refusal_rate": sup["refusal_rate"], "suppress_refusal_rate_ci95": sup["ci95"],
                     "suppress_n": sup["n"],
                     "induce_refusal_score": ind["refusal_score"], "suppress_refusal_score": sup["refusal_score"],
                     "n_harmless": ind["n"], "n_harmful": sup["n"]})
        sample("induce", alpha, harmless_instructions, ind)
        sample("suppress", alpha, harmful_instructions, sup)
    ablation = None
    if ablate:
        res = evaluate_hooks(model, harmful_instructions, ablation_hooks(model, vector), **kw)
        ablation = {"refusal_rate": res["refusal_rate"], "refusal_rate_ci95": res["ci95"], "n": res["n"],
                    "refusal_score": res["refusal_score"]}
        sample("ablate", None, harmful_instructions, res)
    return {"rows": rows, "ablation": ablation, "samples": samples}
