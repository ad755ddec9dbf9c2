"""`refusal-lab run`: the Arditi & Obeso / Gemma 2 replication end to end, resumable.

Steps (each writes ``steps/<step>.json`` atomically when it finishes, and is skipped when the run
is started again unless ``force``):

``baseline``     prompts, refusal/compliance tokens, scores per object, top next tokens
``dla``          direct logit attribution: accumulated residual, components, heads
``patch_<grid>`` exact activation patching (cone engine) of every grid, per direction
``attribution``  attribution patching of every grid and its agreement with the exact grids
``heads``        refusal heads above a threshold, their joint sufficiency, patched generations
``direction``    refusal-direction selection on instruction train/val splits (``steering/pipeline.py``)
``steering``     alpha sweeps: the direction on val instructions; the object-prompt difference vector
                 and the refusal heads' vector on the object prompts
``evaluation``   held-out test refusal rates (added / ablated / subtracted, baselines beside them), KL, CE

Then ``results.json``, tidy tables (``tables/*.csv``), figures and ``report.html`` are assembled.
Pairing: harmful object i is paired with harmless object i (as in the original).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd
import torch

from refusal_lab import __version__
from refusal_lab.artifacts import read_json, save_tensors, write_csv, write_json
from refusal_lab.errors import ConfigError, RefusalLabError
from refusal_lab.memory import check_run_memory
from refusal_lab.metrics import (
    NORMALIZED_METRIC_NOTE, default_refusal_token_ids, propose_token_pair, refusal_log_odds, resolve_refusal_tokens,
    resolve_single_token,
)
from refusal_lab.models.edits import Replace
from refusal_lab.models.hooked import HookedChatModel
from refusal_lab.patching.attribution import agreement, attribution_grid, receiver_gradients, receiver_gradients_qk
from refusal_lab.patching.engine import (
    GRIDS, Batch, Edit, GridSpec, LogitDiff, Receiver, Row, patch_grid, run_rows, source_sites,
)
from refusal_lab.prompts import build_object_prompts, load_objects
from refusal_lab.stats import bootstrap_ci, mean_se, summary, wilson_interval

DIRECTIONS = {
    "sufficiency": ("harmful", "harmless"),  # (source, receiver): harmful -> harmless
    "necessity": ("harmless", "harmful"),
}


@dataclass
class RunConfig:
    """Everything that determines a run's numbers (its hash guards the run folder)."""

    model: str | None = None
    dtype: str = "float32"
    device: str | None = None
    objects: str | None = None
    template: str | None = None
    mode: str = "single_token"
    refusal: str = "Sorry"
    compliance: str = "Sure"
    grids: list[str] = field(default_factory=lambda: list(GRIDS))
    directions: list[str] = field(default_factory=lambda: ["sufficiency"])
    heads_position: str = "post_obj"
    threshold: float = 0.005
    attribution: bool = True
    generate_tokens: int = 24
    max_rows: int = 256
    seed: int = 0
    steering: bool = True
    steering_n_train: int = 32
    steering_n_val: int = 16
    steering_n_test: int = 50
    steering_alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 3.0])
    steering_object_alphas: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    steering_object_position: str | int = "last"
    steering_tokens: int = 16
    kl_max: float = 0.1
    max_layer_frac: float = 0.8
    judge: str = "substring"

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "RunConfig":
        known = {f.name: f for f in fields(cls)}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"Unknown key '{key}' in {where}; valid keys are {', '.join(known)}.")
        cfg = cls(**data)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        checks = {
            "dtype": lambda v: v in ("float32", "bfloat16", "float16"),
            "mode": lambda v: v in ("single_token", "align"),
            "threshold": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "attribution": lambda v: isinstance(v, bool),
            "generate_tokens": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "max_rows": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
            "seed": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "grids": lambda v: isinstance(v, list) and all(g in GRIDS for g in v),
            "directions": lambda v: isinstance(v, list) and v and all(isinstance(d, str) and d in DIRECTIONS for d in v),
            "refusal": lambda v: isinstance(v, str) and v,
            "compliance": lambda v: isinstance(v, str) and v,
            "heads_position": lambda v: isinstance(v, (str, int)) and not isinstance(v, bool),
            "steering": lambda v: isinstance(v, bool),
            **{k: (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0)
               for k in ("steering_n_train", "steering_n_val", "steering_n_test")},
            **{k: (lambda v: isinstance(v, list) and v and all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                                                 and a >= 0 for a in v))
               for k in ("steering_alphas", "steering_object_alphas")},
            "steering_object_position": lambda v: isinstance(v, (str, int)) and not isinstance(v, bool),
            "steering_tokens": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "kl_max": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
            "max_layer_frac": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
            "judge": lambda v: isinstance(v, str) and v.strip() != "",
        }
        hints = {"grids": f"a list from {', '.join(GRIDS)}", "directions": "a list from sufficiency, necessity",
                 "steering_alphas": "a non-empty list of alphas >= 0", "steering_object_alphas": "a non-empty list of alphas >= 0",
                 "max_layer_frac": "a number in (0, 1]", "kl_max": "a positive number",
                 "judge": "'substring', 'self' or a judge model (hub id or folder)",
                 "dtype": "float32, bfloat16 or float16", "mode": "single_token or align"}
        for key, ok in checks.items():
            if not ok(getattr(self, key)):
                raise ConfigError(
                    f"Invalid value {getattr(self, key)!r} for '{key}' in {where}; expected {hints.get(key, 'a valid ' + key)}."
                )
        for key in ("model", "device", "objects", "template"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"Invalid value {v!r} for '{key}' in {where}; expected a string.")

    def digest(self) -> str:
        keep = {k: v for k, v in asdict(self).items() if k not in ("device", "max_rows")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def model_slug(name: str | None) -> str:
    base = (name or "Qwen2.5-Coder-0.5B-Instruct").rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)


