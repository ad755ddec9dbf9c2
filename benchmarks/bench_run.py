"""Wall time and peak memory of a whole ``refusal-lab run``, the attribution-vs-exact table, and the
fast direction selection against the exhaustive one (issue 12), in one invocation.

    python benchmarks/bench_run.py [--out DIR] [--json out.json] [--no-reference] [-- extra refusal-lab run flags]

Runs ``refusal-lab run --force --quiet`` (the offline default model unless ``--model`` is passed
after ``--``) in a subprocess, samples its resident set every 0.1 s (``VmRSS``, and ``RssAnon``,
the part that is not memory-mapped weight files), then reads the run's ``results.json`` for the
per-step timings and the attribution-patching agreement (Spearman ρ over cells, top-k overlap)
of every grid. Peak RSS is also taken from ``getrusage(RUSAGE_CHILDREN).ru_maxrss``.

Then (unless ``--no-reference``) the exhaustive reference: a second process loads the same model and
runs the ``direction`` step's selection with ``exhaustive=True`` (every candidate, every score — the
paper's procedure, the ``--exhaustive`` flag of ``refusal-lab run``) on the same settings, and the
benchmark prints both selections' wall time and model work (prompt-forwards), their ratio, whether
they chose the same (layer, column), the estimate's Spearman ρ over every eligible candidate, and
where the exhaustive winner ranks by the estimate. When the two choose the same candidate they
hold the same vector, so the steering and evaluation steps — and the held-out test refusal rates —
are the same computation; when they differ, the reference process also runs the evaluation step
for its own direction (alpha from the run) and the benchmark compares the test refusal rates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
GiB = 1024**3


def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def run(out: Path, extra: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "refusal_lab.cli", "run", "--out", str(out), "--force", "--quiet", *extra]
    print("$ " + " ".join(cmd), flush=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}

    def sample():
        while proc.poll() is None:
            for k, v in _status(proc.pid).items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    th.join()
    if rc != 0:
        raise SystemExit(f"refusal-lab run failed with exit status {rc}")
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    results = json.loads((out / "results.json").read_text())
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load avg {load0:.1f} at start, "
                   f"{os.getloadavg()[0]:.1f} at end",
        "command": " ".join(cmd),
        "wall_s": wall,
        "peak_rss": max(maxrss, peaks["VmRSS"]),
        "peak_rss_sampled": peaks["VmRSS"],
        "peak_anon_sampled": peaks["RssAnon"],
        "model": results.get("model", {}),
        "timings": results.get("timings", {}),
        "profile": results.get("profile", {}),
        "agreement": results.get("patching", {}).get("agreement", {}),
        "grids": {g: list(map(len, [v["rows"], v["cols"]])) for g, v in results.get("patching", {}).items()
                  if isinstance(v, dict) and "rows" in v},
    }


REFERENCE_WORKER = r"""
import json, sys, time
from refusal_lab.models.loading import load_model
from refusal_lab.run.config import RunConfig
from refusal_lab.run.inputs import RunInputs
from refusal_lab.steering import pipeline as steering
from refusal_lab.steering.selection import select_refusal_direction

run = json.load(open(sys.argv[1]))
cfg = RunConfig.from_dict({**run["config"], "steering_exhaustive": True}, where="the run's config")
model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, progress=False)
s = RunInputs(model, cfg).steering_settings()
t0 = time.perf_counter()
sel = select_refusal_direction(model, s.direction_policy(), batch_size=s.batch_size, progress=False)
wall = time.perf_counter() - t0
res = sel.result
out = {"wall_s": wall, "layer": res.layer, "position": res.position, "bypass": res.bypass, "kl": res.kl,
       "induce": res.induce, "selection": res.agreement, "table": res.table}
fast = run["direction"]
if (res.layer, res.position) != (fast["layer"], fast["position"]):
    alpha = run["steering"]["instructions"]["chosen_alpha"]
    ev = steering.evaluation_step(model, s, {"layer": res.layer}, res.direction, alpha, progress=False)
    out["evaluation"] = {k: v for k, v in ev.items() if k.startswith("harm")}
json.dump(out, open(sys.argv[2], "w"), default=float)
"""


def reference(out: Path) -> dict:
    """The exhaustive selection on the run's own settings, in a fresh process (see the module doc)."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    ref_json = out / "exhaustive_reference.json"
    print("$ exhaustive reference selection (a second process)", flush=True)
    rc = subprocess.call([sys.executable, "-c", REFERENCE_WORKER, str(out / "results.json"), str(ref_json)], env=env)
    if rc != 0:
        raise SystemExit(f"the exhaustive reference failed with exit status {rc}")
    ref = json.loads(ref_json.read_text())
    results = json.loads((out / "results.json").read_text())
    fast = results["direction"]
    fast_wall = results.get("profile", {}).get("direction", {}).get("wall_s", results["timings"].get("direction"))
    same = (ref["layer"], ref["position"]) == (fast["layer"], fast["position"])
    rates = {}
    for key in ("harmless_refusal_rate_added", "harmful_refusal_rate_ablated", "harmful_refusal_rate_subtracted"):
        f = results["evaluation"][key]
        e = f if same else ref["evaluation"][key]
        rates[key] = {"fast": [f["k"], f["n"]], "exhaustive": [e["k"], e["n"]]}
    return {"fast": {"wall_s": fast_wall, "layer": fast["layer"], "position": fast["position"],
                     "selection": fast.get("selection")},
            "exhaustive": {k: ref[k] for k in ("wall_s", "layer", "position", "bypass", "kl", "induce", "selection")},
            "same_choice": same, "test_rates": rates,
            "test_rates_same_by_construction": same}


