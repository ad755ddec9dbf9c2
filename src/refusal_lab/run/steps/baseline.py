"""``baseline``: the metric and the model's next tokens on every object prompt, unpatched.

Per side: the logit difference (refusal minus compliance token) and refusal log-odds per object,
the top token of each prompt, the mean top-10 next tokens, and per-prompt probabilities of the
refusal onsets that the sanity gate reads. Its means are the 0/1 anchors of every normalised value.
"""

from __future__ import annotations

from typing import TypedDict

import torch

from refusal_lab.metrics import default_refusal_token_ids, refusal_log_odds
from refusal_lab.run.inputs import SIDES
from refusal_lab.run.step import RunContext, Step


class PerPrompt(TypedDict):
    """Per prompt, in object order (harmful i is paired with harmless i)."""

    metric: list[float]
    top_id: list[int]
    refusal_prob: list[float]
    onset_ids: list[int]
    onset_probs: list[list[float]]


class Side(TypedDict):
    scores: dict[str, float]
    log_odds: dict[str, float]
    top_token: list[str]
    top_next_tokens: list[list]
    per_prompt: PerPrompt


class BaselineRecord(TypedDict):
    harmful: Side
    harmless: Side


def per_prompt(inputs, logits: torch.Tensor, metric: torch.Tensor, probs: torch.Tensor, onset_ids) -> PerPrompt:
    return {"metric": metric.tolist(), "top_id": [int(i) for i in logits.argmax(-1)],
            "refusal_prob": probs[:, inputs.tokens.refusal_id].tolist(),
            "onset_ids": list(onset_ids), "onset_probs": probs[:, list(onset_ids)].tolist()}


def compute(ctx: RunContext) -> BaselineRecord:
    inputs = ctx.inputs
    tok = inputs.model.tokenizer
    onset_ids = default_refusal_token_ids(tok)
    out = {}
    for side in SIDES:
        b = inputs.batches[side]
        logits = inputs.model(b.ids, b.mask, logits="last").float()
        ld = inputs.metric.from_logits(logits, None)
        lo = refusal_log_odds(logits, onset_ids)
        probs = logits.softmax(-1)
        top = probs.mean(0).topk(10)
        objs = getattr(inputs.prompts, f"{side}_objects")
        out[side] = {
            "scores": dict(zip(objs, ld.tolist())),
            "log_odds": dict(zip(objs, lo.tolist())),
            "top_token": [tok.decode([int(i)]) for i in logits.argmax(-1)],
            "top_next_tokens": [[tok.decode([int(i)]), float(p)] for p, i in zip(top.values, top.indices)],
            "per_prompt": per_prompt(inputs, logits, ld, probs, onset_ids),
        }
    return out


def means(record: BaselineRecord) -> tuple[float, float]:
    """(harmful mean, harmless mean) of the metric: the 1 and 0 of every normalised value."""
    h, s = record["harmful"]["scores"], record["harmless"]["scores"]
    return sum(h.values()) / len(h), sum(s.values()) / len(s)


def publish(ctx: RunContext) -> dict:
    base = ctx.records["baseline"]
    h_mean, s_mean = means(base)
    return {"baseline": {
        "metric": "logit_diff",
        "harmful": base["harmful"]["scores"], "harmless": base["harmless"]["scores"],
        "harmful_mean": h_mean, "harmless_mean": s_mean,
        "log_odds": {f"{side}_mean": sum(base[side]["log_odds"].values()) / len(base[side]["log_odds"])
                     for side in SIDES} | {side: base[side]["log_odds"] for side in SIDES},
        "top_next_tokens": {side: base[side]["top_next_tokens"] for side in SIDES},
    }}


STEP = Step("baseline", compute, publish)