class RunFolder:
    """A run folder: config guard, finished-step records, artifacts."""

    def __init__(self, root: Path, config: RunConfig, force: bool = False):
        self.root = Path(root)
        self.config = config
        self.force = force
        self.root.mkdir(parents=True, exist_ok=True)
        guard = self.root / "run_config.json"
        if guard.exists():
            old = read_json(guard)
            if old.get("digest") != config.digest():
                if not force:
                    raise ConfigError(
                        f"{self.root} holds a run of another model or config (model {old.get('config', {}).get('model')!r}); "
                        "choose another --out folder or pass --force to overwrite it."
                    )
                # Overwriting another run: drop its steps and artifacts (not only the steps), so no
                # table, tensor, vector or figure of the old config survives next to the new run's (its
                # within-grid checkpoints go below, with every --force).
                for sub in ("steps", "tensors", "tables", "figures", "vectors"):
                    for p in (self.root / sub).glob("*"):
                        if p.is_file():
                            p.unlink()
                for name in ("results.json", "report.html"):
                    (self.root / name).unlink(missing_ok=True)
        if force:  # recompute everything: no within-grid checkpoint is reused either
            for p in (self.root / "partial").glob("*"):
                if p.is_file():
                    p.unlink()
        write_json(guard, {"digest": config.digest(), "config": asdict(config)})

    def step_path(self, step: str) -> Path:
        return self.root / "steps" / f"{step}.json"

    def done(self, step: str) -> dict | None:
        p = self.step_path(step)
        return None if self.force or not p.exists() else read_json(p)

    def finish(self, step: str, data: dict, seconds: float) -> dict:
        data = dict(data, _seconds=seconds)
        write_json(self.step_path(step), data)
        return data


def _normalise(values: torch.Tensor, harmless: float, harmful: float) -> torch.Tensor:
    """Mean over pairs, then 0 = harmless baseline, 1 = harmful baseline."""
    return (values.mean(0) - harmless) / (harmful - harmless)


def _normalised_pairs(per_pair, harmless: float, harmful: float) -> torch.Tensor:
    """Per-pair metric normalised with the fixed (mean) baselines: 0 = harmless, 1 = harmful."""
    return (torch.as_tensor(per_pair, dtype=torch.float64) - harmless) / (harmful - harmless)


def _uncertainty(per_pair, harmless: float, harmful: float, seed: int) -> dict:
    """``se`` (same shape as the grid's values), bootstrap ``ci95`` {low, high} and ``n_pairs`` of a grid."""
    norm = _normalised_pairs(per_pair, harmless, harmful)
    _, se = mean_se(norm)
    low, high = bootstrap_ci(norm, seed=seed)
    return {"se": se, "ci95": {"low": low, "high": high}, "n_pairs": int(norm.shape[0])}


def _sufficiency_uncertainty(heads: dict, n_pairs: int, harmless: float, harmful: float, seed: int) -> dict:
    """SE, bootstrap interval and pair count of the refusal heads' joint sufficiency (None when no head was kept)."""
    per = heads.get("sufficiency_per_pair")
    if heads.get("sufficiency") is None or per is None:
        return {"sufficiency_se": None, "sufficiency_ci95": None, "n_pairs": n_pairs}
    st = summary(_normalised_pairs(per, harmless, harmful), seed=seed)
    return {"sufficiency_se": st["se"], "sufficiency_ci95": st["ci95"], "n_pairs": st["n"]}


def patching_summary(patching: dict) -> pd.DataFrame:
    """``tables/patching_summary.csv``: one row per grid cell with mean, SE, bootstrap interval and pair count."""
    entries = [(g, "sufficiency", e) for g, e in patching.items() if isinstance(e, dict) and "values" in e]
    entries += [(g, "necessity", e) for g, e in (patching.get("necessity") or {}).items()]
    entries += [(g, "sufficiency", e) for g, e in (patching.get("attribution") or {}).items()]
    recs = []
    for g, direction, e in entries:
        vals = torch.as_tensor(e["values"], dtype=torch.float64)
        se = torch.as_tensor(e["se"], dtype=torch.float64)
        lo = torch.as_tensor(e["ci95"]["low"], dtype=torch.float64)
        hi = torch.as_tensor(e["ci95"]["high"], dtype=torch.float64)
        for a, layer in enumerate(e["rows"]):
            for b, col in enumerate(e["cols"]):
                recs.append({"grid": g, "direction": direction, "method": e["method"], "layer": layer, "col": col,
                             "mean": float(vals[a, b]), "se": float(se[a, b]), "ci_low": float(lo[a, b]),
                             "ci_high": float(hi[a, b]), "n_pairs": e["n_pairs"]})
    return pd.DataFrame(recs, columns=["grid", "direction", "method", "layer", "col", "mean", "se", "ci_low",
                                       "ci_high", "n_pairs"])


SANITY_RULE = ("separates = the mean paired gap (harmful object i minus harmless object i, on the metric) is > 0 "
               "and the lower bound of its 95% bootstrap interval over pairs is > 0")
TOKEN_NOTE_RULE = ("note when the metric's refusal token has less than a quarter of the mean probability of the "
                   "most likely refusal onset on harmful prompts")


