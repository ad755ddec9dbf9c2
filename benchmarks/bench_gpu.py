"""Time the whole refusal-lab suite on Gemma-2-2B and Gemma-2-9B *configurations* (random weights).

    python benchmarks/bench_gpu.py                       # on a GPU: 2b and 9b, bf16
    python benchmarks/bench_gpu.py --configs 9b --prompts 7 --seq-len 40 --json out.json
    python benchmarks/bench_gpu.py --via-disk            # also time load_model() from safetensors

One command on a GPU machine. Without CUDA it falls back automatically to a tiny Gemma 2 config
(3 layers, d=64) in float32 on the CPU, so CI can smoke-test the script in seconds.

The models are built from ``transformers.Gemma2Config`` with the published sizes (2B: 26 layers,
d=2304, 8 heads / 4 kv heads of 256, MLP 9216; 9B: 42 layers, d=3584, 16 / 8 heads of 256, MLP
14336; vocabulary 256000, soft-capping, sliding window 4096) and random weights created directly
on the device in the target dtype (bf16: 2B ≈ 5.2 GB, 9B ≈ 18.5 GB, which fits a 24 GB card).
Prompts are random token ids (``--prompts`` pairs of length ``--seq-len``, harmful and harmless
differing at one "object" column 8 before the end), the metric is logit[3] - logit[7]. The timings
do not depend on what the weights are, only on the shapes.

Steps timed (each with the peak CUDA memory it reached):

* ``build``: the random-weight model on the device (``--via-disk``: then saved as safetensors,
  untimed, and ``load_model`` timed alone, with its peak CUDA memory over the weight bytes: it
  reads straight into the target dtype/device, so ≈ 1.0);
* ``baseline``: both sides' full forward (last-position logits) and ``Receiver.record``;
* ``dla``: direct logit attribution on both sides;
* ``patch_<grid>``: every exact grid (cone engine, batch size from free memory), sufficiency;
  next to it ``naive est.``: cells × one full forward of the receiver batch, what TransformerLens's
  ``patching`` functions (one full forward per cell) would take, and the ratio;
* ``attribution``: one forward + backward and every attribution grid;
* ``heads``: the top-20 heads of the heads grid patched together, and a 24-token generation with
  them patched (what ``refusal-lab run``'s heads step does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.tiny_models, tests.helpers_tiny_chat: the test suite's builders
try:
    import refusal_lab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

from refusal_lab.dla import direct_logit_attribution  # noqa: E402
from refusal_lab.memory import auto_max_rows, weight_bytes  # noqa: E402
from refusal_lab.models.hooked import HookedChatModel  # noqa: E402
from refusal_lab.patching.attribution import attribution_grid, receiver_gradients  # noqa: E402
from refusal_lab.patching.engine import (  # noqa: E402
    GRIDS,
    Batch,
    GridSpec,
    LogitDiff,
    Receiver,
    patch_grid,
    source_sites,
)
from refusal_lab.patching.heads import head_patch_hooks, patch_heads  # noqa: E402

GEMMA2 = {
    "2b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256),
    "9b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
               num_key_value_heads=8, head_dim=256),
}
COMMON = dict(vocab_size=256000, query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
              final_logit_softcapping=30.0, max_position_embeddings=8192, tie_word_embeddings=True)
GiB = 1024**3


def gemma2_config(name: str):
    import transformers

    if name == "tiny":
        from tests.tiny_models import tiny_config

        return tiny_config("gemma2")
    cfg = transformers.Gemma2Config(**GEMMA2[name], **COMMON)
    cfg._attn_implementation = "eager"  # soft-capping is not in SDPA (what load_model picks for gemma2)
    return cfg


def build_model(cfg, dtype: torch.dtype, device: torch.device) -> HookedChatModel:
    """Random weights created on ``device`` in ``dtype`` (no CPU copy of a 9B model)."""
    import transformers

    if getattr(cfg, "num_hidden_layers", 0) <= 4:  # tiny: the test suite's builder (random norm gains too)
        from tests.tiny_models import tiny_model

        return HookedChatModel(tiny_model("gemma2", dtype=dtype).to(device), name="tiny gemma2")
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return HookedChatModel(hf.eval().requires_grad_(False), name=f"gemma2 {cfg.num_hidden_layers}L random")


def save_for_loading(model: HookedChatModel) -> str:
    """Save ``model`` (safetensors) with a small chat tokenizer, so load_model can read it back."""
    from tests.helpers_tiny_chat import save_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    save_tokenizer(folder)
    model.hf_model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def make_prompts(model: HookedChatModel, n: int, T: int, device) -> tuple[Batch, Batch, int]:
    g = torch.Generator().manual_seed(0)
    V = model.cfg.d_vocab
    harmful = torch.randint(10, V, (n, T), generator=g)
    harmless = harmful.clone()
    obj = T - 8
    harmless[:, obj] = torch.randint(10, V, (n,), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    return Batch(harmful.to(device), mask.to(device)), Batch(harmless.to(device), mask.clone().to(device)), obj


class Step:
    """Wall seconds (synchronised) and peak CUDA memory of a block."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = None
        self.wall = time.perf_counter() - self.t


