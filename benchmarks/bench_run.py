"""Wall time and peak memory of a whole ``refusal-lab run``, plus the attribution-vs-exact table.

    python benchmarks/bench_run.py [--out DIR] [--json out.json] [-- extra refusal-lab run flags]

Runs ``refusal-lab run --force --quiet`` (the offline default model unless ``--model`` is passed
after ``--``) in a subprocess, samples its resident set every 0.1 s (``VmRSS``, and ``RssAnon``,
the part that is not memory-mapped weight files), then reads the run's ``results.json`` for the
per-step timings and the attribution-patching agreement (Spearman ρ over cells, top-k overlap)
of every grid. Peak RSS is also taken from ``getrusage(RUSAGE_CHILDREN).ru_maxrss``.
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
        "agreement": results.get("patching", {}).get("agreement", {}),
        "grids": {g: list(map(len, [v["rows"], v["cols"]])) for g, v in results.get("patching", {}).items()
                  if isinstance(v, dict) and "rows" in v},
    }


def print_report(r: dict) -> None:
    m = r["model"]
    print(f"\nmachine: {r['machine']}\nmodel: {m.get('name')} ({m.get('dtype')}, {m.get('device')})")
    print("\n| quantity | value |\n|---|---:|")
    print(f"| wall time, whole `refusal-lab run` (process start to exit) | {r['wall_s']:.0f} s |")
    print(f"| peak RSS | {r['peak_rss'] / GiB:.2f} GiB |")
    print(f"| peak anonymous RSS (sampled, not counting mmap'd weight files) | {r['peak_anon_sampled'] / GiB:.2f} GiB |")
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
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_run_"))
    r = run(out, extra)
    print_report(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
