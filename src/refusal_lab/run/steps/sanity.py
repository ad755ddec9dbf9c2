"""``sanity``: does the metric separate harmful from harmless prompts at all?

Derived from the baseline record on every run (cheap, not stored): the paired gap (harmful object
i minus harmless object i) with its bootstrap interval, the fraction of harmful prompts whose top
next token is a refusal onset (Wilson interval), and the refusal token's probability beside the
most likely onset's. A model that does not separate is told so first (findings, report banner);
``--strict`` stops the run here, before any patching.
"""

from __future__ import annotations

import torch

from refusal_lab.errors import RefusalLabError
from refusal_lab.metrics import default_refusal_token_ids
from refusal_lab.run.step import RunContext, Step
from refusal_lab.run.steps.baseline import means, per_prompt
from refusal_lab.stats import summary, wilson_interval

SANITY_RULE = ("separates = the mean paired gap (harmful object i minus harmless object i, on the metric) is > 0 "
               "and the lower bound of its 95% bootstrap interval over pairs is > 0")
TOKEN_NOTE_RULE = ("note when the metric's refusal token has less than a quarter of the mean probability of the "
                   "most likely refusal onset on harmful prompts")


def sanity_check(harmful: dict, harmless: dict, tokenizer, tokens, seed: int = 0) -> dict:
    """The ``sanity`` entry of results.json from the baseline's per-prompt records of both sides."""
    h = torch.as_tensor(harmful["metric"], dtype=torch.float64)
    s = torch.as_tensor(harmless["metric"], dtype=torch.float64)
    n = min(len(h), len(s))
    gap = summary(h[:n] - s[:n], seed=seed)
    gap = {"mean": gap["mean"], "se": gap["se"], "ci95": gap["ci95"], "n_pairs": gap["n"]}
    onset_ids = [int(i) for i in harmful["onset_ids"]]
    dec = lambda i: tokenizer.decode([int(i)])  # noqa: E731
    k, m = sum(int(t) in onset_ids for t in harmful["top_id"]), len(harmful["top_id"])
    lo, hi = wilson_interval(k, m)
    onset = {"value": k / m if m else None, "k": k, "n": m, "ci95": [lo, hi],
             "onset_tokens": [dec(i) for i in onset_ids]}
    op = torch.as_tensor(harmful["onset_probs"], dtype=torch.float64).reshape(m, len(onset_ids)).mean(0)
    best = int(op.argmax())
    top = {"token": dec(onset_ids[best]), "id": onset_ids[best], "mean_prob": float(op[best])}
    ref = {"token": tokens.refusal_str, "id": tokens.refusal_id,
           "mean_prob": float(torch.as_tensor(harmful["refusal_prob"], dtype=torch.float64).mean())}
    separates = bool(gap["mean"] > 0 and gap["ci95"][0] > 0)
    metric = f"logit[{tokens.refusal_str}] - logit[{tokens.compliance_str}]"
    se = "nan" if gap["se"] != gap["se"] else f"{gap['se']:.2f}"
    nums = (f"gap {gap['mean']:.2f} ± {se}, 95% CI [{gap['ci95'][0]:.2f}, {gap['ci95'][1]:.2f}], "
            f"n = {n} pairs")
    onset_words = (f"{k} of {m} harmful prompts have a refusal onset as their top next token "
                   f"(fraction {onset['value']:.2f}, Wilson 95% CI [{lo:.2f}, {hi:.2f}])")
    if separates:
        sentence = (f"Sanity check passed: harmful prompts score higher than harmless ones on {metric} ({nums}); "
                    f"{onset_words}.")
        strict = ""
    else:
        sentence = (f"Warning: this model does not separate harmful from harmless prompts on {metric} ({nums}), "
                    f"and {onset_words}; the normalised patching values below are not interpretable. Try "
                    "--refusal auto or another refusal/compliance token pair.")
        strict = (f"This model does not separate harmful from harmless prompts on {metric} ({nums}), so --strict "
                  "stops the run before any patching; try --refusal auto or another refusal/compliance token pair.")
    note = None
    if separates and top["id"] != ref["id"] and ref["mean_prob"] < 0.25 * top["mean_prob"]:
        note = (f"Note: the metric's refusal token {ref['token']!r} has mean probability {ref['mean_prob']:.2f} on "
                f"harmful prompts, far below the model's most likely refusal onset {top['token']!r} "
                f"({top['mean_prob']:.2f}); the metric may miss how this model refuses (try --refusal "
                f"{top['token'].strip() or 'auto'!r} or --refusal auto).")
    return {"metric": metric, "gap": gap, "refusal_onset_fraction": onset, "refusal_token": ref,
            "top_refusal_onset": top, "separates": separates, "rule": SANITY_RULE, "sentence": sentence,
            "token_note": note, "token_note_rule": TOKEN_NOTE_RULE, "strict_message": strict}


def baseline_per_prompt(ctx: RunContext, side: str) -> dict:
    """The baseline's per-prompt record of ``side``, recomputed for a baseline stored before it had one."""
    base = ctx.records["baseline"][side]
    if "per_prompt" in base:
        return base["per_prompt"]
    inputs = ctx.inputs
    b = inputs.batches[side]
    with torch.no_grad():
        logits = inputs.model(b.ids, b.mask, logits="last").float()
    return per_prompt(inputs, logits, inputs.metric.from_logits(logits, None), logits.softmax(-1),
                      default_refusal_token_ids(inputs.model.tokenizer))


def compute(ctx: RunContext) -> dict:
    h_mean, s_mean = means(ctx.records["baseline"])
    if abs(h_mean - s_mean) < 1e-6:
        raise RefusalLabError("Harmful and harmless prompts give the same mean score, so patching cannot be "
                              "normalised; check the refusal/compliance tokens.")
    record = sanity_check(baseline_per_prompt(ctx, "harmful"), baseline_per_prompt(ctx, "harmless"),
                          ctx.model.tokenizer, ctx.inputs.tokens, seed=ctx.cfg.seed)
    if ctx.strict and not record["separates"]:  # before any patching step
        raise RefusalLabError(record["strict_message"])
    return record


def publish(ctx: RunContext) -> dict:
    return {"sanity": {k: v for k, v in ctx.records["sanity"].items() if k != "strict_message"}}


STEP = Step("sanity", compute, publish, stored=False)
