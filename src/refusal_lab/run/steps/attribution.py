"""``attribution``: attribution patching (AtP, a first-order estimate from one backward pass) of
every grid in the sufficiency direction, AtP* (with the QK fix) on the head grid, and how well each
agrees with the exact grid (Spearman, top-k overlap)."""

from __future__ import annotations

import torch

from refusal_lab.patching.attribution import agreement, attribution_grid, receiver_gradients, receiver_gradients_qk
from refusal_lab.patching.engine import source_sites
from refusal_lab.run.config import DIRECTIONS, RunConfig
from refusal_lab.run.step import RunContext, Step
from refusal_lab.run.steps.baseline import means
from refusal_lab.run.steps.patch import entry, mean_normalised, step_name


def compute(ctx: RunContext) -> dict:
    inputs, model = ctx.inputs, ctx.model
    src, rec = DIRECTIONS["sufficiency"]
    specs = {g: inputs.grid_spec(g) for g in ctx.cfg.grids}
    sites = set().union(*(source_sites(model, s) for s in specs.values()))
    batch = inputs.batches[rec]
    # the head grid gets AtP* (AtP + the QK fix); the same pass gives plain AtP for every grid
    acts, grads, attn = receiver_gradients_qk(model, batch, sites, inputs.metric) \
        if "heads" in specs else (*receiver_gradients(model, batch, sites, inputs.metric), None)
    base = inputs.receiver(rec).baseline
    source = inputs.source_cache(src)
    out = {}
    for g, s in specs.items():
        plain = attribution_grid(model, batch, acts, grads, source, s, base)
        out[g] = {"per_pair": plain, "variant": "AtP"}
        if g == "heads":
            out[g] = {"per_pair": attribution_grid(model, batch, acts, grads, source, s, base, attention=attn),
                      "per_pair_plain": plain, "variant": "AtP*"}
    return out


def publish(ctx: RunContext) -> dict:
    attribution, agreements = {}, {}
    h_mean, s_mean = means(ctx.records["baseline"])
    for g, data in ctx.records["attribution"].items():
        if g.startswith("_"):
            continue
        exact = mean_normalised(ctx.records[step_name(g, "sufficiency")]["per_pair"], s_mean, h_mean)
        e = entry(ctx, g, torch.as_tensor(data["per_pair"]), "attribution")
        attribution[g] = dict(e, variant=data["variant"])
        agreements[g] = dict(agreement(exact, e["values"]), variant=data["variant"])
        if "per_pair_plain" in data:  # AtP* grid: plain AtP beside it
            plain = mean_normalised(data["per_pair_plain"], s_mean, h_mean)
            attribution[g]["values_plain"] = plain
            agreements[g]["plain"] = dict(agreement(exact, plain), variant="AtP")
    return {"patching": {"attribution": attribution, "agreement": agreements}}


def enabled(cfg: RunConfig) -> bool:
    """AtP estimates the sufficiency grids, so it needs them."""
    return cfg.attribution and bool(cfg.grids) and "sufficiency" in cfg.directions


STEP = Step("attribution", compute, publish, enabled)
