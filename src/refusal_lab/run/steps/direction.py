"""``direction``: the refusal direction (Arditi et al. 2024) — difference-in-means candidates on
train instructions at every layer x end-of-instruction column, scored on val instructions, chosen
by the one selection policy (:func:`refusal_lab.steering.pipeline.select_refusal_direction`, also
behind ``refusal-lab abliterate --select``); saved as ``vectors/direction.safetensors``."""

from __future__ import annotations

from refusal_lab.run.config import RunConfig
from refusal_lab.run.folder import public
from refusal_lab.run.step import RunContext, Step
from refusal_lab.steering import pipeline as steering


def compute(ctx: RunContext) -> dict:
    return steering.direction_step(ctx.model, ctx.inputs.steering_settings(), ctx.folder.save_vector,
                                   progress=ctx.progress)


def publish(ctx: RunContext) -> dict:
    return {"direction": public(ctx.records["direction"])}


def enabled(cfg: RunConfig) -> bool:
    return cfg.steering


STEP = Step("direction", compute, publish, enabled)
