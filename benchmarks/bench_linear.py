"""PyTorch's default float32 CPU matrix product (MKL ``sgemm`` through ``F.linear``) against oneDNN's
(:mod:`refusal_lab.models.cpu_linear`, what the package uses), on every linear shape of a model and
on its greedy decoding, in one process.

    python benchmarks/bench_linear.py [--model FOLDER|offline] [--rows 1,16,48,128,512,1024] [--json out.json]

Part 1: each distinct ``(d_in, d_out)`` of the model's ``nn.Linear`` modules and its unembedding,
at each row count: GFLOP/s of both paths (the median of repeated runs, both paths alternating),
their ratio and the largest relative difference of the outputs. Part 2: the prompt prefill and a
16-token greedy decoding of 16 test instructions through the hooked model, once with
``REFUSAL_LAB_LINEAR=torch`` and once with oneDNN: wall seconds, the ratio, the largest logit
difference and whether the greedy tokens agree. Not a timed test; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from refusal_lab.models import cpu_linear  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fam = info.get("CPU family", "?").strip()
        return f"{info.get('Model name', platform.processor()).strip()} (family {fam}), {os.cpu_count()} CPUs"
    except (OSError, subprocess.CalledProcessError):
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def timed(fn, budget: float = 0.3) -> float:
    fn()
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget:
        fn()
        k += 1
    return (time.perf_counter() - t0) / k


def onednn(x, w, b):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def shapes_part(model, rows: list[int], repeats: int) -> list[dict]:
    seen = {}
    for mod in model.hf_model.modules():
        if isinstance(mod, torch.nn.Linear):
            seen.setdefault((mod.in_features, mod.out_features, mod.bias is not None), mod)
    out = []
    for (d_in, d_out, has_bias), mod in sorted(seen.items(), key=lambda kv: kv[0][:2]):
        w, b = mod.weight.detach(), None if mod.bias is None else mod.bias.detach()
        for m in rows:
            if d_out * m > 64 * 160_000 and m > 64:  # the unembedding: decoding row counts only
                continue
            x = torch.randn(m, d_in)
            ta, tb = [], []
            for _ in range(repeats):
                ta.append(timed(lambda: F.linear(x, w, b)))
                tb.append(timed(lambda: onednn(x, w, b)))
            ref = F.linear(x.double(), w.double(), None if b is None else b.double())
            diff = float(((onednn(x, w, b).double() - ref).abs().max() / ref.abs().max()))
            diff_t = float(((F.linear(x, w, b).double() - ref).abs().max() / ref.abs().max()))
            flop = 2 * m * d_in * d_out / 1e9
            row = {"d_in": d_in, "d_out": d_out, "bias": has_bias, "rows": m,
                   "torch_gflops": flop / statistics.median(ta), "onednn_gflops": flop / statistics.median(tb),
                   "ratio": statistics.median(ta) / statistics.median(tb),
                   "onednn_rel_err": diff, "torch_rel_err": diff_t,
                   "package_uses": "onednn" if (d_out >= cpu_linear.NARROW or m >= cpu_linear.SMALL_ROWS) else "torch"}
            out.append(row)
            print(f"{d_in:>6} -> {d_out:<7} rows {m:>5}: torch {row['torch_gflops']:6.1f}  oneDNN "
                  f"{row['onednn_gflops']:6.1f} GFLOP/s  x{row['ratio']:.2f}  rel err vs float64 "
                  f"{diff_t:.1e} / {diff:.1e}  (package: {row['package_uses']})", flush=True)
    return out


def decode_part(model, n: int, tokens: int) -> dict:
    from refusal_lab.models.generate import greedy_decode
    from refusal_lab.prompts import build_instruction_prompts
    from refusal_lab.steering.batching import instruction_sample

    ids, mask = build_instruction_prompts(model.tokenizer, instruction_sample("test", n, 42)["harmless"][:n])
    res = {}
    for path in ("torch", "onednn", "torch", "onednn"):  # twice each, alternating; the second of each is kept
        os.environ[cpu_linear.ENV] = path
        t0 = time.perf_counter()
        with torch.no_grad():
            pre = model.prefill(ids, mask, record_kv=True, logits="last")
        t1 = time.perf_counter()
        gen = greedy_decode(model, ids, mask, max_new_tokens=tokens, prefill=pre)
        t2 = time.perf_counter()
        res[path] = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "logits": pre.logits, "tokens": gen.tokens}
    os.environ.pop(cpu_linear.ENV)
    a, b = res["torch"], res["onednn"]
    out = {"prompts": n, "prompt_columns": int(ids.shape[1]), "new_tokens": tokens,
           "torch": {k: a[k] for k in ("prefill_s", "decode_s")}, "onednn": {k: b[k] for k in ("prefill_s", "decode_s")},
           "prefill_ratio": a["prefill_s"] / b["prefill_s"], "decode_ratio": a["decode_s"] / b["decode_s"],
           "max_logit_diff": float((a["logits"] - b["logits"]).abs().max()),
           "same_tokens": bool(torch.equal(a["tokens"], b["tokens"]))}
    print(f"prefill of {n} prompts ({ids.shape[1]} columns): torch {a['prefill_s']:.2f} s, oneDNN "
          f"{b['prefill_s']:.2f} s (x{out['prefill_ratio']:.2f}); {tokens}-token greedy decoding: torch "
          f"{a['decode_s']:.2f} s, oneDNN {b['decode_s']:.2f} s (x{out['decode_ratio']:.2f}); largest logit "
          f"difference {out['max_logit_diff']:.2e}; same greedy tokens: {out['same_tokens']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="offline", help="a model folder, or 'offline' (the offline default model)")
    ap.add_argument("--rows", default="1,16,48,128,512,1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-prompts", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not cpu_linear.available():
        raise SystemExit("This PyTorch build has no oneDNN linear (or REFUSAL_LAB_LINEAR=torch is set).")
    torch.set_num_threads(args.threads)
    from refusal_lab import load_model

    if args.model == "offline":
        from refusal_lab.models.offline import offline_model_dir
        args.model = str(offline_model_dir(model="qwen2.5-coder-0.5b-instruct"))
    model = load_model(args.model)
    machine = f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads"
    print(machine, flush=True)
    out = {"machine": machine, "model": model.cfg.model_name,
           "shapes": shapes_part(model, [int(r) for r in args.rows.split(",")], args.repeats),
           "decode": decode_part(model, args.decode_prompts, 16)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
