"""Peak memory while loading a model: does loading make one copy of the weights, or two?

    python benchmarks/bench_load.py [--dtype float32,bfloat16] [--model PATH] [--json out.json]

Each load runs in a fresh subprocess (peak RSS is per process). Reported per dtype:

* ``weights``: bytes of the loaded parameters (numel × element size);
* ``rss before``: resident set after importing torch/transformers and reading the tokenizer-free
  config (the runtime's own footprint);
* ``peak rss - before``: ``ru_maxrss`` growth during ``load_model`` (peak resident set, Linux
  reports KiB). Safetensors files are memory-mapped, so pages of the file touched while copying
  count here too; a loader that builds the model once and reads it straight into the target
  dtype/device stays near 1 × weights (plus the mmap pages of the file when they are not freed);
  one that materialises a float32 CPU copy first and then ``.to()``/``.half()``s it peaks at
  weights_fp32 + weights_target;
* ``rss after - before``: what stays resident.

On CUDA the same numbers are printed for ``torch.cuda.max_memory_allocated`` vs weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {src!r})
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch, transformers  # noqa: F401  (the runtime is not what we measure)
from refusal_lab.models.loading import load_model
from refusal_lab.models.hf_loading import load_hf  # noqa: F401
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
def status():
    out = {{}}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out
import threading
peaks = {{"RssAnon": 0, "RssFile": 0}}
stop = threading.Event()
def sample():
    while not stop.is_set():
        st = status()
        for k in peaks:
            peaks[k] = max(peaks[k], st.get(k, 0))
        time.sleep(0.005)
before = rss()
st0 = status()
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
dev = {device!r}
th = threading.Thread(target=sample, daemon=True)
th.start()
t = time.perf_counter()
m = load_model({model!r}, dtype={dtype!r}, device=dev)
wall = time.perf_counter() - t
stop.set(); th.join()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
w = sum(p.numel() * p.element_size() for p in m.hf_model.parameters())
out = dict(dtype={dtype!r}, device=dev, weights=w, rss_before=before, peak_rss_increase=peak - max(before, peak_before),
           rss_after_increase=rss() - before, load_s=wall,
           peak_anon_increase=peaks["RssAnon"] - st0["RssAnon"], peak_file_increase=peaks["RssFile"] - st0["RssFile"])
if dev.startswith("cuda"):
    out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
print("RESULT " + json.dumps(out))
"""


def measure(model: str | None, dtype: str, device: str) -> dict:
    code = CHILD.format(src=SRC, model=model, dtype=dtype, device=device)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"load failed:\n{proc.stdout}\n{proc.stderr}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model spec (default: the offline default model)")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    GiB = 1024**3
    rows = []
    print("| dtype | device | weights GiB | peak RSS increase GiB (× weights) | of which anonymous (× weights) | "
          "of which file-backed mmap | RSS kept GiB | load s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dt in args.dtype.split(","):
        r = measure(args.model, dt.strip(), device)
        rows.append(r)
        w = r["weights"]
        print(f"| {r['dtype']} | {r['device']} | {w / GiB:.2f} | {r['peak_rss_increase'] / GiB:.2f} "
              f"({r['peak_rss_increase'] / w:.2f}) | {r['peak_anon_increase'] / GiB:.2f} ({r['peak_anon_increase'] / w:.2f}) | "
              f"{r['peak_file_increase'] / GiB:.2f} | {r['rss_after_increase'] / GiB:.2f} | {r['load_s']:.1f} |"
              + (f" cuda max allocated {r['cuda_max_allocated'] / GiB:.2f} GiB" if "cuda_max_allocated" in r else ""),
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