def bench_one(name: str, dtype: torch.dtype, device: torch.device, n: int, T: int, disk: bool,
              grids: list[str], gen_tokens: int) -> dict:
    cfg = gemma2_config(name)
    import gc

    import transformers.models.gemma2.modeling_gemma2  # noqa: F401  (import time is not build time)

    gc.collect()  # the previous config's model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    steps = []

    def record(step, st, **extra):
        steps.append(dict(step=step, wall=st.wall, peak=st.peak, **extra))
        peak = f", peak {st.peak / GiB:.2f} GiB" if st.peak is not None else ""
        more = "".join(f", {k} {v}" for k, v in extra.items())
        print(f"[{name}] {step}: {st.wall:.2f} s{peak}{more}", flush=True)

    with Step(device) as st:
        model = build_model(cfg, dtype, device)
    record("build (random init on device)", st, weights_gib=round(weight_bytes(model) / GiB, 2))
    folder = None
    if disk:
        from refusal_lab.models.loading import load_model

        folder = save_for_loading(model)  # not timed
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with Step(device) as st:
            model = load_model(folder, dtype=dtype, device=str(device))
        record("load_model (safetensors, straight to device)", st,
               peak_over_weights=round(st.peak / weight_bytes(model), 2) if st.peak else None)
    m = model
    harmful, harmless, obj = make_prompts(m, n, T, device)
    metric = LogitDiff(3, 7)
    L, H = m.cfg.n_layers, m.cfg.n_heads

    # one plain forward of the receiver batch: the cost of one naive (TransformerLens-style) cell
    with torch.no_grad():
        m(harmless.ids, harmless.mask, logits="all")
        fwd = []
        for _ in range(3):
            with Step(device) as st:
                m(harmless.ids, harmless.mask, logits="all")
            fwd.append(st.wall)
    one_fwd = sorted(fwd)[1]

    with Step(device) as st, torch.no_grad():
        for b in (harmful, harmless):
            metric.from_logits(m(b.ids, b.mask, logits="last").float(), None)
        receiver = Receiver.record(m, harmless, metric)
        _, source = m.run_with_cache(harmful.ids, harmful.mask,
                                     names=lambda s: s.endswith(("hook_resid_pre", "hook_resid_post", "hook_attn_out",
                                                                 "hook_mlp_out", "attn.hook_z")), logits="none")
    record("baseline (+ receiver record, source cache)", st)

    with Step(device) as st:
        for b in (harmful, harmless):
            direct_logit_attribution(m, b.ids, b.mask, 3, 7)
    record("dla", st)

    cols = list(range(obj, T))
    specs = {g: GridSpec(g, list(range(L)), [obj + 1] if g == "heads" else cols,
                         list(range(H)) if g == "heads" else None) for g in grids}
    rows_fit = auto_max_rows(m, T)
    grid_vals = {}
    for g, spec in specs.items():
        with Step(device) as st:
            grid_vals[g] = patch_grid(m, receiver, source, spec, metric, progress=False)
        cells = spec.shape[0] * spec.shape[1]
        naive = cells * one_fwd
        record(f"patch_{g}", st, cells=cells, naive_est_s=round(naive, 2), naive_over_ours=round(naive / st.wall, 1))

    if grids:
        with Step(device) as st:
            sites = set().union(*(source_sites(m, s) for s in specs.values()))
            acts, grads = receiver_gradients(m, harmless, sites, metric)
            for g, spec in specs.items():
                attribution_grid(m, harmless, acts, grads, source, spec, receiver.baseline)
            del acts, grads
        record("attribution (all grids)", st)

    if "heads" in grid_vals:
        with Step(device) as st, torch.no_grad():
            vals = grid_vals["heads"].mean(0)  # [L, H]
            top = vals.flatten().argsort(descending=True)[:20].tolist()
            sel = [(i // H, i % H) for i in top]
            c = obj + 1
            patch_heads(m, receiver, source, sel, [c], metric)
            hooks = head_patch_hooks(source, sel, [c])
            m.generate(harmless.ids, harmless.mask, max_new_tokens=gen_tokens, fwd_hooks=hooks, stop_at_eos=False)
        record(f"heads (top-20 patched + {gen_tokens}-token generation)", st)

    total = sum(s["wall"] for s in steps)
    out = dict(config=name, layers=L, d_model=m.cfg.d_model, heads=H, weights_gib=round(weight_bytes(m) / GiB, 2),
               dtype=str(dtype).replace("torch.", ""), device=str(device), prompts=n, seq_len=T,
               one_forward_s=one_fwd, auto_max_rows=rows_fit, steps=steps, total_s=total)
    del m, model, receiver, source
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if folder:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return out


def print_table(results: list[dict], env: dict) -> None:
    print("\n" + " | ".join(f"{k}: {v}" for k, v in env.items()))
    for r in results:
        print(f"\n### Gemma-2 {r['config']} config ({r['layers']} layers, d={r['d_model']}, {r['heads']} heads, "
              f"{r['weights_gib']} GiB {r['dtype']} weights) on {r['device']}, {r['prompts']} pairs × "
              f"{r['seq_len']} tokens; one full forward {r['one_forward_s'] * 1000:.1f} ms; "
              f"cone batch from free memory: {r['auto_max_rows']} rows\n")
        print("| step | wall s | peak GPU mem GiB | cells | naive est. s (cells × 1 forward) | naive / ours |")
        print("|---|---:|---:|---:|---:|---:|")
        for s in r["steps"]:
            peak = f"{s['peak'] / GiB:.2f}" if s.get("peak") is not None else "–"
            print(f"| {s['step']} | {s['wall']:.2f} | {peak} | {s.get('cells', '')} | {s.get('naive_est_s', '')} | "
                  f"{s.get('naive_over_ours', '')} |")
        print(f"| **total** | **{r['total_s']:.1f}** | | | | |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=None, help="comma list of 2b, 9b, tiny (default: 2b,9b on CUDA, tiny on CPU)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--prompts", type=int, default=None, help="pairs (default 7 on CUDA, 3 on CPU)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per prompt (default 40 on CUDA, 12 on CPU)")
    ap.add_argument("--grids", default="all", help=f"comma list of {', '.join(GRIDS)} or 'all'")
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--via-disk", action="store_true", help="also save + load_model() the weights (disk space!)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = (args.configs or ("2b,9b" if cuda else "tiny")).split(",")
    if not cuda and any(c != "tiny" for c in configs):
        print("no CUDA: falling back to the tiny Gemma 2 config", flush=True)
        configs = ["tiny"]
    from refusal_lab.models.hf_loading import resolve_dtype

    dtype = resolve_dtype(args.dtype or ("bfloat16" if cuda else "float32"))
    n = args.prompts or (7 if cuda else 3)
    T = args.seq_len or (40 if cuda else 12)
    grids = list(GRIDS) if args.grids == "all" else [g.strip() for g in args.grids.split(",") if g.strip()]
    import transformers

    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "transformers": transformers.__version__,
           "machine": (torch.cuda.get_device_name(device) if cuda else
                       f"{platform.machine()} {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}")}
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    results = [bench_one(c.strip(), dtype, device, n, T, args.via_disk, grids, args.gen_tokens) for c in configs]
    print_table(results, env)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
