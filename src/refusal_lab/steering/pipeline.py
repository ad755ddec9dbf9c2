"""The steering part of ``refusal-lab run``: three resumable steps on top of the replication.

``direction``   the paper's direction selection (Arditi et al. 2024): difference-in-means candidates
                at every layer x end-of-instruction column on *train* instructions, scored on *val*
                instructions (bypass, induce, KL), filtered, the lowest bypass chosen.
``steering``    alpha sweeps. (a) The selected direction on the *val* instructions: +alpha on harmless
                (induce), -alpha and directional ablation on harmful (suppress) — refusal rate of
                greedy completions and mean refusal log-odds. (b) The replication's two vectors on its
                own object prompts: the object-prompt difference vector and the refusal heads'
                contribution vector, added to harmless objects (+alpha) and subtracted from harmful
                ones (-alpha), normalised refusal metric and refusal rate per alpha.
``evaluation``  held-out *test* instructions (never used for choices): refusal rate of harmless
                prompts with the direction added (alpha chosen on val) and of harmful prompts with the
                direction ablated / subtracted, each beside its baseline, with the number of
                prompts, the refusals counted and Wilson 95 % intervals; KL and cross-entropy on
                harmless prompts, the damage each edit does.

Every choice (layer, column, alpha) is made on train/val splits, so the test rates are honest.
Vectors are saved as safetensors under ``vectors/``. Each step shows one progress bar on stderr
(``progress=False`` silences it). :func:`select_refusal_direction` is the one call path of the
selection (also ``refusal-lab abliterate --select``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from refusal_lab.prompts import build_instruction_prompts, load_instructions
from refusal_lab.prompts.builder import eoi_tokens
from refusal_lab.steering.evaluation import (
    REFUSAL_SUBSTRINGS, Judge, SubstringJudge, completion_cross_entropy, kl_on_harmless,
)
from refusal_lab.steering.interventions import ablation_hooks, addition_hooks
from refusal_lab.steering.selection import SelectionResult, select_direction
from refusal_lab.steering.sweep import (
    alpha_sweep, evaluate_hooks, n_batches, progress_bar, rate_ci95, sweep_units,
)
from refusal_lab.steering.vectors import diff_in_means, head_vector
from refusal_lab.stats import mean_se

__all__ = ["InstructionSelection", "SteeringSettings", "choose_alpha", "direction_step", "evaluation_step",
           "select_refusal_direction", "steering_step"]


@dataclass
class SteeringSettings:
    """Sizes and grids of the steering steps (the run's config fields ``steering_*``)."""

    n_train: int = 32
    n_val: int = 16
    n_test: int = 50
    alphas: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 3.0)
    object_alphas: Sequence[float] = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    max_new_tokens: int = 16
    kl_max: float = 0.1
    max_layer_frac: float = 0.8
    batch_size: int = 16
    seed: int = 0
    n_samples: int = 3
    judge: Judge = field(default_factory=SubstringJudge)
    judge_name: str | None = None  # how results name the judge (e.g. the run config's ``judge``)


def _instructions(split: str, n: int, seed: int) -> dict[str, list[str]]:
    """``n`` seeded harmful and harmless instructions of ``split`` (fewer if the split is smaller)."""
    return {k: load_instructions(split, k, n=min(n, len(load_instructions(split, k))), seed=seed)
            for k in ("harmful", "harmless")}


# ------------------------------------------------------------------------------------ direction

@dataclass
class InstructionSelection:
    """:func:`select_refusal_direction`'s result: the selection and the instructions it used."""

    result: SelectionResult
    train: dict[str, list[str]]
    val: dict[str, list[str]]
    eoi: list[str]

    @property
    def position_token(self) -> str | None:
        p, eoi = self.result.position, self.eoi
        return eoi[p] if eoi and -len(eoi) <= p < 0 else None


def select_refusal_direction(model, s: SteeringSettings, progress: bool = True) -> InstructionSelection:
    """The run's direction selection: :func:`select_direction` over every layer and end-of-instruction
    column, ``s.n_train`` train and ``s.n_val`` val instructions per side (seed ``s.seed``), the
    filters ``s.kl_max`` / ``s.max_layer_frac`` and the relaxing fallback (``on_empty="best"``) when
    every candidate is filtered out. ``refusal-lab run`` (:func:`direction_step`) and
    ``refusal-lab abliterate --select`` both call this."""
    tok = model.tokenizer
    train, val = _instructions("train", s.n_train, s.seed), _instructions("val", s.n_val, s.seed)
    enc = {(split, k): build_instruction_prompts(tok, v[k]) for split, v in (("train", train), ("val", val))
           for k in ("harmful", "harmless")}
    eoi = eoi_tokens(tok)
    positions = list(range(-max(len(eoi), 1), 0))  # the end-of-instruction columns
    res = select_direction(model, enc["train", "harmful"], enc["train", "harmless"], enc["val", "harmful"],
                           enc["val", "harmless"], positions=positions,
                           kl_max=s.kl_max, max_layer_frac=s.max_layer_frac, batch_size=s.batch_size,
                           on_empty="best", progress=progress)
    return InstructionSelection(res, train, val, eoi)