def print_reference(r: dict) -> None:
    f, e = r["fast"], r["exhaustive"]
    fs, es = f["selection"] or {}, e["selection"]
    fw, ew = fs.get("n_forwards", {}).get("total"), es["n_forwards"]["total"]
    print("\n### Direction selection: fast (default) vs exhaustive (`--exhaustive`), same model and settings\n")
    print("| | fast (top-k by first-order estimate) | exhaustive | ratio |\n|---|---:|---:|---:|")
    print(f"| wall time of the selection | {f['wall_s']:.1f} s | {e['wall_s']:.1f} s | {e['wall_s'] / f['wall_s']:.1f}× |")
    if fw:
        print(f"| model work (prompt-forwards) | {fw:.0f} | {ew:.0f} | {ew / fw:.1f}× |")
    def scored(s):
        n = s.get("n_scored", {})
        return f"{n.get('bypass')} / {n.get('induce')} / {n.get('kl')}"

    print(f"| candidates scored exactly (bypass / induce / kl) | {scored(fs)} | {scored(es)} | |")
    print(f"| chosen (layer, column) | ({f['layer']}, {f['position']}) | ({e['layer']}, {e['position']}) | "
          f"{'same' if r['same_choice'] else 'DIFFERENT'} |")
    print(f"\nestimate vs exact bypass over the {es['n_spearman']} eligible candidates: Spearman ρ = "
          f"{es['spearman_estimate_exact']:.3f}; the exhaustive winner is #{es['chosen_estimate_rank']} by the estimate "
          f"(top_k = {es['top_k']}: {'inside' if es['chosen_in_top_k'] else 'OUTSIDE'}); top-k mode agrees: {es.get('top_k_agrees')}")
    for key, v in r["test_rates"].items():
        print(f"- test `{key}`: fast {v['fast'][0]}/{v['fast'][1]}, exhaustive {v['exhaustive'][0]}/{v['exhaustive'][1]}"
              + (" (same direction, so the same computation)" if r["test_rates_same_by_construction"] else ""))


def print_report(r: dict) -> None:
    m = r["model"]
    print(f"\nmachine: {r['machine']}\nmodel: {m.get('name')} ({m.get('dtype')}, {m.get('device')})")
    print("\n| quantity | value |\n|---|---:|")
    print(f"| wall time, whole `refusal-lab run` (process start to exit) | {r['wall_s']:.0f} s |")
    print(f"| peak RSS | {r['peak_rss'] / GiB:.2f} GiB |")
    print(f"| peak anonymous RSS (sampled, not counting mmap'd weight files) | {r['peak_anon_sampled'] / GiB:.2f} GiB |")
    if r.get("profile"):
        print("\n| step | wall s | CPU s | CPU/wall | RSS at start | peak RSS |\n|---|---:|---:|---:|---:|---:|")
        for k, p in r["profile"].items():
            print(f"| `{k}` | {p['wall_s']:.1f} | {p['cpu_s']:.1f} | {p['cpu_s'] / max(p['wall_s'], 1e-9):.2f} | "
                  f"{p['rss_start_gib']:.2f} GiB | {p['peak_rss_gib']:.2f} GiB |")
        print(f"| total (timings) | {r['timings'].get('total', float('nan')):.1f} | | | | |")
    else:
        for k, v in r["timings"].items():
            if isinstance(v, (int, float)):
                print(f"| step `{k}` | {v:.1f} s |")
    if r["agreement"]:
        print("\n| grid | cells | Spearman ρ (attribution vs exact) | top-k overlap |\n|---|---:|---:|---:|")
        for g, a in r["agreement"].items():
            shape = r["grids"].get(g)
            cells = f"{shape[0]}×{shape[1]}" if shape else "?"
            print(f"| {g} | {cells} | {a['spearman']:.3f} | {a['top_k_overlap']:.2f} (k={a['top_k']}) |")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: a temp folder)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-reference", action="store_true", help="skip the exhaustive direction-selection reference")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_run_"))
    r = run(out, extra)
    print_report(r)
    if not args.no_reference and "direction" in json.loads((out / "results.json").read_text()):
        r["reference"] = reference(out)
        print_reference(r["reference"])
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
