"""``heads``: the refusal heads — heads whose patched output (``attn.hook_z`` at the heads
position, harmful into harmless) recovers more than ``threshold`` of the metric — ranked, their
joint sufficiency (all selected heads patched together, per pair), and generations of the harmless
prompts with those heads patched beside the unpatched ones."""

from __future__ import annotations


from refusal_lab.metrics import normalise
from refusal_lab.patching.heads import head_patch_hooks, patch_heads
from refusal_lab.run.config import DIRECTIONS, RunConfig
from refusal_lab.run.step import RunContext, Step
from refusal_lab.run.steps.baseline import means
from refusal_lab.run.steps.patch import mean_normalised, step_name
from refusal_lab.stats import summary

RANKED = 20
"""How many top heads the record lists (selected heads are all listed)."""


def compute(ctx: RunContext) -> dict:
    inputs, cfg, model = ctx.inputs, ctx.cfg, ctx.model
    h_mean, s_mean = means(ctx.records["baseline"])
    values = mean_normalised(ctx.records[step_name("heads", "sufficiency")]["per_pair"], s_mean, h_mean)  # [L, H]
    flat, H = values.flatten(), values.shape[1]
    every = [{"layer": int(i // H), "head": int(i % H), "value": float(flat[i])}
             for i in flat.argsort(descending=True)]
    selected = [r for r in every if r["value"] > cfg.threshold]
    cols = inputs.prompts.resolve_positions(cfg.heads_position)
    out = {"threshold": cfg.threshold, "position": cfg.heads_position, "cols": cols,
           "selected": selected, "ranked": every[:RANKED], "sufficiency": None, "generations": []}
    if not selected:
        return out
    src, rec = DIRECTIONS["sufficiency"]
    z = inputs.source_cache(src)
    receiver = inputs.receiver(rec)
    pairs = [(s["layer"], s["head"]) for s in selected]
    patched = patch_heads(model, receiver, z, pairs, cols, inputs.metric, cfg.max_rows)
    out["sufficiency"] = float(mean_normalised(patched, s_mean, h_mean))
    out["sufficiency_per_pair"] = patched
    if cfg.generate_tokens:
        hooks = head_patch_hooks(z, pairs, cols)
        b = inputs.batches[rec]
        base = model.generate(b.ids, b.mask, max_new_tokens=cfg.generate_tokens)
        pat = model.generate(b.ids, b.mask, max_new_tokens=cfg.generate_tokens, fwd_hooks=hooks)
        dec = lambda t: model.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
        out["generations"] = [{"object": o, "baseline": dec(x), "patched": dec(y)}
                              for o, x, y in zip(inputs.prompts.harmless_objects, base, pat)]
    return out


def publish(ctx: RunContext) -> dict:
    heads = ctx.records["heads"]
    h_mean, s_mean = means(ctx.records["baseline"])
    out = {k: v for k, v in heads.items() if not k.startswith("_") and k != "sufficiency_per_pair"}
    per = heads.get("sufficiency_per_pair")
    if heads["sufficiency"] is None or per is None:
        out.update(sufficiency_se=None, sufficiency_ci95=None, n_pairs=ctx.inputs.n_pairs)
    else:
        st = summary(normalise(per, s_mean, h_mean), seed=ctx.cfg.seed)
        out.update(sufficiency_se=st["se"], sufficiency_ci95=st["ci95"], n_pairs=st["n"])
    out["interpretable"] = bool(ctx.records["sanity"]["separates"])
    return {"heads": out}


def enabled(cfg: RunConfig) -> bool:
    return "heads" in cfg.grids and "sufficiency" in cfg.directions


STEP = Step("heads", compute, publish, enabled)