def direction_step(model, s: SteeringSettings, save_vector: Callable[[str, torch.Tensor, dict], None],
                   progress: bool = True) -> dict:
    """Select the refusal direction; returns the ``direction`` results entry (JSON-ready).

    ``filters`` holds the filters actually applied (:func:`~refusal_lab.steering.selection.applied_filters`:
    after a fallback ``induce_min`` is the unsteered harmless val log-odds, or None and ``kl_max``
    None when only the layer filter was kept; ``filters["stage"]`` names the stage, one of
    :data:`~refusal_lab.steering.selection.STAGES`)."""
    sel = select_refusal_direction(model, s, progress=progress)
    res, train, val, eoi = sel.result, sel.train, sel.val, sel.eoi
    meta = {"model": model.cfg.model_name, "layer": res.layer, "position": res.position,
            "site": "hook_resid_pre", "dataset": f"instructions train ({len(train['harmful'])} harmful, "
                                                  f"{len(train['harmless'])} harmless, seed {s.seed})",
            "kind": "difference-in-means"}
    save_vector("direction", res.direction, meta)
    save_vector("direction_candidates", res.candidates, {"positions": list(res.positions), "kind": "candidates [L, P, d]"})
    return {
        "layer": res.layer, "position": res.position,
        "position_token": sel.position_token,
        "site": f"blocks.{res.layer}.hook_resid_pre", "norm": float(res.direction.norm()),
        "bypass": res.bypass, "induce": res.induce, "kl": res.kl,
        "baseline": {"harmful_val_log_odds": res.baseline["harmful"], "harmless_val_log_odds": res.baseline["harmless"]},
        "filters": dict(res.filters),
        "fallback": res.fallback,
        "n_train": {k: len(v) for k, v in train.items()}, "n_val": {k: len(v) for k, v in val.items()},
        "positions": list(res.positions), "eoi_tokens": eoi,
        "table": res.table,
        "note": "bypass = mean refusal log-odds of harmful val prompts under directional ablation (lower is better); "
                "induce = that of harmless val prompts with the direction added at its layer; kl = KL(base || ablated) "
                "of harmless val prompts' next-token distribution.",
    }


def choose_alpha(rows: Sequence[dict], target: float = 0.5) -> tuple[float, str]:
    """The smallest positive alpha whose induce refusal rate on val reaches ``target``, else the one
    with the highest rate (ties: the smallest alpha)."""
    pos = [r for r in rows if r["alpha"] > 0 and r.get("induce_refusal_rate") is not None]
    if not pos:
        return 1.0, "no positive alpha in the sweep; alpha 1 (the raw difference-in-means vector)"
    hit = [r for r in pos if r["induce_refusal_rate"] >= target]
    if hit:
        a = min(r["alpha"] for r in hit)
        return a, f"smallest alpha whose harmless val refusal rate reaches {target:g}"
    best = max(pos, key=lambda r: (r["induce_refusal_rate"], -r["alpha"]))
    return best["alpha"], f"no alpha reached {target:g} on val; the one with the highest harmless val refusal rate"


# ------------------------------------------------------------------------------------- steering

