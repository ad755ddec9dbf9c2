"""Time activation-patching grids three ways on the same cells and check they agree.

    python benchmarks/bench_patching.py [--model tiny|real | --tiny] [--grid all] [--threads 2]

Methods (all fp32, CPU unless a GPU is there, same receiver/source/metric):

* ``ours``     refusal_lab's cone engine: ``Receiver.record`` + ``patch_grid``.
* ``tl``       TransformerLens 4.3 ``patching`` on a ``TransformerBridge`` wrapping its own copy of
               the same HF weights: ``get_act_patch_resid_pre`` / ``get_act_patch_attn_out`` /
               ``get_act_patch_mlp_out`` / ``get_act_patch_attn_head_out_by_pos``; ``resid_post``
               has no ready-made function, so ``generic_activation_patch`` with TL's
               ``layer_pos_patch_setter``; the cumulative grids have no TL function at all, so the
               naive loop: one ``run_with_hooks`` per cell replacing the site at layers 0..l. TL's
               functions sweep every position by default; we pass ``index_df`` with exactly our
               cells, so TL runs one full forward (whole batch, all positions, full logits) per
               cell -- its normal cost per cell.
* ``nnsight``  nnsight (``TransformersModel`` around its own copy of the HF model): one trace per
               ``--nnsight-cells`` cells, one ``invoke`` per cell (each invoke = the whole receiver
               batch), editing the decoder layer input (resid_pre) / output (resid_post) /
               ``self_attn`` output (attn_out) / ``mlp`` output (mlp_out) / ``o_proj`` input
               (heads); cumulative cells edit layers 0..l inside one invoke.

The grid (``--model real``): Qwen2.5-Coder-0.5B-Instruct (offline cache), the 7+7
``seed_gemma2_replication`` objects, harmful -> harmless (receiver = harmless prompts, source =
harmful activations), metric logit[Sorry] - logit[Sure] per prompt at the last column.
``resid_pre``/``attn_out``: every layer x columns obj_index..T-1; ``heads``: every layer x every head,
patched at the ``post_obj`` column(s) (z, i.e. each head's input to o_proj).

Timed region per method: everything after the source activations exist (ours includes recording
the receiver run). Each method is warmed up once on a 1-2 cell slice first; ours is then timed
``--repeats`` rounds in which every method runs once, interleaved (ours, TL, nnsight, ours, ...),
so that load drifting on a shared machine hits all of them alike; each method's median round is
reported. Wall and
process-CPU seconds are both reported, plus "full-forward equivalents" (wall / one plain HF forward
timed just before the method), which stays comparable when the load on a shared machine drifts.
``--tl-max-cells`` / ``--nnsight-max-cells`` run an evenly spaced subset and extrapolate the
full-grid time from the per-cell time (marked ``*``). Exit status 1 if any method differs from ours
by more than ``--tol`` (1e-4). ``--profile`` only profiles ours (torch op table + cProfile).

``--model tiny``: a 3-layer random qwen2 (``tests/tiny_models.py``) with random ids, for a CI
smoke test in seconds (no downloads).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # TL's sweep has a progress bar per grid
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.tiny_models: the test suite's tiny-model builder
try:
    import refusal_lab  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

from refusal_lab.models.hooked import HookedChatModel  # noqa: E402
from refusal_lab.patching.engine import GRID_SITES, GRIDS, Batch, GridSpec, LogitDiff, Receiver, patch_grid  # noqa: E402

GRID_CHOICES = GRIDS  # resid_pre, resid_post, attn_out, mlp_out, attn_out_cumulative, mlp_out_cumulative, heads
METHODS = ("ours", "tl", "nnsight")


# ------------------------------------------------------------------------------------ the setup
@dataclass
class Setup:
    model: HookedChatModel  # ours
    fresh_hf: callable  # () -> a new HF model object with the same weights (TL / nnsight rewire theirs)
    tokenizer: object
    tok_dir: str  # a folder the TL bridge can re-load the tokenizer from
    receiver: Batch  # harmless
    source: Batch  # harmful
    refusal_id: int
    compliance_id: int
    cols: list[int]  # obj_index..T-1
    head_cols: list[int]  # post_obj
    info: dict = field(default_factory=dict)


def _tiny_tokenizer_dir(vocab_size: int) -> str:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2", bos_token="t3"
    )
    path = tempfile.mkdtemp(prefix="bench_tiny_tok_")
    fast.save_pretrained(path)
    return path


def setup_tiny(device: str) -> Setup:
    import transformers

    from tests.tiny_models import tiny_model

    model = HookedChatModel(tiny_model("qwen2").to(device), name="tiny-qwen2")
    n, T, obj = 3, 12, 6
    g = torch.Generator().manual_seed(0)
    src_ids = torch.randint(4, model.cfg.d_vocab, (n, T), generator=g)
    rec_ids = src_ids.clone()
    rec_ids[:, obj] = torch.randint(4, model.cfg.d_vocab, (n,), generator=g)  # the "object" column
    mask = torch.ones(n, T, dtype=torch.long)
    tok_dir = _tiny_tokenizer_dir(model.cfg.d_vocab)
    return Setup(
        model=model,
        fresh_hf=lambda: tiny_model("qwen2").to(device),
        tokenizer=transformers.AutoTokenizer.from_pretrained(tok_dir),
        tok_dir=tok_dir,
        receiver=Batch(rec_ids.to(device), mask.to(device)),
        source=Batch(src_ids.to(device), mask.clone().to(device)),
        refusal_id=3,
        compliance_id=7,
        cols=list(range(obj, T)),
        head_cols=[obj + 1],
        info={"model": "tiny qwen2 (3 layers, d=64, 4 heads, random weights)", "prompts": f"{n} random pairs, T={T}"},
    )


def setup_real(device: str) -> Setup:
    from refusal_lab.metrics import resolve_refusal_tokens
    from refusal_lab.models.loading import load_model
    from refusal_lab.prompts import build_object_prompts, load_objects

    model = load_model(None, device=device)
    tok = model.tokenizer
    prompts = build_object_prompts(tok, load_objects("seed_gemma2_replication"))
    rt = resolve_refusal_tokens(tok, "Sorry", "Sure")
    rec = Batch(prompts.ids("harmless").to(device), prompts.mask("harmless").to(device))
    src = Batch(prompts.ids("harmful").to(device), prompts.mask("harmful").to(device))
    if not (bool(rec.mask.all()) and bool(src.mask.all())):
        raise SystemExit("the prompts are padded: TL's patching functions pass no attention mask, so the "
                         "comparison would not be like for like")
    return Setup(
        model=model,
        fresh_hf=lambda: load_model(None, device=device).hf_model,
        tokenizer=tok,
        tok_dir=tok.name_or_path,
        receiver=rec,
        source=src,
        refusal_id=rt.refusal_id,
        compliance_id=rt.compliance_id,
        cols=list(range(prompts.obj_index, prompts.seq_len)),
        head_cols=prompts.resolve_positions("post_obj"),
        info={"model": model.cfg.model_name, "prompts": f"{prompts.n_pairs}+{prompts.n_pairs} seed_gemma2_replication, "
              f"T={prompts.seq_len}, obj_index={prompts.obj_index}, post_obj={prompts.resolve_positions('post_obj')}"},
    )


# ----------------------------------------------------------------------------------- the cells
def grid_spec(s: Setup, grid: str) -> GridSpec:
    L, H = s.model.cfg.n_layers, s.model.cfg.n_heads
    if grid == "heads":
        return GridSpec("heads", list(range(L)), list(s.head_cols), list(range(H)))
    return GridSpec(grid, list(range(L)), list(s.cols))


def all_cells(spec: GridSpec) -> list[tuple[int, int]]:
    """(a, b) grid indices: a indexes spec.layers, b spec.cols (or spec.heads)."""
    return [(a, b) for a in range(spec.shape[0]) for b in range(spec.shape[1])]


def subset(cells: list, k: int | None) -> list:
    if not k or k >= len(cells):
        return cells
    idx = torch.linspace(0, len(cells) - 1, k).round().long().unique().tolist()
    return [cells[i] for i in idx]


class Clock:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


# ------------------------------------------------------------------------------------- methods
def run_ours(s: Setup, spec: GridSpec, warm: bool = True) -> tuple[torch.Tensor, Clock]:
    m = s.model
    metric = LogitDiff(s.refusal_id, s.compliance_id)
    site = GRID_SITES[spec.grid]
    keep = lambda n: n.endswith(site)  # noqa: E731
    with torch.no_grad():
        _, cache = m.run_with_cache(s.source.ids, s.source.mask, names=keep, logits="none")
        if warm:
            small = GridSpec(spec.grid, spec.layers[-1:], spec.cols[-1:] if spec.grid != "heads" else spec.cols,
                             spec.heads[:2] if spec.grid == "heads" else None)
            patch_grid(m, Receiver.record(m, s.receiver, metric), cache, small, metric, progress=False)
        with Clock() as clk:
            receiver = Receiver.record(m, s.receiver, metric)
            vals = patch_grid(m, receiver, cache, spec, metric, progress=False)
    return vals, clk


def boot_bridge(s: Setup):
    from transformer_lens.model_bridge import TransformerBridge

    hf = s.fresh_hf()
    bridge = TransformerBridge.boot_transformers(
        s.tok_dir, hf_model=hf, tokenizer=s.tokenizer, device=str(s.model.device), dtype=torch.float32,
        hf_config_overrides={"architectures": [type(hf).__name__]},
    )
    return bridge.eval()


def run_tl(bridge, s: Setup, spec: GridSpec, cells: list, warm: bool = True) -> tuple[dict, Clock]:
    import pandas as pd
    from transformer_lens import patching

    R, C = s.refusal_id, s.compliance_id

    def metric(logits):  # [batch] per prompt (reduce="none")
        return logits[:, -1, R] - logits[:, -1, C]

    act = GRID_SITES[spec.grid]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(s.source.ids, names_filter=lambda n: n.endswith(act))

    def sweep(cells_):
        if spec.grid.endswith("cumulative"):
            # TL has no cumulative patching function: the naive loop, one run_with_hooks per cell with
            # the site replaced at layers 0..l (column c), whole batch, all positions, full logits
            out = []
            for a, b in cells_:
                l, c = spec.layers[a], spec.cols[b]

                def put(key, c=c):
                    def fn(x, hook):
                        x[:, c] = cache[key][:, c]
                        return x

                    return fn

                names = [f"blocks.{k}.{act}" for k in range(l + 1)]
                logits = bridge.run_with_hooks(s.receiver.ids, fwd_hooks=[(n, put(n)) for n in names])
                out.append(metric(logits))
            return _Vals(torch.stack(out))
        if spec.grid == "heads" and len(spec.cols) == 1:
            # TL's own per-(layer, pos, head) z patch, restricted to the post_obj column
            df = pd.DataFrame([(spec.layers[a], spec.cols[0], spec.heads[b]) for a, b in cells_],
                              columns=["layer", "pos", "head"])
            fn = patching.get_act_patch_attn_head_out_by_pos
            return fn(bridge, s.receiver.ids, cache, metric, index_axis_names=None, index_df=df, reduce="none")
        if spec.grid == "heads":  # several post_obj columns: one head patched at all of them at once
            cols = list(spec.cols)

            def setter(act_, index, clean):
                act_[:, cols, index[1]] = clean[:, cols, index[1]]
                return act_

            df = pd.DataFrame([(spec.layers[a], spec.heads[b]) for a, b in cells_], columns=["layer", "head"])
            return patching.generic_activation_patch(bridge, s.receiver.ids, cache, metric, setter, "z",
                                                     index_df=df, reduce="none")
        df = pd.DataFrame([(spec.layers[a], spec.cols[b]) for a, b in cells_], columns=["layer", "pos"])
        if spec.grid == "resid_post":  # no get_act_patch_resid_post in TL: its generic patch with TL's setter
            return patching.generic_activation_patch(bridge, s.receiver.ids, cache, metric,
                                                     patching.layer_pos_patch_setter, "resid_post",
                                                     index_axis_names=None, index_df=df, reduce="none")
        fn = {"resid_pre": patching.get_act_patch_resid_pre, "attn_out": patching.get_act_patch_attn_out,
              "mlp_out": patching.get_act_patch_mlp_out}[spec.grid]
        return fn(bridge, s.receiver.ids, cache, metric, index_axis_names=None, index_df=df, reduce="none")

    with torch.no_grad():
        if warm:
            sweep(cells[:2])
        with Clock() as clk:
            res = sweep(cells)
    vals = res.values.float().cpu()  # [cells, batch]
    return {cell: vals[i] for i, cell in enumerate(cells)}, clk


@dataclass
class _Vals:
    values: torch.Tensor  # [cells, batch], like TL's PatchingResult.values


def wrap_nnsight(s: Setup):
    from nnsight import TransformersModel

    return TransformersModel(s.fresh_hf(), task="text-generation", tokenizer=s.tokenizer)


def _nn_site(nm, grid: str, layer: int):
    """The nnsight proxy of a grid's site (Qwen 2 / Llama: no post-norms, so the sublayer outputs
    are exactly what is added to the residual stream)."""
    layer_mod = nm.model.layers[layer]
    if grid == "resid_pre":
        return layer_mod.input  # hidden_states entering the decoder layer
    if grid == "resid_post":
        return layer_mod.output  # the decoder layer returns the new hidden_states (transformers 5)
    if grid.startswith("attn_out"):
        return layer_mod.self_attn.output[0]
    if grid.startswith("mlp_out"):
        return layer_mod.mlp.output
    return layer_mod.self_attn.o_proj.input  # [b, q, heads * d_head]


def run_nnsight(nm, s: Setup, spec: GridSpec, cells: list, per_trace: int, warm: bool = True):
    import nnsight

    R, C = s.refusal_id, s.compliance_id
    d_head = s.model.cfg.d_head
    inputs = {"input_ids": s.receiver.ids, "attention_mask": s.receiver.mask}
    with torch.no_grad():
        with nm.trace({"input_ids": s.source.ids, "attention_mask": s.source.mask}):
            src = nnsight.save([_nn_site(nm, spec.grid, l).clone() for l in spec.layers])

    def sweep(cells_):
        out = {}
        for c0 in range(0, len(cells_), per_trace):
            chunk = cells_[c0 : c0 + per_trace]
            with nm.trace() as tracer:
                vals = nnsight.save([])
                for a, b in chunk:
                    with tracer.invoke(inputs):
                        if spec.grid.endswith("cumulative"):  # layers 0..l, in execution order
                            c = spec.cols[b]
                            for k in range(spec.layers[a] + 1):
                                site = _nn_site(nm, spec.grid, k)
                                site[:, c] = src[k][:, c]
                        elif spec.grid == "heads":
                            site = _nn_site(nm, spec.grid, spec.layers[a])
                            h = spec.heads[b]
                            sl = slice(h * d_head, (h + 1) * d_head)
                            for c in spec.cols:
                                site[:, c, sl] = src[a][:, c, sl]
                        else:
                            site = _nn_site(nm, spec.grid, spec.layers[a])
                            c = spec.cols[b]
                            site[:, c] = src[a][:, c]
                        lg = nm.output.logits[:, -1]
                        vals.append(lg[:, R] - lg[:, C])
            out.update({cell: v.float().cpu() for cell, v in zip(chunk, vals)})
        return out

    with torch.no_grad():
        if warm:
            sweep(cells[:2])
        with Clock() as clk:
            out = sweep(cells)
    return out, clk


def ref_forward(s: Setup, n: int = 3) -> float:
    """Min wall seconds of one plain HF forward of the receiver batch (all positions, full logits):
    what one TL cell costs at best. Measured next to every method so that drifting load on a shared
    machine shows up ("full-forward equivalents" column)."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(n):
            with Clock() as clk:
                s.model.hf_model(input_ids=s.receiver.ids, attention_mask=s.receiver.mask)
            best = min(best, clk.wall)
    return best


