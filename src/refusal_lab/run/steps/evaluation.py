"""``evaluation``: held-out test instructions (never used for a choice) — harmless refusal rate with
the direction added at the alpha chosen on val, harmful refusal rate with it ablated / subtracted,
each beside its baseline with k, n and Wilson intervals; KL and cross-entropy damage on harmless."""

from __future__ import annotations

from refusal_lab.run.folder import public
from refusal_lab.run.step import RunContext, Step
from refusal_lab.run.steps.direction import enabled
from refusal_lab.steering import pipeline as steering


TEST_RESID = "evaluation_test_resid_{side}"
"""The unedited test prompts' ``blocks.{l}.hook_resid_pre`` at every layer at the direction's column
(``[n, n_layers, d]``), recorded during this step's prefills for the geometry step's separation curve."""


def compute(ctx: RunContext) -> dict:
    alpha = ctx.records["steering"]["instructions"]["chosen_alpha"]
    d = ctx.records["direction"]
    record = steering.evaluation_step(ctx.model, ctx.inputs.steering_settings(), d,
                                      ctx.folder.load_vector("direction"), alpha, progress=ctx.progress,
                                      record_resid=True)
    for side, resid in (record.pop("_test_resid", None) or {}).items():
        ctx.folder.save_vector(TEST_RESID.format(side=side), resid.to(ctx.model.dtype),  # lossless: they are model-dtype values
                               {"model": ctx.model.cfg.model_name, "layer": "every", "position": d["position"],
                                "site": "hook_resid_pre", "split": "test", "n": resid.shape[0],
                                "kind": f"unedited {side} test prompts' residuals [n, n_layers, d] at the direction's column"})
    return record


def publish(ctx: RunContext) -> dict:
    return {"evaluation": public(ctx.records["evaluation"])}


STEP = Step("evaluation", compute, publish, enabled)