def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@torch.no_grad()
def _object_sweep(model, batches, metric_fn, harmful_mean, harmless_mean, vector, layer, alphas, s: SteeringSettings,
                  objects, bar=None) -> dict:
    """+alpha on harmless objects, -alpha on harmful objects: normalised metric and refusal rate.

    Per side and alpha: ``{side}_metric`` (mean over the objects) and ``{side}_metric_se`` (its
    standard error over the objects), ``{side}_normalised`` and ``{side}_normalised_se`` (= metric SE
    / |harmful - harmless|, the baselines held fixed), ``{side}_n`` (objects), and with generation
    ``{side}_refusal_fraction`` with its Wilson interval ``{side}_refusal_fraction_ci95``.
    ``bar.update(1)`` per (alpha, side)."""
    rows, samples = [], []
    gap = harmful_mean - harmless_mean
    for alpha in alphas:
        row = {"alpha": float(alpha)}
        for side, sign in (("harmless", 1.0), ("harmful", -1.0)):
            ids, mask = batches[side]
            hooks = addition_hooks(vector, layer, sign * alpha) if alpha else []
            logits = model(ids, mask, fwd_hooks=hooks, logits="last").float()
            values = metric_fn(logits).reshape(-1).to(torch.float64)
            mean, se = mean_se(values)
            score, se = float(mean), float(se)
            row[f"{side}_metric"] = score
            row[f"{side}_metric_se"] = _finite_or_none(se)
            row[f"{side}_normalised"] = (score - harmless_mean) / gap
            row[f"{side}_normalised_se"] = _finite_or_none(se / abs(gap))
            row[f"{side}_n"] = int(values.numel())
            if s.max_new_tokens:
                new = model.generate(ids, mask, max_new_tokens=s.max_new_tokens, fwd_hooks=hooks)
                texts = model.tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)
                refused = [bool(r) for r in s.judge(objects[side], texts)]
                k = sum(refused)
                row[f"{side}_refusal_fraction"] = k / len(refused)
                row[f"{side}_refusal_fraction_ci95"] = rate_ci95(k, len(refused))
                for o, t, r in list(zip(objects[side], texts, refused))[: s.n_samples]:
                    samples.append({"side": side, "alpha": float(alpha) * sign, "object": o, "completion": t, "refused": r})
            if bar is not None:
                bar.update(1)
        rows.append(row)
    return {"rows": rows, "samples": samples}


def steering_step(model, s: SteeringSettings, direction: dict, direction_vector: torch.Tensor, *,
                  object_batches: dict, objects: dict, metric_fn, harmful_mean: float, harmless_mean: float,
                  object_position: int, heads: Sequence[tuple[int, int]] = (), heads_position: int | None = None,
                  save_vector: Callable[[str, torch.Tensor, dict], None], progress: bool = True) -> dict:
    """Alpha sweeps of the selected direction (val instructions) and of the replication's vectors (objects).

    One progress bar (stderr, ``progress=False`` silences it) over every unit: each batch of val
    prompts of the alpha sweep (forward + generation) and each (vector, alpha, side) of the object
    sweeps."""
    layer = direction["layer"]
    val = _instructions("val", s.n_val, s.seed)
    alphas, object_alphas = list(s.alphas), list(s.object_alphas)
    n_vectors = 2 if heads else 1
    total = (sweep_units(len(alphas), len(val["harmless"]), len(val["harmful"]), s.batch_size, ablate=True)
             + n_vectors * len(object_alphas) * 2)
    bar = progress_bar(total, "steering: val alpha sweep", progress)
    try:
        sweep = alpha_sweep(model, direction_vector.to(model.dtype), layer, alphas, val["harmless"], val["harmful"],
                            positions="all", ablate=True, judge=s.judge, max_new_tokens=s.max_new_tokens,
                            batch_size=s.batch_size, n_samples=s.n_samples, bar=bar)
        alpha, why = choose_alpha(sweep["rows"])
        out = {
            "instructions": {
                "vector": "selected direction", "layer": layer, "positions": "all", "split": "val",
                "n_harmless": len(val["harmless"]), "n_harmful": len(val["harmful"]),
                "rows": sweep["rows"], "ablation": sweep["ablation"], "samples": sweep["samples"],
                "chosen_alpha": alpha, "chosen_alpha_reason": why,
            },
            "objects": {},
        }
        # The replication's vectors, on its own object prompts, added at the selected layer.
        ids_h, mask_h = object_batches["harmful"]
        ids_s, mask_s = object_batches["harmless"]
        vectors = {"difference": (diff_in_means(model, ids_h, mask_h, ids_s, mask_s, layer=layer,
                                                position=object_position, batch_size=s.batch_size), layer,
                                  f"object prompts, blocks.{layer}.hook_resid_pre at column {object_position}")}
        if heads:
            last_layer = max(l for l, _ in heads)
            add_layer = min(last_layer + 1, model.cfg.n_layers - 1)
            hv = head_vector(model, ids_h, mask_h, ids_s, mask_s, heads=list(heads),
                             position=heads_position if heads_position is not None else -1, batch_size=s.batch_size)
            vectors["heads"] = (hv, add_layer, f"{len(heads)} refusal heads' summed outputs at column {heads_position}, "
                                               f"added at blocks.{add_layer}.hook_resid_pre")
        for name, (vec, at, desc) in vectors.items():
            bar.set_description(f"steering: {name} vector on objects")
            save_vector(f"objects_{name}", vec, {"model": model.cfg.model_name, "layer": at, "kind": name,
                                                 "description": desc})
            res = _object_sweep(model, object_batches, metric_fn, harmful_mean, harmless_mean, vec.to(model.dtype), at,
                                object_alphas, s, objects, bar=bar)
            out["objects"][name] = {"description": desc, "layer": at, "norm": float(vec.norm()), **res}
    finally:
        bar.close()
    return out


