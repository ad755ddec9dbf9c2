"""``patch_<grid>_<direction>``: exact activation patching of one grid (cone engine), one step per
grid and direction — sufficiency patches harmful activations into harmless prompts, necessity the
reverse. The per-pair values are stored (``tensors/``) and published normalised (0 = harmless
baseline, 1 = harmful) with their SE, bootstrap interval and pair count.

``resid_post`` at layer l is ``resid_pre`` at layer l + 1 (one tensor), so when the ``resid_pre``
step ran first only the last layer's ``resid_post`` row is computed; the others are its rows
(:func:`reused_rows`; the step's record names them under ``reused``).

A long grid checkpoints its finished rows (``partial/``) and resumes from them; with an executor
(Ray) its shards are computed by other processes instead.
"""

from __future__ import annotations

from functools import partial

import torch

from refusal_lab.artifacts import save_tensors
from refusal_lab.metrics import NORMALIZED_METRIC_NOTE, normalise
from refusal_lab.patching.engine import GridSpec, patch_grid
from refusal_lab.run.config import DIRECTIONS, RunConfig
from refusal_lab.run.step import RunContext, Step
from refusal_lab.run.steps.baseline import means
from refusal_lab.stats import bootstrap_ci, mean_se

ARROWS = {"sufficiency": "harmful->harmless", "necessity": "harmless->harmful"}


def step_name(grid: str, direction: str) -> str:
    return f"patch_{grid}_{direction}"


def reused_rows(ctx: RunContext, grid: str, direction: str, spec: GridSpec) -> dict[int, torch.Tensor]:
    """Rows of ``grid`` that an earlier step already computed: ``resid_post`` at layer ``l`` is
    ``resid_pre`` at layer ``l + 1`` (the same tensor, so the same patch and the same cone), so every
    ``resid_post`` row but the last layer's is the ``resid_pre`` step's row ``l + 1`` (same columns).
    ``{row index in spec.layers: per-pair values [n_pairs, len(cols)]}``, empty when nothing is reused."""
    pre = ctx.records.get(step_name("resid_pre", direction)) if grid == "resid_post" else None
    if pre is None or list(pre["cols"]) != list(spec.cols):
        return {}
    per_pair, layers = torch.as_tensor(pre["per_pair"]), list(pre["layers"])
    return {a: per_pair[:, layers.index(l + 1)] for a, l in enumerate(spec.layers) if l + 1 in layers}


def compute(ctx: RunContext, grid: str, direction: str) -> dict:
    inputs = ctx.inputs
    src, rec = DIRECTIONS[direction]
    spec = inputs.grid_spec(grid)
    name = step_name(grid, direction)
    dist = None
    reused = reused_rows(ctx, grid, direction, spec)
    todo = GridSpec(grid, [l for a, l in enumerate(spec.layers) if a not in reused], spec.cols, spec.heads)
    vals = None
    if todo.layers and ctx.executor is not None:  # the same cells, computed by shards on other processes
        vals, dist = ctx.executor.patch_grid(inputs, grid, direction, todo, progress=ctx.progress)
    elif todo.layers:
        vals = patch_grid(inputs.model, inputs.receiver(rec), inputs.source_cache(src), todo, inputs.metric,
                          max_rows=ctx.cfg.max_rows, progress=ctx.progress, checkpoint=ctx.folder.partial_path(name))
    if reused:  # the grid's rows in order: the reused ones and those just computed
        computed = iter(vals.unbind(1) if vals is not None else ())
        vals = torch.stack([reused[a] if a in reused else next(computed) for a in range(len(spec.layers))], 1)
    save_tensors(ctx.folder.root / "tensors" / f"{name}.safetensors",
                 {"per_pair": vals}, {"grid": grid, "direction": direction, "layers": spec.layers,
                                      "cols": spec.cols if grid != "heads" else spec.heads})
    return {"per_pair": vals, "layers": spec.layers, "cols": spec.cols, "heads": spec.heads,
            **({"reused": {"from": step_name("resid_pre", direction), "layers": [spec.layers[a] for a in sorted(reused)]}}
               if reused else {}),
            **({"distributed": dist} if dist else {})}


def mean_normalised(per_pair, harmless: float, harmful: float) -> torch.Tensor:
    """Mean over pairs, then normalised, in the grid's own dtype (``[n_pairs, ...] -> [...]``)."""
    mean = torch.as_tensor(per_pair).mean(0)
    return normalise(mean, harmless, harmful, dtype=mean.dtype)


def uncertainty(per_pair, harmless: float, harmful: float, seed: int) -> dict:
    """``se`` (same shape as the grid's values), bootstrap ``ci95`` {low, high} and ``n_pairs`` of a grid."""
    norm = normalise(per_pair, harmless, harmful)
    _, se = mean_se(norm)
    low, high = bootstrap_ci(norm, seed=seed)
    return {"se": se, "ci95": {"low": low, "high": high}, "n_pairs": int(norm.shape[0])}


def entry(ctx: RunContext, grid: str, per_pair, method: str, direction: str = "sufficiency") -> dict:
    """One grid's published entry: normalised mean values with their uncertainty and provenance."""
    h_mean, s_mean = means(ctx.records["baseline"])
    cols = list(range(ctx.model.cfg.n_heads)) if grid == "heads" else ctx.inputs.col_labels()
    return {"rows": list(range(ctx.model.cfg.n_layers)), "cols": cols,
            "values": mean_normalised(per_pair, s_mean, h_mean),
            **uncertainty(per_pair, s_mean, h_mean, ctx.cfg.seed),
            "direction": ARROWS[direction], "method": method, "normalisation": NORMALIZED_METRIC_NOTE[direction],
            "interpretable": bool(ctx.records["sanity"]["separates"])}


def publish(ctx: RunContext, grid: str, direction: str) -> dict:
    data = ctx.records[step_name(grid, direction)]
    e = entry(ctx, grid, torch.as_tensor(data["per_pair"]), "exact", direction)
    out = {"patching": {grid: e} if direction == "sufficiency" else {"necessity": {grid: e}}}
    if data.get("distributed"):  # which workers computed which shard (absent for single-process steps)
        out["distributed"] = {step_name(grid, direction): data["distributed"]}
    return out


def steps(cfg: RunConfig) -> list[Step]:
    """One step per (direction, grid) of the config, directions outermost."""
    return [Step(step_name(g, d), partial(compute, grid=g, direction=d), partial(publish, grid=g, direction=d))
            for d in cfg.directions for g in cfg.grids]
