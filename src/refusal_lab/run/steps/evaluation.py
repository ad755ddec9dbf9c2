"""``evaluation``: held-out test instructions (never used for a choice) — harmless refusal rate with
the direction added at the alpha chosen on val, harmful refusal rate with it ablated / subtracted,
each beside its baseline with k, n and Wilson intervals; KL and cross-entropy damage on harmless."""

from __future__ import annotations

from refusal_lab.run.folder import public
from refusal_lab.run.step import RunContext, Step
from refusal_lab.run.steps.direction import enabled
from refusal_lab.steering import pipeline as steering


def compute(ctx: RunContext) -> dict:
    alpha = ctx.records["steering"]["instructions"]["chosen_alpha"]
    return steering.evaluation_step(ctx.model, ctx.inputs.steering_settings(), ctx.records["direction"],
                                    ctx.folder.load_vector("direction"), alpha, progress=ctx.progress)


def publish(ctx: RunContext) -> dict:
    return {"evaluation": public(ctx.records["evaluation"])}


STEP = Step("evaluation", compute, publish, enabled)
