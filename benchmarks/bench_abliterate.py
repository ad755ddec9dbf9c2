"""Optimised abliteration side by side: heretic (PyPI ``heretic-llm``, AGPL-3.0; run as a separate
program, no code of it copied here) vs ``refusal-lab abliterate --optimize``, on the offline default
model (Qwen2.5-Coder-0.5B-Instruct, fp32, CPU).

    python benchmarks/bench_abliterate.py --out benchmarks/results/abliterate_run \
        [--stage heretic|ours|evaluate|all] [--trials 6] [--n-opt 24] [--n-eval 50]

Both tools get **the same prompts** (written as text files under OUT/prompts/): the 32+32 packaged
*train* instructions for the refusal direction, ``--n-opt`` HarmBench *val* behaviours (harmful) and
``--n-opt`` harmless *val* instructions to score trials on; **the same judge** (refusal-lab's substring
list, given to heretic as ``--refusal-markers``), the same generation length (``--opt-tokens``), the
same chat prompt (Qwen's default system turn, given to heretic as ``--system-prompt``), the same seed
and **the same number of trials**. Each tool picks its model by a rule and saves it to OUT/heretic/model
and OUT/ours/model.

heretic asks on stdin which Pareto trial to keep; it is driven through a pipe (``COLAB_GPU=1`` makes it
ask with plain ``input()``): of the trials it offers (its Pareto front, sorted by refusals then KL), we
pick the first whose KL <= ``--max-kl`` (0.5, our own rule's bound; heretic's menu warns above 0.5),
else the last (lowest KL) -- the same rule as ``choose_trial`` in refusal-lab.

``--stage evaluate`` then measures the unedited model and both saved models with ONE code path (each
folder loaded with plain ``transformers.AutoModelForCausalLM.from_pretrained``): held-out HarmBench *test*
behaviours (``--n-eval``) -> greedy completions (``--eval-tokens``) -> refusal-lab's substring judge ->
k/n with a Wilson 95 % interval; held-out harmless *test* instructions (``--n-eval``) -> first-token
KL(original || model) and the CE of the original model's own greedy completions, mean +- SE over prompts.

Stages cache: a stage whose result file exists is skipped (``--force`` reruns it). Each stage prints one
progress line. Run heavy stages under ``flock /tmp/refusal-lab-cpu.lock``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
"""Qwen2.5's default system turn: what its chat template inserts when no system message is given,
which is how refusal-lab formats prompts; heretic gets it explicitly so both see identical prompts."""


def say(msg: str) -> None:
    print(f"[bench_abliterate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from refusal_lab.models.offline import offline_model_dir

    return offline_model_dir(progress=False)


def one_line(p: str) -> str:
    return " ".join(p.split())


def write_prompts(out: Path, n_opt: int, n_train: int, seed: int) -> dict:
    """The prompts both tools optimise on, as one-prompt-per-line files (what heretic reads)."""
    from refusal_lab.prompts.data import load_instructions
    from refusal_lab.prompts.eval_sets import load_eval_set
    from refusal_lab.steering.batching import instruction_sample

    d = out / "prompts"
    d.mkdir(parents=True, exist_ok=True)
    train = instruction_sample("train", n_train, seed)
    sets = {"train_harmful": train["harmful"], "train_harmless": train["harmless"],
            "opt_harmful": load_eval_set("harmbench", "optimize", n_opt, seed),
            "opt_harmless": load_instructions("val", "harmless", n_opt, seed)}
    files = {}
    for k, v in sets.items():
        (d / f"{k}.txt").write_text("\n".join(one_line(x) for x in v) + "\n", encoding="utf-8")
        files[k] = {"file": str(d / f"{k}.txt"), "n": len(v)}
    return files


# ------------------------------------------------------------------ heretic


def heretic_args(args, model: Path, files: dict, hdir: Path) -> list[str]:
    from refusal_lab.steering.evaluation import REFUSAL_SUBSTRINGS

    def ds(k):
        return json.dumps({"dataset": files[k]["file"]})

    return [str(args.heretic), "--model", str(model), "--n-trials", str(args.trials), "--seed", str(args.seed),
            "--batch-size", str(args.batch_size), "--max-response-length", str(args.opt_tokens),
            "--dtypes", json.dumps(["float32"]), "--device-map", "cpu", "--system-prompt", QWEN_SYSTEM,
            "--refusal-markers", json.dumps(list(REFUSAL_SUBSTRINGS)), "--export-strategy", "merge",
            "--study-checkpoint-dir", str(hdir / "checkpoints"),
            "--good-prompts", ds("train_harmless"), "--bad-prompts", ds("train_harmful"),
            "--good-evaluation-prompts", ds("opt_harmless"), "--bad-evaluation-prompts", ds("opt_harmful")]


TRIAL_RE = re.compile(r"\[(\d+)\]\s*\[Trial\s+(\d+)\]\s*Refusals:\s*(\d+)/(\d+),\s*KL divergence:\s*([0-9.]+)")


def run_heretic(args, model: Path, files: dict, out: Path) -> dict:
    hdir = out / "heretic"
    hdir.mkdir(parents=True, exist_ok=True)
    save_to = hdir / "model"
    cmd = heretic_args(args, model, files, hdir)
    env = dict(os.environ, COLAB_GPU="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               COLUMNS="250", TERM="dumb")
    log = open(hdir / "heretic.log", "w", encoding="utf-8")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=hdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=0)
    state = {"menu_seen": 0, "saved": False, "chosen": None, "offered": [], "t_opt_done": None}

    def answer(s: str) -> None:
        log.write(f"\n>>> {s}\n")
        proc.stdin.write(s + "\n")
        proc.stdin.flush()

    text = ""
    while True:
        ch = proc.stdout.read(1)
        if not ch:
            break
        log.write(ch)
        text += ch
        if len(text) > 20000:
            text = text[-20000:]
        if not (text.endswith("Enter number: ") or text.endswith("Path to the folder:: ")):
            continue
        tail = text[-6000:]
        if text.endswith("Path to the folder:: "):
            answer(str(save_to))
            state["saved"] = True
        elif "Which trial do you want to use?" in tail.split("What do you want to do")[-1] and (
                tail.rfind("Which trial") > tail.rfind("What do you want to do")):
            menu = tail[tail.rfind("Which trial"):]
            offered = [dict(item=int(a), trial=int(b), refusals=int(c), n=int(d), kl=float(e))
                       for a, b, c, d, e in TRIAL_RE.findall(menu)]
            n_items = len(re.findall(r"^\[(\d+)\]", menu, flags=re.M))
            if state["chosen"] is None:
                state["t_opt_done"] = time.perf_counter() - t0
                state["offered"] = offered
                ok = [o for o in offered if o["kl"] <= args.max_kl]
                state["chosen"] = ok[0] if ok else offered[-1]
                answer(str(state["chosen"]["item"]))
            else:
                answer(str(n_items))  # "Exit program", the last item
        else:  # "What do you want to do with the decensored model?"
            answer("1" if not state["saved"] else "5")  # save; then back to the trial menu
    rc = proc.wait()
    wall = time.perf_counter() - t0
    log.close()
    ok = (save_to / "config.json").is_file()
    rec = {"cmd": cmd, "rc": rc, "wall_s": wall, "optimisation_wall_s": state["t_opt_done"],
           "offered_pareto": state["offered"], "chosen": state["chosen"],
           "choice_rule": f"first offered Pareto trial (heretic's order: refusals, then KL) with KL <= {args.max_kl:g}, "
                          "else the last (lowest KL)",
           "model": str(save_to) if ok else None, "log": str(hdir / "heretic.log")}
    m = re.search(r"Initial refusals: (\d+)/(\d+)", open(hdir / "heretic.log").read())
    if m:
        rec["initial_refusals_opt_split"] = [int(m.group(1)), int(m.group(2))]
    if not ok:
        rec["error"] = f"heretic exited {rc} without saving a model; see {hdir / 'heretic.log'}"
    return rec


# ------------------------------------------------------------------ ours


def run_ours(args, model: Path, files: dict, out: Path) -> dict:
    odir = out / "ours"
    cmd = [sys.executable, "-c", "import sys; from refusal_lab.cli import main; sys.exit(main())",
           "abliterate", "--optimize", "--model", str(model), "--dtype", "float32", "--device", "cpu",
           "--out", str(odir), "--trials", str(args.trials), "--eval-set", "harmbench",
           "--n-harmful", str(files["opt_harmful"]["n"]), "--n-harmless", str(files["opt_harmless"]["n"]),
           "--n-train", str(files["train_harmful"]["n"]), "--seed", str(args.seed),
           "--max-new-tokens", str(args.opt_tokens), "--max-kl", str(args.max_kl), "--quiet"]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    with open(out / "ours.log", "w") as log:
        rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    rec = {"cmd": cmd, "rc": rc, "wall_s": wall, "log": str(out / "ours.log")}
    oj = odir / "optimize.json"
    if oj.is_file():
        r = json.loads(oj.read_text())
        rec["chosen"] = {"number": r["chosen"]["number"], "rule": r["chosen"]["rule"],
                         "optimize": r["chosen"]["optimize"]}
        rec["baseline_opt_split"] = r["baseline"]["refusal"]["k"], r["baseline"]["refusal"]["n"]
        rec["prompts"] = r["prompts"]
    ok = (odir / "model" / "config.json").is_file()
    rec["model"] = str(odir / "model") if ok else None
    if not ok:
        rec["error"] = f"refusal-lab exited {rc} without a saved model; see {out / 'ours.log'}"
    return rec


# ------------------------------------------------------------------ one evaluation for all


def evaluate(args, model: Path, folders: dict[str, str | None]) -> dict:
    import torch
    import transformers

    from refusal_lab.prompts import build_instruction_prompts
    from refusal_lab.prompts.data import load_instructions
    from refusal_lab.prompts.eval_sets import load_eval_set
    from refusal_lab.stats import mean_se, wilson_interval
    from refusal_lab.steering.evaluation import REFUSAL_SUBSTRINGS, SubstringJudge

    torch.set_grad_enabled(False)
    tok = transformers.AutoTokenizer.from_pretrained(str(model))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen_eos = transformers.GenerationConfig.from_pretrained(str(model)).eos_token_id
    eos = {tok.eos_token_id} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    harmful = load_eval_set("harmbench", "heldout", args.n_eval, args.seed)
    harmless = load_instructions("test", "harmless", args.n_eval, args.seed)
    judge = SubstringJudge()
    B = args.batch_size

    def batches(prompts):
        for i in range(0, len(prompts), B):
            ids, mask = build_instruction_prompts(tok, prompts[i:i + B])
            yield ids, mask

    def fwd(m, ids, mask):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        return m(input_ids=ids, attention_mask=mask, position_ids=pos).logits.to(torch.float64)

    def generate(m, ids, mask, n):
        g = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                       pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        return g[:, ids.shape[1]:]

    # the original model's first-token distributions and own greedy completions (harmless)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    base_lp, base_gen = [], []
    for ids, mask in batches(harmless):
        base_lp.append(torch.log_softmax(fwd(base, ids, mask)[:, -1], -1))
        gen = generate(base, ids, mask, args.ce_tokens)
        is_eos = torch.isin(gen, torch.tensor(sorted(eos | {pad})))
        keep = (is_eos.long().cumsum(1) == 0)  # tokens before the first eos
        base_gen.append((gen, keep))
    del base

    res = {}
    for name, folder in folders.items():
        if folder is None:
            res[name] = {"error": "no saved model"}
            continue
        t0 = time.perf_counter()
        m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        completions = []
        for ids, mask in batches(harmful):
            gen = generate(m, ids, mask, args.eval_tokens)
            completions += tok.batch_decode(gen, skip_special_tokens=True)
        refused = judge(harmful, completions)
        k, n = sum(refused), len(refused)
        kls, ces = [], []
        for (ids, mask), lp0, (gen, keep) in zip(batches(harmless), base_lp, base_gen):
            full = torch.cat([ids, gen], 1)
            fmask = torch.cat([mask, torch.ones_like(gen)], 1)
            logits = fwd(m, full, fmask)
            T = ids.shape[1]
            lp = torch.log_softmax(logits[:, T - 1], -1)
            kls += (lp0.exp() * (lp0 - lp)).sum(-1).tolist()
            nll = -torch.log_softmax(logits[:, T - 1:T - 1 + gen.shape[1]], -1).gather(-1, gen[..., None])[..., 0]
            for row, kp in zip(nll, keep):
                if kp.any():
                    ces.append(float(row[kp].mean()))
        kl_m, kl_se = mean_se(torch.tensor(kls))
        ce_m, ce_se = mean_se(torch.tensor(ces))
        res[name] = {"folder": folder, "refusals": {"k": k, "n": n, "rate": k / n, "wilson95": wilson_interval(k, n)},
                     "kl_first_token": {"mean": float(kl_m), "se": float(kl_se), "n": len(kls)},
                     "ce_original_completions": {"mean": float(ce_m), "se": float(ce_se), "n": len(ces),
                                                 "per_prompt": ces},
                     "samples": [{"prompt": p, "completion": c, "refused": r}
                                 for p, c, r in list(zip(harmful, completions, refused))[:5]],
                     "eval_s": time.perf_counter() - t0}
        del m
        say(f"evaluated {name}: refusals {k}/{n}, KL {float(kl_m):.4f}, CE {float(ce_m):.4f}")
    # the CE increase, paired over prompts, against the unedited model
    if "unedited" in res and "ce_original_completions" in res["unedited"]:
        b = torch.tensor(res["unedited"]["ce_original_completions"]["per_prompt"])
        for name, r in res.items():
            if "ce_original_completions" in r:
                d, se = mean_se(torch.tensor(r["ce_original_completions"]["per_prompt"]) - b)
                r["ce_increase"] = {"mean": float(d), "se": float(se), "n": int(b.numel())}
    return {"judge": f"refusal-lab SubstringJudge (REFUSAL_SUBSTRINGS: {list(REFUSAL_SUBSTRINGS)})",
            "harmful": {"set": "HarmBench standard behaviours, test split (held out)", "n": len(harmful)},
            "harmless": {"set": "refusal-lab harmless instructions, test split (held out)", "n": len(harmless)},
            "eval_tokens": args.eval_tokens, "ce_tokens": args.ce_tokens, "models": res}


# ------------------------------------------------------------------ main


def machine() -> dict:
    name = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "python": platform.python_version()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--stage", choices=["heretic", "ours", "evaluate", "all"], default="all")
    p.add_argument("--trials", type=int, default=6, help="trials of each tool (default 6)")
    p.add_argument("--n-opt", type=int, default=24, help="harmful and harmless prompts each tool scores trials on")
    p.add_argument("--n-train", type=int, default=32, help="harmful and harmless train instructions for the direction")
    p.add_argument("--n-eval", type=int, default=50, help="held-out harmful and harmless prompts of the evaluation")
    p.add_argument("--opt-tokens", type=int, default=16, help="tokens generated per prompt to judge refusal while optimising")
    p.add_argument("--eval-tokens", type=int, default=32, help="tokens generated per held-out harmful prompt")
    p.add_argument("--ce-tokens", type=int, default=16, help="length of the original's harmless completions (CE)")
    p.add_argument("--max-kl", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", help="the local model folder (default: refusal-lab's cached offline default)")
    p.add_argument("--heretic", type=Path, default=Path("/work/heretic-venv/bin/heretic"))
    p.add_argument("--force", action="store_true", help="rerun stages whose results exist")
    a = p.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    model = model_dir(a.model)
    files = write_prompts(out, a.n_opt, a.n_train, a.seed)
    stages = ["heretic", "ours", "evaluate"] if a.stage == "all" else [a.stage]
    for st in stages:
        f = out / f"{st}.json"
        if f.is_file() and not a.force:
            say(f"stage {st}: cached ({f})")
            continue
        say(f"stage {st}: running ...")
        t0 = time.perf_counter()
        if st == "heretic":
            rec = run_heretic(a, model, files, out)
        elif st == "ours":
            rec = run_ours(a, model, files, out)
        else:
            h = json.loads((out / "heretic.json").read_text()) if (out / "heretic.json").is_file() else {}
            o = json.loads((out / "ours.json").read_text()) if (out / "ours.json").is_file() else {}
            rec = evaluate(a, model, {"unedited": str(model), "heretic": h.get("model"), "ours": o.get("model")})
        f.write_text(json.dumps(rec, indent=2) + "\n")
        say(f"stage {st}: done in {time.perf_counter() - t0:.0f} s" + (f" ({rec['error']})" if "error" in rec else ""))
    summary = {"machine": machine(), "settings": vars(a) | {"out": str(a.out), "heretic": str(a.heretic)},
               "model": str(model), "prompts": files}
    for st in ("heretic", "ours", "evaluate"):
        if (out / f"{st}.json").is_file():
            summary[st] = json.loads((out / f"{st}.json").read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ev = summary.get("evaluate", {}).get("models", {})
    if ev:
        print(f"\n{'model':<10} {'refusals k/n [Wilson 95%]':<30} {'KL (SE)':<18} {'CE (SE)':<18} {'wall s':>8}")
        for name in ("unedited", "heretic", "ours"):
            r = ev.get(name, {})
            if "refusals" not in r:
                print(f"{name:<10} {r.get('error', 'n/a')}")
                continue
            rf, kl, ce = r["refusals"], r["kl_first_token"], r["ce_original_completions"]
            lo, hi = rf["wilson95"]
            wall = summary.get(name, {}).get("wall_s")
            print(f"{name:<10} {rf['k']:>3}/{rf['n']:<3} [{lo:.2f}, {hi:.2f}]{'':<13} "
                  f"{kl['mean']:.4f} ({kl['se']:.4f})  {ce['mean']:.4f} ({ce['se']:.4f})  "
                  f"{'-' if wall is None else round(wall):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
