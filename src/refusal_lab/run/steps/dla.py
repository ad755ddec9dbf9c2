"""``dla``: direct logit attribution of the metric on both sides — accumulated residual per layer,
each component's (embedding, attention, MLP per layer) and each head's direct contribution."""

from __future__ import annotations

import torch

from refusal_lab.dla import SCALE_NOTE, direct_logit_attribution
from refusal_lab.run.inputs import SIDES
from refusal_lab.run.step import RunContext, Step


def compute(ctx: RunContext) -> dict:
    inputs = ctx.inputs
    out = {"scale": SCALE_NOTE}
    for side in SIDES:
        b = inputs.batches[side]
        r = direct_logit_attribution(inputs.model, b.ids, b.mask, inputs.tokens.refusal_id, inputs.tokens.compliance_id)
        out["labels"], out["component_labels"] = r.accumulated_labels, r.component_labels
        out[side] = {"accumulated": r.accumulated, "components": r.components, "heads": r.heads}
    return out


def publish(ctx: RunContext) -> dict:
    dla = ctx.records["dla"]
    cfg = ctx.model.cfg
    mean = lambda side, key: torch.as_tensor(dla[side][key]).float().mean(0)  # noqa: E731
    return {"dla": {
        "scale": dla["scale"], "labels": dla["labels"],
        "harmful_mean": mean("harmful", "accumulated"), "harmless_mean": mean("harmless", "accumulated"),
        "components": {"labels": dla["component_labels"], "harmful_mean": mean("harmful", "components"),
                       "harmless_mean": mean("harmless", "components")},
        "heads": {"rows": list(range(cfg.n_layers)), "cols": list(range(cfg.n_heads)),
                  "harmful_mean": mean("harmful", "heads"), "harmless_mean": mean("harmless", "heads")},
    }}


STEP = Step("dla", compute, publish)
