"""``steering``: alpha sweeps of the selected direction on val instructions (added to harmless,
subtracted from / ablated on harmful), and of the object-prompt difference vector and the refusal
heads' vector on the object prompts; the alpha for the test evaluation is chosen here, on val."""

from __future__ import annotations

from refusal_lab.run.folder import public
from refusal_lab.run.step import RunContext, Step
from refusal_lab.run.steps.baseline import means
from refusal_lab.run.steps.direction import enabled
from refusal_lab.steering import pipeline as steering


def compute(ctx: RunContext) -> dict:
    inputs = ctx.inputs
    heads = ctx.records.get("heads") or {}
    h_mean, s_mean = means(ctx.records["baseline"])
    return steering.steering_step(
        ctx.model, inputs.steering_settings(), ctx.records["direction"], ctx.folder.load_vector("direction"),
        object_batches={k: (b.ids, b.mask) for k, b in inputs.batches.items()},
        objects={"harmful": inputs.prompts.harmful_objects, "harmless": inputs.prompts.harmless_objects},
        metric_fn=lambda logits: inputs.metric.from_logits(logits, None), harmful_mean=h_mean,
        harmless_mean=s_mean, object_position=inputs.prompts.resolve_positions(ctx.cfg.steering_object_position)[0],
        heads=[(x["layer"], x["head"]) for x in heads.get("selected") or []],
        heads_position=(heads.get("cols") or [None])[0], save_vector=ctx.folder.save_vector, progress=ctx.progress,
        object_cache={side: inputs.source_cache(side) for side in inputs.batches})  # the grids' sources, reused


def publish(ctx: RunContext) -> dict:
    return {"steering": public(ctx.records["steering"])}


STEP = Step("steering", compute, publish, enabled)