# ---------------------------------------------------------------------------- logits parity
def logits_parity(s: Setup, bridge=None, nm=None) -> dict:
    out = {}
    with torch.no_grad():
        ours = s.model(s.receiver.ids, s.receiver.mask, logits="all")
        if bridge is not None:
            out["tl"] = float((bridge(s.receiver.ids) - ours).abs().max())
        if nm is not None:
            with nm.trace({"input_ids": s.receiver.ids, "attention_mask": s.receiver.mask}):
                lg = nm.output.logits.save()
            out["nnsight"] = float((lg - ours).abs().max())
    return out


# ------------------------------------------------------------------------------------- profile
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention")


def profile_ours(s: Setup, spec: GridSpec, top: int = 18) -> None:
    """Where ours spends its time: torch ops (self CPU time) and Python functions (cProfile)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    run_ours(s, spec)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _, clk = run_ours(s, spec, warm=False)
    ka = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ka)
    mm = sum(e.self_cpu_time_total for e in ka if e.key in MATMUL_OPS or "gemm" in e.key.lower())
    print(f"\n=== {spec.grid}: {clk.wall:.2f} s wall under the profiler; matmul/attention kernels "
          f"{100 * mm / total:.0f}% of self CPU time over {sum(e.count for e in ka)} op calls")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=top))
    pr = cProfile.Profile()
    pr.enable()
    run_ours(s, spec, warm=False)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(25)
    print(buf.getvalue())


# ---------------------------------------------------------------------------------------- main
def fmt_row(cols, widths):
    return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cols, widths)) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tiny", "real"), default="real")
    ap.add_argument("--tiny", action="store_true", help="same as --model tiny (CI smoke test)")
    ap.add_argument("--prompts", type=int, default=None, help="use only the first N prompt pairs")
    ap.add_argument("--max-cols", type=int, default=None,
                    help="use only the first K columns from the object on (per-position grids)")
    ap.add_argument("--grid", default="resid_pre", help=f"comma list of {', '.join(GRID_CHOICES)} or 'all'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="ours,tl,nnsight", help="comma list of ours, tl, nnsight")
    ap.add_argument("--tl-max-cells", type=int, default=None,
                    help="run only this many TL cells (evenly spaced) and extrapolate")
    ap.add_argument("--nnsight-max-cells", type=int, default=None, help="same for nnsight")
    ap.add_argument("--nnsight-cells", type=int, default=4, help="cells (invokes) per nnsight trace")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds; in each, every method runs once (interleaved); each method's median is reported")
    ap.add_argument("--profile", action="store_true",
                    help="only profile ours (torch.profiler op table + cProfile of the Python side) and exit")
    ap.add_argument("--tol", type=float, default=1e-4, help="exit 1 if a method differs from ours by more")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    grids = GRID_CHOICES if args.grid == "all" else tuple(g.strip() for g in args.grid.split(","))
    methods = tuple(m.strip() for m in args.methods.split(","))
    for g in grids:
        if g not in GRID_CHOICES:
            ap.error(f"unknown grid {g!r}")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}")
    if "ours" not in methods:
        ap.error("'ours' is the reference every other method is compared with")

    s = setup_tiny(args.device) if (args.model == "tiny" or args.tiny) else setup_real(args.device)
    if args.prompts:
        s.receiver = Batch(s.receiver.ids[: args.prompts], s.receiver.mask[: args.prompts])
        s.source = Batch(s.source.ids[: args.prompts], s.source.mask[: args.prompts])
        s.info["prompts"] += f" (first {s.receiver.n} pairs used)"
    if args.max_cols:
        s.cols = s.cols[: args.max_cols]
        s.info["columns"] = s.cols
    import transformers

    env = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f} at start",
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "device": args.device, **s.info,
    }
    try:
        import transformer_lens

        env["transformer_lens"] = transformer_lens.__version__
    except Exception:  # noqa: BLE001
        pass
    if "nnsight" in methods:
        try:
            import nnsight

            env["nnsight"] = nnsight.__version__
        except ImportError:
            print("nnsight is not installed: skipping it (pip install nnsight)")
            methods = tuple(m for m in methods if m != "nnsight")
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)

    results = []
    specs = {g: grid_spec(s, g) for g in grids}
    if args.profile:
        for g, spec in specs.items():
            profile_ours(s, spec)
        return 0
    ref_forward(s, 1)  # warm-up
    bridge = nm = None
    parity = {}
    if "tl" in methods:
        bridge = boot_bridge(s)
        parity.update(logits_parity(s, bridge=bridge))
        print(f"full-forward logits max|diff| vs ours: TL bridge {parity['tl']:.2e}", flush=True)
    if "nnsight" in methods:
        nm = wrap_nnsight(s)
        parity.update(logits_parity(s, nm=nm))
        print(f"full-forward logits max|diff| vs ours: nnsight {parity['nnsight']:.2e}", flush=True)
    names = {"ours": "ours (cone engine)", "tl": "TransformerLens patching (bridge)",
             "nnsight": f"nnsight ({args.nnsight_cells} invokes/trace)"}
    ours_time = {}
    R = max(1, args.repeats)
    for g, spec in specs.items():
        # the methods interleaved, R rounds; each method's median round is reported (shared machine)
        fwd = ref_forward(s)
        runs: dict[str, list] = {m: [] for m in methods}
        cells = {"tl": subset(all_cells(spec), args.tl_max_cells),
                 "nnsight": subset(all_cells(spec), args.nnsight_max_cells)}
        for rnd in range(R):
            for m in methods:
                if m == "ours":
                    runs[m].append(run_ours(s, spec, warm=(rnd == 0)))
                elif m == "tl":
                    runs[m].append(run_tl(bridge, s, spec, cells["tl"], warm=(rnd == 0)))
                else:
                    runs[m].append(run_nnsight(nm, s, spec, cells["nnsight"], args.nnsight_cells, warm=(rnd == 0)))
            print(f"[{g}] round {rnd + 1}/{R}: " + ", ".join(f"{m} {runs[m][-1][1].wall:.2f} s" for m in methods),
                  flush=True)
        med = {m: _median_run(runs[m]) for m in methods}
        vals, clk = med["ours"]
        spread = max(float((v - vals).abs().max()) for v, _ in runs["ours"])
        assert spread < 1e-5, spread  # deterministic
        ours_time[g] = clk
        n_cells = spec.shape[0] * spec.shape[1]
        results.append(dict(grid=g, method=names["ours"], cells=n_cells, run_cells=n_cells, wall=clk.wall,
                            cpu=clk.cpu, extrapolated=False, max_diff=0.0, fwd=fwd,
                            all_walls=[round(c.wall, 2) for _, c in runs["ours"]]))
        print(f"[{g}] ours: {n_cells} cells, median {clk.wall:.2f} s wall, {clk.cpu:.2f} s CPU", flush=True)
        for m in methods:
            if m == "ours":
                continue
            v, c = med[m]
            results.append(_compare(g, names[m], spec, cells[m], v, c, vals, fwd))
            results[-1]["all_walls"] = [round(c_.wall, 2) for _, c_ in runs[m]]
            print(f"[{g}] {m}: {_line(results[-1])}", flush=True)
    del bridge, nm
    gc.collect()

    env["load_avg_end"] = round(os.getloadavg()[0], 1)
    for r in results:
        base = ours_time[r["grid"]]
        r["ratio_wall"] = r["wall"] / base.wall
        r["ratio_cpu"] = r["cpu"] / base.cpu
    print_table(results, env, parity)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "logits_parity": parity, "results": results}, indent=2))
    bad = [r for r in results if not r["max_diff"] <= args.tol]
    for r in bad:
        print(f"FAIL: {r['grid']} {r['method']} differs from ours by {r['max_diff']:.2e} > {args.tol:g}")
    return 1 if bad else 0


def _median_run(runs: list) -> tuple:
    """The (values, clock) of the median-wall run (the lower median for an even count)."""
    ordered = sorted(runs, key=lambda r: r[1].wall)
    return ordered[(len(ordered) - 1) // 2]


def _compare(grid, name, spec, cells, vals, clk, ours, fwd):
    diff = max(float((vals[(a, b)].cpu() - ours[:, a, b]).abs().max()) for a, b in cells)
    total = spec.shape[0] * spec.shape[1]
    scale = total / len(cells)
    return dict(grid=grid, method=name, cells=total, run_cells=len(cells), wall=clk.wall * scale, cpu=clk.cpu * scale,
                extrapolated=len(cells) < total, max_diff=diff, fwd=fwd)


def _line(r):
    ex = f" (ran {r['run_cells']}, extrapolated)" if r["extrapolated"] else ""
    return (f"{r['cells']} cells{ex}, {r['wall']:.2f} s wall, {r['cpu']:.2f} s CPU, "
            f"max|diff| vs ours {r['max_diff']:.2e}")


def _sec(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def print_table(results, env, parity):
    head = ["grid", "method", "cells", "wall s", "CPU s", "wall × ours", "CPU × ours", "full-fwd equiv.",
            "max |diff| vs ours"]
    rows = []
    for r in sorted(results, key=lambda r: GRID_CHOICES.index(r["grid"])):
        star = "*" if r["extrapolated"] else ""
        cells = f"{r['cells']}" + (f" (ran {r['run_cells']})" if r["extrapolated"] else "")
        rows.append([r["grid"], r["method"], cells, f"{_sec(r['wall'])}{star}", f"{_sec(r['cpu'])}{star}",
                     f"{r['ratio_wall']:.1f}", f"{r['ratio_cpu']:.1f}", f"{r['wall'] / r['fwd']:.1f}",
                     f"{r['max_diff']:.1e}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print()
    print(fmt_row(head, widths))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(fmt_row(row, widths))
    if any(r["extrapolated"] for r in results):
        print("* extrapolated from the cells run (per-cell time × all cells); max |diff| over the cells run")
    print("full-fwd equiv. = wall s / (fastest of 3 plain HF forwards of the receiver batch, timed just before that "
          "method): a load-independent cost; TL needs >= 1 per cell")
    if parity:
        print("full-forward logits max |diff| vs ours: " + ", ".join(f"{k} {v:.1e}" for k, v in parity.items()))
    print(f"load average at end: {env['load_avg_end']}")


if __name__ == "__main__":
    raise SystemExit(main())