def sanity_check(harmful: dict, harmless: dict, tokenizer, tokens, seed: int = 0) -> dict:
    """The ``sanity`` entry of results.json from the baseline's per-prompt records of both sides."""
    h = torch.as_tensor(harmful["metric"], dtype=torch.float64)
    s = torch.as_tensor(harmless["metric"], dtype=torch.float64)
    n = min(len(h), len(s))
    gap = summary(h[:n] - s[:n], seed=seed)
    gap = {"mean": gap["mean"], "se": gap["se"], "ci95": gap["ci95"], "n_pairs": gap["n"]}
    onset_ids = [int(i) for i in harmful["onset_ids"]]
    dec = lambda i: tokenizer.decode([int(i)])  # noqa: E731
    k, m = sum(int(t) in onset_ids for t in harmful["top_id"]), len(harmful["top_id"])
    lo, hi = wilson_interval(k, m)
    onset = {"value": k / m if m else None, "k": k, "n": m, "ci95": [lo, hi],
             "onset_tokens": [dec(i) for i in onset_ids]}
    op = torch.as_tensor(harmful["onset_probs"], dtype=torch.float64).reshape(m, len(onset_ids)).mean(0)
    best = int(op.argmax())
    top = {"token": dec(onset_ids[best]), "id": onset_ids[best], "mean_prob": float(op[best])}
    ref = {"token": tokens.refusal_str, "id": tokens.refusal_id,
           "mean_prob": float(torch.as_tensor(harmful["refusal_prob"], dtype=torch.float64).mean())}
    separates = bool(gap["mean"] > 0 and gap["ci95"][0] > 0)
    metric = f"logit[{tokens.refusal_str}] - logit[{tokens.compliance_str}]"
    se = "nan" if gap["se"] != gap["se"] else f"{gap['se']:.2f}"
    nums = (f"gap {gap['mean']:.2f} ± {se}, 95% CI [{gap['ci95'][0]:.2f}, {gap['ci95'][1]:.2f}], "
            f"n = {n} pairs")
    onset_words = (f"{k} of {m} harmful prompts have a refusal onset as their top next token "
                   f"(fraction {onset['value']:.2f}, Wilson 95% CI [{lo:.2f}, {hi:.2f}])")
    if separates:
        sentence = (f"Sanity check passed: harmful prompts score higher than harmless ones on {metric} ({nums}); "
                    f"{onset_words}.")
        strict = ""
    else:
        sentence = (f"Warning: this model does not separate harmful from harmless prompts on {metric} ({nums}), "
                    f"and {onset_words}; the normalised patching values below are not interpretable. Try "
                    "--refusal auto or another refusal/compliance token pair.")
        strict = (f"This model does not separate harmful from harmless prompts on {metric} ({nums}), so --strict "
                  "stops the run before any patching; try --refusal auto or another refusal/compliance token pair.")
    note = None
    if separates and top["id"] != ref["id"] and ref["mean_prob"] < 0.25 * top["mean_prob"]:
        note = (f"Note: the metric's refusal token {ref['token']!r} has mean probability {ref['mean_prob']:.2f} on "
                f"harmful prompts, far below the model's most likely refusal onset {top['token']!r} "
                f"({top['mean_prob']:.2f}); the metric may miss how this model refuses (try --refusal "
                f"{top['token'].strip() or 'auto'!r} or --refusal auto).")
    return {"metric": metric, "gap": gap, "refusal_onset_fraction": onset, "refusal_token": ref,
            "top_refusal_onset": top, "separates": separates, "rule": SANITY_RULE, "sentence": sentence,
            "token_note": note, "token_note_rule": TOKEN_NOTE_RULE, "strict_message": strict}


