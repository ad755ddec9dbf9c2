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
(``progress=False`` silences it). The direction is chosen by the package's one policy
(:func:`refusal_lab.steering.selection.select_refusal_direction`, also behind
``refusal-lab abliterate --select``); the sweeps and the evaluation judge completions with the one
generate-and-judge loop (:func:`refusal_lab.steering.evaluation.evaluate_many`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from refusal_lab.prompts import build_instruction_prompts
from refusal_lab.steering.batching import instruction_sample, n_batches, progress_bar
from refusal_lab.steering.damage import edit_damage
from refusal_lab.steering.evaluation import REFUSAL_SUBSTRINGS, Judge, SubstringJudge, evaluate_many
from refusal_lab.steering.interventions import ablation_hooks, addition_hooks
from refusal_lab.steering.selection import DirectionPolicy, select_refusal_direction
from refusal_lab.steering.sweep import alpha_sweep, object_alpha_sweep, sweep_units
from refusal_lab.steering.vectors import cached_diff_in_means, cached_head_vector, diff_in_means, head_vector

__all__ = ["SteeringSettings", "choose_alpha", "direction_step", "evaluation_step", "steering_step"]


@dataclass
class SteeringSettings:
    """Sizes and grids of the steering steps (the run's config fields ``steering_*``); the direction
    fields default to :class:`~refusal_lab.steering.selection.DirectionPolicy`'s."""

    n_train: int = DirectionPolicy.n_train
    n_val: int = DirectionPolicy.n_val
    n_test: int = 50
    alphas: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 3.0)
    object_alphas: Sequence[float] = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    max_new_tokens: int = 16
    kl_max: float = DirectionPolicy.kl_max
    max_layer_frac: float = DirectionPolicy.max_layer_frac
    batch_size: int = 16
    seed: int = DirectionPolicy.seed
    n_samples: int = 3
    judge: Judge = field(default_factory=SubstringJudge)
    judge_name: str | None = None  # how results name the judge (e.g. the run config's ``judge``)
    exhaustive: bool = DirectionPolicy.exhaustive  # score every direction candidate exactly
    top_k: int = DirectionPolicy.top_k  # else the top_k by the first-order bypass estimate

    def direction_policy(self) -> DirectionPolicy:
        """The direction policy these settings select with (the policy's fallback included)."""
        return DirectionPolicy(n_train=self.n_train, n_val=self.n_val, seed=self.seed, kl_max=self.kl_max,
                               max_layer_frac=self.max_layer_frac, exhaustive=self.exhaustive, top_k=self.top_k)


# ------------------------------------------------------------------------------------ direction

def direction_step(model, s: SteeringSettings, save_vector: Callable[[str, torch.Tensor, dict], None],
                   progress: bool = True) -> dict:
    """Select the refusal direction; returns the ``direction`` results entry (JSON-ready).

    ``filters`` holds the filters actually applied (:func:`~refusal_lab.steering.selection.applied_filters`:
    after a fallback ``induce_min`` is the unsteered harmless val log-odds, or None and ``kl_max``
    None when only the layer filter was kept; ``filters["stage"]`` names the stage, one of
    :data:`~refusal_lab.steering.selection.STAGES`)."""
    sel = select_refusal_direction(model, s.direction_policy(), batch_size=s.batch_size, progress=progress)
    res, train, val, eoi = sel.result, sel.train, sel.val, sel.eoi
    meta = {"model": model.cfg.model_name, "layer": res.layer, "position": res.position,
            "site": "hook_resid_pre", "dataset": f"instructions train ({len(train['harmful'])} harmful, "
                                                  f"{len(train['harmless'])} harmless, seed {s.seed})",
            "kind": "difference-in-means"}
    save_vector("direction", res.direction, meta)
    save_vector("direction_candidates", res.candidates, {"positions": list(res.positions), "kind": "candidates [L, P, d]"})
    for side in ("harmful", "harmless"):  # the train prompts' residuals at the chosen site (geometry reuses them)
        if f"train_{side}" in res.per_prompt:
            save_vector(f"direction_train_{side}", res.per_prompt[f"train_{side}"],
                        {**meta, "kind": f"{side} train prompts' residuals [n, d] at the direction's site"})
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
        "selection": dict(res.agreement),
        "_val_log_odds": {f"harmful_{k}": res.per_prompt[f"harmful_{k}"].tolist() for k in ("baseline", "ablated")
                          if f"harmful_{k}" in res.per_prompt},
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

