"""Wall time of the ``steering`` and ``evaluation`` steps on the offline default model, and their
outputs (to compare two code versions).

    python benchmarks/bench_steering.py [--json out.json] [--layer 12] [--steps steering,evaluation]

The direction selection is not run (it is slow and not what this measures): the direction is the
difference in means of ``blocks.{layer}.hook_resid_pre`` at the last column of the *train*
instructions (the step's default sizes), cached under ``--cache`` (safetensors) so that every
code version steers with the same vector. The refusal heads are a fixed, hand-picked pair
(``--heads``), so the object sweeps run both vectors as a default run does. Settings are the run
config's defaults (``RunConfig()``); the alpha of the evaluation is the one the steering step chose.
``--json`` writes ``{"seconds": {...}, "steering": ..., "evaluation": ...}``; compare two such
files with ``--compare A.json B.json`` (exact for everything but floats, floats to 1e-5 relative).

``--share-prefix both`` runs the steps twice in one process, first with the batches' common
beginning computed per row (``SHARE_PREFIX`` off), then once per setting (on), and prints the time
ratio, the largest score difference and every other difference of the outputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def direction_vector(model, layer: int, cache: Path):
    import torch

    from refusal_lab.prompts import build_instruction_prompts
    from refusal_lab.run.config import RunConfig
    from refusal_lab.steering.batching import instruction_sample
    from refusal_lab.steering.vectors import diff_in_means, load_vector, save_vector

    if cache.exists():
        vec, meta = load_vector(cache)
        if int(meta.get("layer", -1)) == layer:
            return vec
    c = RunConfig()
    train = instruction_sample("train", c.steering_n_train, c.seed)
    ih, mh = build_instruction_prompts(model.tokenizer, train["harmful"])
    is_, ms = build_instruction_prompts(model.tokenizer, train["harmless"])
    with torch.no_grad():
        vec = diff_in_means(model, ih, mh, is_, ms, layer=layer, position=-1)
    save_vector(cache, vec, {"layer": layer})
    return vec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--heads", default="14.3,16.7", help="refusal heads as layer.head, comma-separated")
    p.add_argument("--steps", default="steering,evaluation")
    p.add_argument("--alpha", type=float, help="the evaluation's alpha (default: the steering step's choice)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/bench_steering_direction.safetensors"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    p.add_argument("--share-prefix", choices=("on", "off", "both"), default="on",
                   help="evaluate_settings' shared beginning (both: off, then on, compared)")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)

    import torch

    import refusal_lab.steering.evaluation as evaluation
    from refusal_lab.models.loading import load_model
    from refusal_lab.run.config import RunConfig
    from refusal_lab.run.inputs import RunInputs

    torch.set_num_threads(args.threads)
    model = load_model(None, progress=False)
    cfg = RunConfig()
    inputs = RunInputs(model, cfg)
    s = inputs.steering_settings()
    vec = direction_vector(model, args.layer, args.cache)
    direction = {"layer": args.layer}
    with torch.no_grad():
        means = {k: float(inputs.metric.from_logits(model(b.ids, b.mask, logits="last"), None).mean())
                 for k, b in inputs.batches.items()}
    heads = [tuple(int(x) for x in h.split(".")) for h in args.heads.split(",") if h]
    steps = args.steps.split(",")
    modes = ("off", "on") if args.share_prefix == "both" else (args.share_prefix,)
    runs = {}
    for mode in modes:
        evaluation.SHARE_PREFIX = mode == "on"
        print(f"-- shared beginning {mode}", flush=True)
        runs[mode] = run_steps(model, inputs, s, vec, direction, means, heads, steps, args.alpha)
    out, seconds = runs[modes[-1]]
    if len(modes) == 2:
        (a, ta), (b, tb) = runs["off"], runs["on"]
        for k in ta:
            if not k.endswith("_cpu"):
                print(f"{k}: off {ta[k]:.1f} s, on {tb[k]:.1f} s, ratio {ta[k] / tb[k]:.2f}x")
        diffs = _diff(a, b)
        print(f"largest float difference off vs on: {_largest(a, b):.3g}; "
              f"{len(diffs)} differences beyond 1e-5 relative:")
        for path, what in diffs[:50]:
            print(" ", path, what)
        seconds = {"off": ta, "on": tb}
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "threads": args.threads, **out}, indent=1))
    return 0


def run_steps(model, inputs, s, vec, direction, means, heads, steps, alpha):
    """The steering and/or evaluation step: (outputs, seconds)."""
    import torch

    from refusal_lab.steering.pipeline import evaluation_step, steering_step

    out, seconds = {}, {}
    if "steering" in steps:
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out["steering"] = steering_step(
                model, s, direction, vec,
                object_batches={k: (b.ids, b.mask) for k, b in inputs.batches.items()},
                objects={"harmful": inputs.prompts.harmful_objects, "harmless": inputs.prompts.harmless_objects},
                metric_fn=lambda logits: inputs.metric.from_logits(logits, None), harmful_mean=means["harmful"],
                harmless_mean=means["harmless"], object_position=inputs.prompts.resolve_positions("last")[0],
                heads=heads, heads_position=inputs.prompts.resolve_positions("last")[0],
                save_vector=lambda *a: None, progress=False)
        seconds["steering"] = time.perf_counter() - t0
        seconds["steering_cpu"] = time.process_time() - c0
        print(f"steering: {seconds['steering']:.1f} s (CPU {seconds['steering_cpu']:.1f} s)", flush=True)
    if "evaluation" in steps:
        if alpha is None:
            alpha = out.get("steering", {}).get("instructions", {}).get("chosen_alpha", 1.0)
        t0, c0 = time.perf_counter(), time.process_time()
        out["evaluation"] = evaluation_step(model, s, direction, vec, alpha, progress=False)
        seconds["evaluation"] = time.perf_counter() - t0
        seconds["evaluation_cpu"] = time.process_time() - c0
        print(f"evaluation: {seconds['evaluation']:.1f} s (CPU {seconds['evaluation_cpu']:.1f} s, alpha {alpha:g})",
              flush=True)
    return out, seconds


def _largest(a, b) -> float:
    """The largest absolute difference of the floats the two outputs hold at the same places."""
    if isinstance(a, dict) and isinstance(b, dict):
        return max([_largest(a[k], b[k]) for k in set(a) & set(b)] or [0.0])
    if isinstance(a, list) and isinstance(b, list):
        return max([_largest(x, y) for x, y in zip(a, b)] or [0.0])
    if isinstance(a, float) and isinstance(b, float) and math.isfinite(a) and math.isfinite(b):
        return abs(a - b)
    return 0.0


def _diff(a, b, path="$", out=None):
    out = [] if out is None else out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append((f"{path}.{k}", "missing"))
            else:
                _diff(a[k], b[k], f"{path}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append((path, f"length {len(a)} vs {len(b)}"))
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out)
    elif isinstance(a, float) and isinstance(b, float) and not (isinstance(a, bool) or isinstance(b, bool)):
        if not (math.isnan(a) and math.isnan(b)) and abs(a - b) > 1e-5 * max(abs(a), abs(b)) + 1e-9:
            out.append((path, f"{a!r} vs {b!r}"))
    elif a != b:
        out.append((path, f"{a!r} vs {b!r}"))
    return out


def compare(a: Path, b: Path) -> int:
    """Exit 0 if the two outputs agree (floats to 1e-5 relative), else list the differences and exit 1."""
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    print("seconds:", ja.get("seconds"), "vs", jb.get("seconds"))
    diffs = _diff({k: v for k, v in ja.items() if k not in ("seconds", "threads")},
                  {k: v for k, v in jb.items() if k not in ("seconds", "threads")})
    for path, what in diffs[:50]:
        print(path, what)
    print(f"{len(diffs)} differences")
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