class Replication:
    """Runs the steps on one loaded model (``model``) into one folder."""

    def __init__(self, model: HookedChatModel, config: RunConfig, out: Path | None, force: bool = False,
                 progress: bool = True, executor=None, strict: bool = False):
        """``out=None`` builds the inputs only (prompts, tokens, metric), no run folder: what a
        distributed worker needs. ``executor`` (e.g. :class:`refusal_lab.distributed.RayExecutor`)
        computes the ``patch_*`` steps' grids instead of this process. ``strict``: stop right after
        the baseline step (:class:`RefusalLabError`) when the sanity gate finds that the metric does
        not separate harmful from harmless prompts, instead of warning and going on."""
        torch.manual_seed(config.seed)
        self.executor = executor
        self.strict = strict
        self.model = model
        self.cfg = config
        self.progress = progress
        tok = model.tokenizer
        self.objects = load_objects(config.objects)
        self.prompts = build_object_prompts(tok, self.objects, template=config.template, mode=config.mode)
        dev = model.device
        self.batches = {s: Batch(self.prompts.ids(s).to(dev), self.prompts.mask(s).to(dev)) for s in ("harmful", "harmless")}
        self.token_candidates = None
        if "auto" in (config.refusal, config.compliance):
            # `auto`: propose the token(s) from the model's own next tokens on the two sets; a side
            # given explicitly (`--refusal Sorry --compliance auto`) is kept, only the other is proposed
            fixed = {k: None if v == "auto" else (resolve_single_token(tok, v), v)
                     for k, v in (("refusal", config.refusal), ("compliance", config.compliance))}
            with torch.no_grad():
                last = {s: model(b.ids, b.mask, logits="last") for s, b in self.batches.items()}
            self.tokens, self.token_candidates = propose_token_pair(tok, last["harmful"], last["harmless"], **fixed)
        else:
            self.tokens = resolve_refusal_tokens(tok, config.refusal, config.compliance)
        self.metric = LogitDiff(self.tokens.refusal_id, self.tokens.compliance_id)
        self.cols = list(range(self.prompts.obj_index, self.prompts.seq_len))
        if "heads" in config.grids:
            self.prompts.resolve_positions(config.heads_position)  # a bad label fails now, not after the grids
        if config.steering:
            self.prompts.resolve_positions(config.steering_object_position)
        # A run that clearly does not fit in memory fails now, not hours later.
        check_run_memory(model, len(self.prompts.harmful_objects), self.prompts.seq_len, config.max_rows,
                         sides=len(config.directions))
        # Only after every input is validated: a run that failed on bad input leaves no config guard behind.
        self.folder = RunFolder(out, config, force) if out is not None else None
        self.timings: dict[str, float] = {}
        self._receivers: dict[str, Receiver] = {}
        self._caches: dict[str, dict] = {}

    # ---------------------------------------------------------------- shared pieces
    def col_labels(self) -> list[str]:
        pos = self.prompts.positions
        return [f"{pos[c].label} {pos[c].token!r}" if pos[c].label != "obj" else "obj" for c in self.cols]

    def receiver(self, side: str) -> Receiver:
        if side not in self._receivers:
            self._receivers[side] = Receiver.record(self.model, self.batches[side], self.metric)
        return self._receivers[side]

    def source_cache(self, side: str):
        if side not in self._caches:
            b = self.batches[side]
            keep = lambda n: n.endswith(("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_z"))  # noqa: E731
            self._caches[side] = self.model.run_with_cache(b.ids, b.mask, names=keep, logits="none")[1]
        return self._caches[side]

    def grid_spec(self, grid: str) -> GridSpec:
        L, H = self.model.cfg.n_layers, self.model.cfg.n_heads
        if grid == "heads":
            return GridSpec(grid, list(range(L)), self.prompts.resolve_positions(self.cfg.heads_position), list(range(H)))
        return GridSpec(grid, list(range(L)), self.cols)

    def _step(self, name: str, fn) -> dict:
        cached = self.folder.done(name)
        if cached is not None:
            self.timings[name] = cached.get("_seconds", 0.0)
            return cached
        t0 = time.perf_counter()
        data = fn()
        return self.folder.finish(name, data, time.perf_counter() - t0)

    # ---------------------------------------------------------------- steps
    def step_baseline(self) -> dict:
        def compute():
            tok = self.model.tokenizer
            out = {}
            refusal_ids = default_refusal_token_ids(tok)
            for side in ("harmful", "harmless"):
                b = self.batches[side]
                logits = self.model(b.ids, b.mask, logits="last").float()
                ld = self.metric.from_logits(logits, None)
                lo = refusal_log_odds(logits, refusal_ids)
                per_prompt = logits.softmax(-1)
                probs = per_prompt.mean(0)
                top = probs.topk(10)
                objs = getattr(self.prompts, f"{side}_objects")
                out[side] = {
                    "scores": dict(zip(objs, ld.tolist())),
                    "log_odds": dict(zip(objs, lo.tolist())),
                    "top_token": [tok.decode([int(i)]) for i in logits.argmax(-1)],
                    "top_next_tokens": [[tok.decode([int(i)]), float(p)] for p, i in zip(top.values, top.indices)],
                    # per prompt, in object order (pairs: harmful i with harmless i): what the sanity gate reads
                    "per_prompt": self._per_prompt(logits, ld, per_prompt, refusal_ids),
                }
            return out

        return self._step("baseline", compute)

    def _per_prompt(self, logits: torch.Tensor, metric: torch.Tensor, probs: torch.Tensor, refusal_ids) -> dict:
        return {"metric": metric.tolist(), "top_id": [int(i) for i in logits.argmax(-1)],
                "refusal_prob": probs[:, self.tokens.refusal_id].tolist(),
                "onset_ids": list(refusal_ids), "onset_probs": probs[:, list(refusal_ids)].tolist()}

    def baseline_per_prompt(self, base: dict, side: str) -> dict:
        """``base[side]["per_prompt"]``, recomputed from the model for a baseline step recorded before it existed."""
        if "per_prompt" in base[side]:
            return base[side]["per_prompt"]
        b = self.batches[side]
        with torch.no_grad():
            logits = self.model(b.ids, b.mask, logits="last").float()
        return self._per_prompt(logits, self.metric.from_logits(logits, None), logits.softmax(-1),
                                default_refusal_token_ids(self.model.tokenizer))

    def sanity(self, base: dict) -> dict:
        """The sanity gate: does the metric separate harmful from harmless prompts at all?"""
        h, s = self.baseline_per_prompt(base, "harmful"), self.baseline_per_prompt(base, "harmless")
        return sanity_check(h, s, self.model.tokenizer, self.tokens, seed=self.cfg.seed)

    def step_dla(self) -> dict:
        from refusal_lab.dla import SCALE_NOTE, direct_logit_attribution

        def compute():
            out = {"scale": SCALE_NOTE}
            for side in ("harmful", "harmless"):
                b = self.batches[side]
                r = direct_logit_attribution(self.model, b.ids, b.mask, self.tokens.refusal_id, self.tokens.compliance_id)
                out["labels"], out["component_labels"] = r.accumulated_labels, r.component_labels
                out[side] = {"accumulated": r.accumulated, "components": r.components, "heads": r.heads}
            return out

        return self._step("dla", compute)

    def step_patch(self, grid: str, direction: str) -> dict:
        src, rec = DIRECTIONS[direction]

        def compute():
            spec = self.grid_spec(grid)
            partial = self.folder.root / "partial" / f"patch_{grid}_{direction}.safetensors"
            dist = None
            if self.executor is not None:  # the same cells, computed by shards on other processes
                vals, dist = self.executor.patch_grid(self, grid, direction, spec)
            else:
                vals = patch_grid(self.model, self.receiver(rec), self.source_cache(src), spec, self.metric,
                                  max_rows=self.cfg.max_rows, progress=self.progress, checkpoint=partial)
            save_tensors(self.folder.root / "tensors" / f"patch_{grid}_{direction}.safetensors",
                         {"per_pair": vals}, {"grid": grid, "direction": direction, "layers": spec.layers,
                                              "cols": spec.cols if grid != "heads" else spec.heads})
            return {"per_pair": vals, "layers": spec.layers, "cols": spec.cols, "heads": spec.heads,
                    **({"distributed": dist} if dist else {})}

        result = self._step(f"patch_{grid}_{direction}", compute)
        # the step file is written: the within-grid checkpoint is no longer needed
        (self.folder.root / "partial" / f"patch_{grid}_{direction}.safetensors").unlink(missing_ok=True)
        return result

    def step_attribution(self, grids: list[str]) -> dict:
        src, rec = DIRECTIONS["sufficiency"]

        def compute():
            specs = {g: self.grid_spec(g) for g in grids}
            sites = set().union(*(source_sites(self.model, s) for s in specs.values()))
            # the head grid gets AtP* (AtP + the QK fix); the same pass gives plain AtP for every grid
            acts, grads, attn = receiver_gradients_qk(self.model, self.batches[rec], sites, self.metric) \
                if "heads" in specs else (*receiver_gradients(self.model, self.batches[rec], sites, self.metric), None)
            base = self.receiver(rec).baseline
            source = self.source_cache(src)
            out = {}
            for g, s in specs.items():
                plain = attribution_grid(self.model, self.batches[rec], acts, grads, source, s, base)
                out[g] = {"per_pair": plain, "variant": "AtP"}
                if g == "heads":
                    out[g] = {"per_pair": attribution_grid(self.model, self.batches[rec], acts, grads, source, s, base,
                                                           attention=attn),
                              "per_pair_plain": plain, "variant": "AtP*"}
            return out

        return self._step("attribution", compute)

    def step_heads(self, heads_grid: dict, harmless_mean: float, harmful_mean: float) -> dict:
        def compute():
            values = _normalise(torch.as_tensor(heads_grid["per_pair"]), harmless_mean, harmful_mean)  # [L, H]
            flat, H = values.flatten(), values.shape[1]
            every = [{"layer": int(i // H), "head": int(i % H), "value": float(flat[i])}
                     for i in flat.argsort(descending=True)]
            ranked = every[:20]
            selected = [r for r in every if r["value"] > self.cfg.threshold]
            cols = self.prompts.resolve_positions(self.cfg.heads_position)
            out = {"threshold": self.cfg.threshold, "position": self.cfg.heads_position, "cols": cols,
                   "selected": selected, "ranked": ranked, "sufficiency": None, "generations": []}
            if not selected:
                return out
            src, rec = DIRECTIONS["sufficiency"]
            z = self.source_cache(src)
            receiver = self.receiver(rec)
            rows = [Row(i, min(s["layer"] for s in selected), min(cols),
                        [Edit(s["layer"], "attn.hook_z", c, z[f"blocks.{s['layer']}.attn.hook_z"][i, c, s["head"]], s["head"])
                         for s in selected for c in cols])
                    for i in range(receiver.batch.n)]
            patched = run_rows(self.model, receiver, rows, self.metric, self.cfg.max_rows)
            out["sufficiency"] = float(_normalise(patched[:, None], harmless_mean, harmful_mean)[0])
            out["sufficiency_per_pair"] = patched
            if self.cfg.generate_tokens:
                hooks = [(f"blocks.{s['layer']}.attn.hook_z",
                          Replace(positions=cols, head=s["head"], value=z[f"blocks.{s['layer']}.attn.hook_z"][:, cols, s["head"]]))
                         for s in selected]
                b = self.batches[rec]
                base = self.model.generate(b.ids, b.mask, max_new_tokens=self.cfg.generate_tokens)
                pat = self.model.generate(b.ids, b.mask, max_new_tokens=self.cfg.generate_tokens, fwd_hooks=hooks)
                dec = lambda t: self.model.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
                out["generations"] = [{"object": o, "baseline": dec(x), "patched": dec(y)}
                                      for o, x, y in zip(self.prompts.harmless_objects, base, pat)]
            return out

        return self._step("heads", compute)

    # ---------------------------------------------------------------- steering (steering/pipeline.py)
    def steering_settings(self):
        from refusal_lab.steering.pipeline import SteeringSettings

        c = self.cfg
        return SteeringSettings(n_train=c.steering_n_train, n_val=c.steering_n_val, n_test=c.steering_n_test,
                                alphas=c.steering_alphas, object_alphas=c.steering_object_alphas,
                                max_new_tokens=c.steering_tokens, kl_max=c.kl_max, max_layer_frac=c.max_layer_frac,
                                seed=c.seed, judge=self.judge(), judge_name=c.judge)

    def judge(self):
        """The refusal judge named by ``config.judge``: substrings, the model itself, or another chat model."""
        from refusal_lab.steering.evaluation import ChatModelJudge, SubstringJudge

        name = self.cfg.judge
        if name == "substring":
            return SubstringJudge()
        if not hasattr(self, "_judge"):
            if name == "self":
                self._judge = ChatModelJudge(self.model)
            else:
                from refusal_lab.models.loading import load_model

                self._judge = ChatModelJudge(load_model(name, dtype=self.cfg.dtype, device=self.cfg.device))
        return self._judge

    def save_vector(self, name: str, vector: torch.Tensor, meta: dict) -> None:
        from refusal_lab.steering.vectors import save_vector

        save_vector(self.folder.root / "vectors" / f"{name}.safetensors", vector, meta)

    def load_vector(self, name: str) -> torch.Tensor:
        from refusal_lab.steering.vectors import load_vector

        path = self.folder.root / "vectors" / f"{name}.safetensors"
        if not path.is_file():
            raise RefusalLabError(f"{path} is missing although its step finished; rerun with --force.")
        return load_vector(path)[0]

    def step_direction(self) -> dict:
        from refusal_lab.steering.pipeline import direction_step

        return self._step("direction", lambda: direction_step(self.model, self.steering_settings(), self.save_vector,
                                                                progress=self.progress))

    def step_steering(self, direction: dict, heads: dict | None, h_mean: float, s_mean: float) -> dict:
        from refusal_lab.steering.pipeline import steering_step

        def compute():
            sel = [(x["layer"], x["head"]) for x in (heads or {}).get("selected") or []]
            heads_col = (heads or {}).get("cols") or [None]
            return steering_step(
                self.model, self.steering_settings(), direction, self.load_vector("direction"),
                object_batches={k: (b.ids, b.mask) for k, b in self.batches.items()},
                objects={"harmful": self.prompts.harmful_objects, "harmless": self.prompts.harmless_objects},
                metric_fn=lambda logits: self.metric.from_logits(logits, None), harmful_mean=h_mean,
                harmless_mean=s_mean, object_position=self.prompts.resolve_positions(self.cfg.steering_object_position)[0],
                heads=sel, heads_position=heads_col[0], save_vector=self.save_vector, progress=self.progress)

        return self._step("steering", compute)

    def step_evaluation(self, direction: dict, steering: dict) -> dict:
        from refusal_lab.steering.pipeline import evaluation_step

        alpha = steering["instructions"]["chosen_alpha"]
        return self._step("evaluation", lambda: evaluation_step(self.model, self.steering_settings(), direction,
                                                                  self.load_vector("direction"), alpha,
                                                                  progress=self.progress))

    # ---------------------------------------------------------------- the whole run
    def run(self) -> dict:
        t_all = time.perf_counter()
        base = self.step_baseline()
        h_mean = sum(base["harmful"]["scores"].values()) / len(base["harmful"]["scores"])
        s_mean = sum(base["harmless"]["scores"].values()) / len(base["harmless"]["scores"])
        if abs(h_mean - s_mean) < 1e-6:
            raise RefusalLabError("Harmful and harmless prompts give the same mean score, so patching cannot be normalised; check the refusal/compliance tokens.")
        sanity = self.sanity(base)
        if self.strict and not sanity["separates"]:  # before any patching step
            raise RefusalLabError(sanity["strict_message"])
        dla = self.step_dla()
        grids = {}
        for direction in self.cfg.directions:
            for g in self.cfg.grids:
                grids[(g, direction)] = self.step_patch(g, direction)
        attr = self.step_attribution(self.cfg.grids) if self.cfg.attribution and self.cfg.grids else None
        heads = None
        if "heads" in self.cfg.grids and "sufficiency" in self.cfg.directions:
            heads = self.step_heads(grids[("heads", "sufficiency")], s_mean, h_mean)
        results = self.assemble(base, dla, grids, attr, heads, h_mean, s_mean, sanity)
        if self.cfg.steering:
            steps = {"direction": self.step_direction()}
            steps["steering"] = self.step_steering(steps["direction"], heads, h_mean, s_mean)
            steps["evaluation"] = self.step_evaluation(steps["direction"], steps["steering"])
            for k, v in steps.items():
                results["timings"][k] = v.get("_seconds", 0.0)
                results[k] = {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
            results["findings"] += steering_findings(results)
        results["timings"]["total"] = time.perf_counter() - t_all
        dist = {f"patch_{g}_{d}": v["distributed"] for (g, d), v in grids.items() if v.get("distributed")}
        if dist:  # which workers computed which patching step (absent for single-process steps)
            results["distributed"] = dist
        write_json(self.folder.root / "results.json", results)
        self.write_tables(base, grids, heads, results["patching"])
        self.write_report()
        return results

    def assemble(self, base, dla, grids, attr, heads, h_mean, s_mean, sanity: dict | None = None) -> dict:
        m = self.model
        L = m.cfg.n_layers
        col_labels = self.col_labels()
        sanity = sanity if sanity is not None else self.sanity(base)
        ok = bool(sanity["separates"])
        seed = self.cfg.seed
        patching: dict = {}
        for (g, direction), data in grids.items():
            vals = _normalise(torch.as_tensor(data["per_pair"]), s_mean, h_mean)
            entry = {"rows": list(range(L)), "cols": data["heads"] if g == "heads" else col_labels,
                     "values": vals, **_uncertainty(data["per_pair"], s_mean, h_mean, seed),
                     "direction": "harmful->harmless" if direction == "sufficiency" else "harmless->harmful",
                     "method": "exact", "normalisation": NORMALIZED_METRIC_NOTE[direction], "interpretable": ok}
            if direction == "sufficiency":
                patching[g] = entry
            else:
                patching.setdefault("necessity", {})[g] = entry
        if attr:
            patching["attribution"], patching["agreement"] = {}, {}
            for g, data in attr.items():
                if g.startswith("_"):
                    continue
                vals = _normalise(torch.as_tensor(data["per_pair"]), s_mean, h_mean)
                variant = data.get("variant", "AtP")
                patching["attribution"][g] = dict(patching[g], values=vals, method="attribution", variant=variant,
                                                  **_uncertainty(data["per_pair"], s_mean, h_mean, seed))
                patching["agreement"][g] = dict(agreement(patching[g]["values"], vals), variant=variant)
                if "per_pair_plain" in data:  # AtP* grid: plain AtP beside it
                    plain = _normalise(torch.as_tensor(data["per_pair_plain"]), s_mean, h_mean)
                    patching["attribution"][g]["values_plain"] = plain
                    patching["agreement"][g]["plain"] = dict(agreement(patching[g]["values"], plain), variant="AtP")
        mean = lambda side, key: torch.as_tensor(dla[side][key]).float().mean(0)  # noqa: E731
        results = {
            "schema_version": 1,
            "model": {"name": m.cfg.model_name, "model_type": m.cfg.model_type, "n_layers": L, "n_heads": m.cfg.n_heads,
                      "d_model": m.cfg.d_model, "d_head": m.cfg.d_head, "dtype": m.cfg.dtype, "device": m.cfg.device},
            "config": asdict(self.cfg),
            "versions": versions(),
            "seed": self.cfg.seed,
            "prompts": {"template": self.prompts.template, "mode": self.prompts.mode,
                        "pairing": "harmful object i is paired with harmless object i (as in Arditi & Obeso)",
                        "example": self.prompts.harmful_texts[0], "seq_len": self.prompts.seq_len},
            "objects": {"harmful": self.prompts.harmful_objects, "harmless": self.prompts.harmless_objects,
                        "dropped": self.prompts.dropped},
            "tokens": {"refusal": {"str": self.tokens.refusal_str, "id": self.tokens.refusal_id},
                       "compliance": {"str": self.tokens.compliance_str, "id": self.tokens.compliance_id}},
            "token_choice": {"chosen_by": "auto" if self.token_candidates is not None else "config",
                             "refusal": "auto" if self.cfg.refusal == "auto" else "config",
                             "compliance": "auto" if self.cfg.compliance == "auto" else "config",
                             "candidates": self.token_candidates},
            "positions": [{"index": c, "label": self.prompts.positions[c].label, "token": self.prompts.positions[c].token}
                          for c in self.cols],
            "baseline": {
                "metric": "logit_diff",
                "harmful": base["harmful"]["scores"], "harmless": base["harmless"]["scores"],
                "harmful_mean": h_mean, "harmless_mean": s_mean,
                "log_odds": {f"{side}_mean": sum(base[side]["log_odds"].values()) / len(base[side]["log_odds"])
                             for side in ("harmful", "harmless")} | {side: base[side]["log_odds"] for side in ("harmful", "harmless")},
                "top_next_tokens": {side: base[side]["top_next_tokens"] for side in ("harmful", "harmless")},
            },
            "dla": {
                "scale": dla["scale"], "labels": dla["labels"],
                "harmful_mean": mean("harmful", "accumulated"), "harmless_mean": mean("harmless", "accumulated"),
                "components": {"labels": dla["component_labels"], "harmful_mean": mean("harmful", "components"),
                               "harmless_mean": mean("harmless", "components")},
                "heads": {"rows": list(range(L)), "cols": list(range(m.cfg.n_heads)),
                          "harmful_mean": mean("harmful", "heads"), "harmless_mean": mean("harmless", "heads")},
            },
            "sanity": {k: v for k, v in sanity.items() if k != "strict_message"},
            "patching": patching,
            "timings": {k: v.get("_seconds", 0.0) for k, v in
                        {"baseline": base, "dla": dla, **{f"patch_{g}_{d}": v for (g, d), v in grids.items()},
                         **({"attribution": attr} if attr else {}), **({"heads": heads} if heads else {})}.items()},
        }
        if heads:
            results["heads"] = {k: v for k, v in heads.items() if not k.startswith("_") and k != "sufficiency_per_pair"}
            results["heads"].update(_sufficiency_uncertainty(heads, len(self.prompts.harmless_objects), s_mean, h_mean,
                                                             seed), interpretable=ok)
        results["findings"] = findings(results)
        return results

    def write_tables(self, base, grids, heads, patching: dict | None = None) -> None:
        t = self.folder.root / "tables"
        rows = [{"side": side, "object": o, "logit_diff": s, "log_odds": base[side]["log_odds"][o], "top_token": tt}
                for side in ("harmful", "harmless")
                for (o, s), tt in zip(base[side]["scores"].items(), base[side]["top_token"])]
        write_csv(t / "baseline.csv", pd.DataFrame(rows))
        labels = self.col_labels()
        for (g, direction), data in grids.items():
            per = torch.as_tensor(data["per_pair"])
            recs = []
            for i in range(per.shape[0]):
                for a in range(per.shape[1]):
                    for b in range(per.shape[2]):
                        col = data["heads"][b] if g == "heads" else labels[b]
                        recs.append({"grid": g, "direction": direction, "method": "exact", "pair": i,
                                     "harmful_object": self.prompts.harmful_objects[i],
                                     "harmless_object": self.prompts.harmless_objects[i],
                                     "layer": data["layers"][a], "col": col, "metric": float(per[i, a, b])})
            write_csv(t / f"patching_{g}_{direction}.csv", pd.DataFrame(recs))
        if heads and heads.get("ranked"):
            write_csv(t / "heads.csv", pd.DataFrame(heads["selected"] or heads["ranked"]))
        if patching is not None:
            write_csv(t / "patching_summary.csv", patching_summary(patching))

    def write_report(self) -> None:
        from refusal_lab.report import write_figures, write_report

        results = read_json(self.folder.root / "results.json")
        write_figures(results, self.folder.root / "figures")
        write_report(self.folder.root)


def versions() -> dict:
    import transformers

    return {"refusal_lab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def steering_findings(r: dict) -> list[str]:
    """Headline steering numbers in words (direction, sweeps, held-out refusal rates)."""
    out = []
    d, st, ev = r.get("direction"), r.get("steering"), r.get("evaluation")
    if d:
        tok = f" ({d['position_token']!r})" if d.get("position_token") else ""
        out.append(f"Selected refusal direction: layer {d['layer']}, eoi column {d['position']}{tok}; on val, ablating it "
                   f"moves harmful refusal log-odds {d['baseline']['harmful_val_log_odds']:.2f} -> {d['bypass']:.2f}, adding it "
                   f"moves harmless {d['baseline']['harmless_val_log_odds']:.2f} -> {d['induce']:.2f} (KL {d['kl']:.3f})"
                   + (" [fallback: every candidate was filtered out]" if d.get("fallback") else "") + ".")
    if ev:
        a, b, c = (ev["harmless_refusal_rate_added"], ev["harmful_refusal_rate_ablated"],
                   ev["harmful_refusal_rate_subtracted"])

        from refusal_lab.report.common import fmt_ci

        def ci(x: dict, key: str = "ci95") -> str:  # " [0.41, 0.63]": the Wilson interval, when recorded
            c = fmt_ci(x.get(key))
            return f" {c}" if c else ""

        wilson = any(ci(x) or ci(x, "baseline_ci95") for x in (a, b, c))
        out.append(f"Held-out test prompts: harmless refusal rate {a['baseline']:.2f}{ci(a, 'baseline_ci95')} -> "
                   f"{a['value']:.2f}{ci(a)} with the direction added (alpha {ev['alpha']:g}, n={a['n']}); harmful "
                   f"refusal rate {b['baseline']:.2f}{ci(b, 'baseline_ci95')} -> {b['value']:.2f}{ci(b)} with it ablated "
                   f"(n={b['n']}) and {c['value']:.2f}{ci(c)} with it subtracted (n={c['n']})"
                   + (" [Wilson 95% intervals]" if wilson else "") + ".")
    for name, o in ((st or {}).get("objects") or {}).items():
        rows = o.get("rows") or []
        if rows:
            top = max(rows, key=lambda x: x["harmless_normalised"])
            low = min(rows, key=lambda x: x["harmful_normalised"])
            out.append(f"Object prompts, {name} vector: adding it to harmless objects reaches normalised metric "
                       f"{top['harmless_normalised']:.2f} at alpha {top['alpha']:g}; subtracting it from harmful objects "
                       f"goes down to {low['harmful_normalised']:.2f} (1 = harmful baseline, 0 = harmless).")
    return out


def findings(r: dict) -> list[str]:
    """The replication's headline observations, in words with their numbers."""
    out = []
    san = r.get("sanity") or {}
    if san:
        out.append(san["sentence"])  # the sanity gate speaks first: passed, or the warning
        if san.get("token_note"):
            out.append(san["token_note"])
    b = r["baseline"]
    out.append(f"Harmful prompts score {b['harmful_mean']:.2f} and harmless prompts {b['harmless_mean']:.2f} on "
               f"logit[{r['tokens']['refusal']['str']}] - logit[{r['tokens']['compliance']['str']}] "
               f"(gap {b['harmful_mean'] - b['harmless_mean']:.2f}).")
    p = r["patching"]
    labels = [f"{x['label']}" for x in r["positions"]]
    if "resid_pre" in p:
        v = torch.as_tensor(p["resid_pre"]["values"])
        pm = ""
        if "se" in p["resid_pre"]:
            se = torch.as_tensor(p["resid_pre"]["se"], dtype=torch.float64)
            pm = f" (± {float(se[-1, -1]):.2f} SE, n = {p['resid_pre']['n_pairs']} pairs)"
        out.append(f"Patching resid_pre at the last position recovers {v[-1, -1]:.2f}{pm} at the last layer and "
                   f"{v[:, -1].max():.2f} at most.")
        for lab in ("post_obj", "eoi"):
            idx = [i for i, x in enumerate(labels) if x == lab and i != len(labels) - 1]
            if idx:
                best = v[:, idx].max(1).values
                if best.max() > 0.05:
                    band = [l for l in range(len(best)) if best[l] >= 0.5 * best.max()]
                    out.append(f"At the {lab} position(s) resid_pre patching carries the signal in layers "
                               f"{band[0]}-{band[-1]} (at least half its maximum {best.max():.2f}, reached at layer {int(best.argmax())}).")
    for g in ("attn_out_cumulative", "mlp_out_cumulative", "attn_out", "mlp_out"):
        if g in p:
            v = torch.as_tensor(p[g]["values"])
            i = int(v.argmax())
            l, c = divmod(i, v.shape[1])
            out.append(f"{g} reaches {v.max():.3f} at layer {l}, position {p[g]['cols'][c]}.")
    if "heads" in r:
        h = r["heads"]
        suff = "n/a" if h["sufficiency"] is None else f"{h['sufficiency']:.3f}"
        ci = h.get("sufficiency_ci95")
        if h["sufficiency"] is not None and ci:
            se = h.get("sufficiency_se")
            suff += (f" (± {se:.3f} SE, " if se is not None and se == se else " (") + \
                f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}], n = {h.get('n_pairs')} pairs)"
        out.append(f"{len(h['selected'])} heads pass the {h['threshold']} threshold at {h['position']}; patched together "
                   f"they recover {suff} of the refusal metric.")
    for g, a in p.get("agreement", {}).items():
        line = (f"Attribution patching ({a.get('variant', 'AtP')}) vs exact on {g}: Spearman {a['spearman']:.2f}, "
                f"top-{a['top_k']} overlap {a['top_k_overlap']:.2f}")
        if "plain" in a:
            line += f" (plain AtP: Spearman {a['plain']['spearman']:.2f}, top-{a['plain']['top_k']} overlap {a['plain']['top_k_overlap']:.2f})"
        out.append(line + ".")
    return out