def steering_step(model, s: SteeringSettings, direction: dict, direction_vector: torch.Tensor, *,
                  object_batches: dict, objects: dict, metric_fn, harmful_mean: float, harmless_mean: float,
                  object_position: int, heads: Sequence[tuple[int, int]] = (), heads_position: int | None = None,
                  save_vector: Callable[[str, torch.Tensor, dict], None], progress: bool = True,
                  object_cache: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> dict:
    """Alpha sweeps of the selected direction (val instructions) and of the replication's vectors (objects).

    ``object_cache``: ``{side: cache}`` of a clean run of each side's object prompts (the run's
    patching sources hold ``blocks.{l}.hook_resid_pre`` and ``blocks.{l}.attn.hook_z`` of every
    layer): the two vectors are read from it instead of four new forwards of the object prompts.

    One progress bar (stderr, ``progress=False`` silences it) over every unit: each batch of val
    prompts of the alpha sweep (forward + generation) and each (vector, alpha, side) of the object
    sweeps."""
    layer = direction["layer"]
    val = instruction_sample("val", s.n_val, s.seed)
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
        cached = object_cache is not None and all(side in object_cache for side in ("harmful", "harmless"))
        if cached:
            diff = cached_diff_in_means(object_cache["harmful"], object_cache["harmless"], layer, object_position)
        else:
            diff = diff_in_means(model, ids_h, mask_h, ids_s, mask_s, layer=layer, position=object_position,
                                 batch_size=s.batch_size)
        vectors = {"difference": (diff, layer, f"object prompts, blocks.{layer}.hook_resid_pre at column {object_position}")}
        if heads:
            last_layer = max(l for l, _ in heads)
            add_layer = min(last_layer + 1, model.cfg.n_layers - 1)
            hpos = heads_position if heads_position is not None else -1
            if cached:
                hv = cached_head_vector(model, object_cache["harmful"], object_cache["harmless"], list(heads), hpos)
            else:
                hv = head_vector(model, ids_h, mask_h, ids_s, mask_s, heads=list(heads), position=hpos,
                                 batch_size=s.batch_size)
            vectors["heads"] = (hv, add_layer, f"{len(heads)} refusal heads' summed outputs at column {heads_position}, "
                                               f"added at blocks.{add_layer}.hook_resid_pre")
        unsteered: dict = {}  # the alpha = 0 object runs, the same for every vector
        for name, (vec, at, desc) in vectors.items():
            bar.set_description(f"steering: {name} vector on objects")
            save_vector(f"objects_{name}", vec, {"model": model.cfg.model_name, "layer": at, "kind": name,
                                                 "description": desc})
            res = object_alpha_sweep(model, vec.to(model.dtype), at, object_alphas, object_batches, objects,
                                     metric_fn=metric_fn, harmful_mean=harmful_mean, harmless_mean=harmless_mean,
                                     judge=s.judge, max_new_tokens=s.max_new_tokens, n_samples=s.n_samples, bar=bar,
                                     unsteered=unsteered)
            out["objects"][name] = {"description": desc, "layer": at, "norm": float(vec.norm()), **res}
    finally:
        bar.close()
    return out


# ----------------------------------------------------------------------------------- evaluation

def evaluation_step(model, s: SteeringSettings, direction: dict, direction_vector: torch.Tensor, alpha: float,
                    progress: bool = True, record_resid: bool = False) -> dict:
    """Held-out test refusal rates with baselines, and KL / cross-entropy on harmless prompts.

    ``record_resid``: the unedited prefill of each side's test prompts also keeps their
    ``blocks.{l}.hook_resid_pre`` at every layer at the direction's column, returned (float64
    ``[n, n_layers, d]``, prompt order) under ``"_test_resid"`` ``{side: tensor}`` for the caller
    to store (the geometry step's separation curve reads them instead of running the prompts again).

    Each rate entry: ``value``, ``k`` (refusals counted), ``ci95`` (Wilson 95 % of ``value``), ``n``,
    ``baseline``, ``baseline_k``, ``baseline_ci95``, the refusal scores and the intervention. One
    progress bar (stderr, ``progress=False`` silences it) over the batches of the five
    generate-and-judge runs and the four damage computations."""
    layer = direction["layer"]
    test = instruction_sample("test", s.n_test, s.seed)
    v = direction_vector.to(model.dtype)
    add = addition_hooks(v, layer, alpha, "all")
    sub = addition_hooks(v, layer, -alpha, "all")
    abl = ablation_hooks(model, direction_vector)
    settings = {"harmless_baseline": ("harmless", []), "harmless_added": ("harmless", add),
                "harmful_baseline": ("harmful", []), "harmful_ablated": ("harmful", abl),
                "harmful_subtracted": ("harmful", sub)}
    shown = ("harmless_added", "harmful_ablated", "harmful_baseline", "harmless_baseline")
    n_shown = max(s.n_samples, 5)
    damage_edits = {"ablation": abl, "addition": add}
    total = sum(n_batches(len(test[side]), s.batch_size) for side, _ in settings.values()) + 2 * len(damage_edits)
    bar = progress_bar(total, "evaluation", progress)
    recording = record_resid and direction["position"] < 0  # a column from the end: the same token in every row
    try:
        runs, jobs = {}, []
        for side in ("harmless", "harmful"):  # a side's settings at once: one tokenization, shared lower blocks
            keys = [k for k, (sd, _) in settings.items() if sd == side]
            record = (f"{side}_baseline", range(model.cfg.n_layers), direction["position"]) if recording else None
            jobs.append(dict(prompts=test[side], settings={k: settings[k][1] for k in keys},
                             full_texts={k: n_shown if k in shown else 0 for k in keys}, record=record,
                             batch_size=s.batch_size))
        bar.set_description("evaluation: harmless baseline, added; harmful baseline, ablated, subtracted")
        for got in evaluate_many(model, jobs, judge=s.judge, max_new_tokens=s.max_new_tokens, bar=bar):
            runs.update(got)  # both sides' rows decoded together
        n_dmg = min(len(test["harmless"]), 16)
        ids, mask = build_instruction_prompts(model.tokenizer, test["harmless"][:n_dmg])
        bar.set_description(f"evaluation: damage of the {', '.join(damage_edits)}")
        damage = {name: {"kl_harmless": d["kl"], "ce_baseline": d["ce_baseline"], "ce_edited": d["ce_edited"],
                         "n_tokens": d["n_tokens"], "n": n_dmg}
                  for name, d in edit_damage(model, ids, mask, damage_edits, max_new_tokens=s.max_new_tokens,
                                             batch_size=s.batch_size, bar=bar).items()}
    finally:
        bar.close()

    def rate(key, base_key, what):
        r, b = runs[key], runs[base_key]
        return {"value": r.rate, "k": r.k, "ci95": r.ci95, "n": r.n,
                "baseline": b.rate, "baseline_k": b.k, "baseline_ci95": b.ci95,
                "refusal_score": r.score, "baseline_refusal_score": b.score, "intervention": what}

    samples = [sample for key in ("harmless_added", "harmful_ablated", "harmful_baseline", "harmless_baseline")
               for sample in runs[key].samples(n_shown, {"setting": key})]
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
    } | ({"_test_resid": {side: runs[f"{side}_baseline"].resid for side in ("harmless", "harmful")}} if recording else {})
