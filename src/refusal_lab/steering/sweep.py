"""Alpha sweeps: how refusal changes as the steering vector is added (harmless prompts, +alpha)
or subtracted (harmful prompts, -alpha), plus directional ablation on the harmful prompts.

Each row reports the refusal rate of greedy completions (substring judge by default) and the mean
refusal log-odds at the last prompt column (:func:`refusal_lab.metrics.refusal_log_odds`), the
cheap score that tracks it. Prompts are tokenized once and batched by length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refusal_lab.metrics import default_refusal_token_ids, refusal_log_odds
from refusal_lab.steering.evaluation import Judge, SubstringJudge, _length_batches
from refusal_lab.steering.interventions import ablation_hooks, addition_hooks

__all__ = ["alpha_sweep", "evaluate_hooks"]


@torch.no_grad()
def evaluate_hooks(model, instructions: Sequence[str], fwd_hooks, *, judge: Judge | None = None,
                   refusal_ids: Sequence[int] | None = None, max_new_tokens: int = 24,
                   batch_size: int = 16, generate: bool = True) -> dict:
    """Refusal rate and mean refusal log-odds of ``instructions`` under ``fwd_hooks``:
    ``{"refusal_rate", "refusal_score", "n", "completions", "refused"}`` (rate/completions are
    None when ``generate=False``). The log-odds come from the same prompt pass as generation
    would need, computed with one extra forward per batch."""
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
    out = {"n": n, "refusal_score": float(scores.mean()) if n else float("nan"),
           "refusal_rate": None, "completions": None, "refused": None}
    if generate:
        refused = list((judge or SubstringJudge())(list(instructions), comps))
        out |= {"refusal_rate": sum(refused) / n if n else float("nan"), "completions": comps, "refused": refused}
    return out


def alpha_sweep(model, vector: torch.Tensor, layer: int, alphas: Sequence[float],
                harmless_instructions: Sequence[str], harmful_instructions: Sequence[str], *,
                positions="all", ablate: bool = True, judge: Judge | None = None,
                refusal_ids: Sequence[int] | None = None, max_new_tokens: int = 24,
                batch_size: int = 16, n_samples: int = 3) -> dict:
    """Sweep the steering coefficient.

    For each alpha: ``induce`` = harmless prompts with ``+alpha * vector`` added at
    ``blocks.{layer}.hook_resid_pre`` (``positions`` as in :func:`addition_hooks`), ``suppress`` =
    harmful prompts with ``-alpha * vector``. ``alpha = 0`` is the unsteered baseline. With
    ``ablate``, also directional ablation of ``vector``'s direction on the harmful prompts.

    Returns ``{"rows": [{alpha, induce_refusal_rate, suppress_refusal_rate, induce_refusal_score,
    suppress_refusal_score}], "ablation": {...} | None, "samples": [...]}`` where samples hold the
    first ``n_samples`` completions of each setting.
    """
    kw = dict(judge=judge, refusal_ids=refusal_ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
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
        rows.append({"alpha": alpha, "induce_refusal_rate": ind["refusal_rate"],
                     "suppress_refusal_rate": sup["refusal_rate"],
                     "induce_refusal_score": ind["refusal_score"], "suppress_refusal_score": sup["refusal_score"],
                     "n_harmless": ind["n"], "n_harmful": sup["n"]})
        sample("induce", alpha, harmless_instructions, ind)
        sample("suppress", alpha, harmful_instructions, sup)
    ablation = None
    if ablate:
        res = evaluate_hooks(model, harmful_instructions, ablation_hooks(model, vector), **kw)
        ablation = {"refusal_rate": res["refusal_rate"], "refusal_score": res["refusal_score"], "n": res["n"]}
        sample("ablate", None, harmful_instructions, res)
    return {"rows": rows, "ablation": ablation, "samples": samples}