# ----------------------------------------------------------------------------------- evaluation

def evaluation_step(model, s: SteeringSettings, direction: dict, direction_vector: torch.Tensor, alpha: float,
                    progress: bool = True) -> dict:
    """Held-out test refusal rates with baselines, and KL / cross-entropy on harmless prompts.

    Each rate entry: ``value``, ``k`` (refusals counted), ``ci95`` (Wilson 95 % of ``value``), ``n``,
    ``baseline``, ``baseline_k``, ``baseline_ci95``, the refusal scores and the intervention. One
    progress bar (stderr, ``progress=False`` silences it) over the batches of the five
    generate-and-judge runs and the four damage computations."""
    layer = direction["layer"]
    test = _instructions("test", s.n_test, s.seed)
    v = direction_vector.to(model.dtype)
    add = addition_hooks(v, layer, alpha, "all")
    sub = addition_hooks(v, layer, -alpha, "all")
    abl = ablation_hooks(model, direction_vector)
    settings = {"harmless_baseline": ("harmless", []), "harmless_added": ("harmless", add),
                "harmful_baseline": ("harmful", []), "harmful_ablated": ("harmful", abl),
                "harmful_subtracted": ("harmful", sub)}
    damage_edits = (("ablation", abl), ("addition", add))
    total = sum(n_batches(len(test[side]), s.batch_size) for side, _ in settings.values()) + 2 * len(damage_edits)
    bar = progress_bar(total, "evaluation", progress)
    kw = dict(judge=s.judge, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, bar=bar)
    try:
        runs = {}
        for key, (side, hooks) in settings.items():
            bar.set_description(f"evaluation: {key.replace('_', ' ')}")
            runs[key] = evaluate_hooks(model, test[side], hooks, **kw)
        n_dmg = min(len(test["harmless"]), 16)
        ids, mask = build_instruction_prompts(model.tokenizer, test["harmless"][:n_dmg])
        damage = {}
        for name, hooks in damage_edits:
            bar.set_description(f"evaluation: damage of the {name}")
            ce = completion_cross_entropy(model, ids, mask, hooks, max_new_tokens=s.max_new_tokens,
                                          batch_size=s.batch_size)
            bar.update(1)
            kl = kl_on_harmless(model, ids, mask, hooks, batch_size=s.batch_size)
            bar.update(1)
            damage[name] = {"kl_harmless": kl, **ce, "n": n_dmg}
    finally:
        bar.close()

    def rate(key, base_key, what):
        r, b = runs[key], runs[base_key]
        return {"value": r["refusal_rate"], "k": r["k"], "ci95": r["ci95"], "n": r["n"],
                "baseline": b["refusal_rate"], "baseline_k": b["k"], "baseline_ci95": b["ci95"],
                "refusal_score": r["refusal_score"], "baseline_refusal_score": b["refusal_score"], "intervention": what}

    samples = []
    for key, instr in (("harmless_added", test["harmless"]), ("harmful_ablated", test["harmful"]),
                       ("harmful_baseline", test["harmful"]), ("harmless_baseline", test["harmless"])):
        for ins, c, r in list(zip(instr, runs[key]["completions"], runs[key]["refused"]))[: max(s.n_samples, 5)]:
            samples.append({"setting": key, "instruction": ins, "completion": c, "refused": r})
    return {
        "split": "test", "judge": s.judge_name or type(s.judge).__name__, "max_new_tokens": s.max_new_tokens,
        "layer": layer, "alpha": alpha, "substrings": list(REFUSAL_SUBSTRINGS) if isinstance(s.judge, SubstringJudge) else None,
        "harmless_refusal_rate_added": rate("harmless_added", "harmless_baseline",
                                            f"add {alpha:g} x direction at blocks.{layer}.hook_resid_pre, every position"),
        "harmful_refusal_rate_ablated": rate("harmful_ablated", "harmful_baseline",
                                             "directional ablation from every residual write, every layer and position"),
        "harmful_refusal_rate_subtracted": rate("harmful_subtracted", "harmful_baseline",
                                                f"subtract {alpha:g} x direction at blocks.{layer}.hook_resid_pre"),
        "damage": damage,
        "samples": samples,
    }
