"""The ``refusal-lab`` command: ``run``, ``inspect``, ``compare``, ``abliterate``, ``export-direction``.

Bad input gets one sentence and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="hub id, local folder or .gguf file (default: the offline Qwen2.5-Coder-0.5B-Instruct)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--device-map", help="'auto' to spread layers over several GPUs")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repo's own code (off by default)")
    p.add_argument("--token", help="Hugging Face token for gated models (or set HF_TOKEN)")
    p.add_argument("--chat-template", help="a Jinja chat template file, for models without one")
    p.add_argument("--objects", help="object list: a packaged name (seed_gemma2_replication, arditi_obeso_2023, ...) or a JSON file")
    p.add_argument("--template", help="instruction template containing {object}")
    p.add_argument("--mode", choices=["single_token", "align"], default=None,
                   help="keep single-token objects only, or left-pad and align on the last object token")
    p.add_argument("--refusal", help="refusal token string (default Sorry; 'auto' proposes the pair from the model's top next tokens)")
    p.add_argument("--compliance", help="compliance token string (default Sure; 'auto' as for --refusal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-lab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole replication: DLA, every patching grid, refusal heads, steering, report")
    _add_model_args(run)
    run.add_argument("--out", type=Path, help="run folder (default: runs/<model>)")
    run.add_argument("--config", type=Path, help="JSON file with run settings (see RunConfig); flags override it")
    run.add_argument("--grids", help="comma-separated subset of resid_pre,resid_post,attn_out,mlp_out,"
                                     "attn_out_cumulative,mlp_out_cumulative,heads")
    run.add_argument("--necessity", action="store_true", help="also patch harmless -> harmful")
    run.add_argument("--heads-position", help="label or index of the head-patching position (default post_obj)")
    run.add_argument("--threshold", type=float, help="refusal-head threshold (default 0.005)")
    run.add_argument("--no-attribution", action="store_true", help="skip attribution patching")
    run.add_argument("--no-steering", action="store_true",
                     help="skip the steering steps (direction selection, alpha sweeps, held-out refusal rates)")
    run.add_argument("--exhaustive", action="store_true",
                     help="score every refusal-direction candidate exactly (the paper's procedure; default: the "
                          "top candidates by a first-order estimate, with its agreement reported)")
    run.add_argument("--profile", action="store_true",
                     help="print each step's wall time, CPU time and peak memory when the run ends")
    run.add_argument("--judge", help="refusal judge for generations: substring (default), self (ask the model "
                                     "itself yes/no), or a chat model's hub id / folder")
    run.add_argument("--force", action="store_true", help="recompute finished steps / overwrite a different run")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--strict", action="store_true",
                     help="stop with an error (exit 2) when the model does not separate harmful from harmless "
                          "prompts on the metric")
    run.add_argument("--ray", metavar="ADDRESS", help="shard the patching grids over a Ray cluster: auto, host:6379, "
                                                      "ray://host:10001, or local (starts one here)")
    run.add_argument("--ray-workers", type=int, metavar="N",
                     help="Ray workers, one model copy each (default: one per GPU, else one per node)")

    ins = sub.add_parser("inspect", help="the model's shape and sites, prompts with position labels, baselines")
    _add_model_args(ins)
    ins.add_argument("--json", action="store_true", help="machine-readable output")

    cmp_ = sub.add_parser("compare", help="side-by-side figures of several run folders, layers normalised by depth")
    cmp_.add_argument("runs", nargs="+", type=Path)
    cmp_.add_argument("--out", type=Path, default=Path("runs/comparison"))

    abl = sub.add_parser("abliterate", help="bake the refusal direction's ablation into the weights and save the model")
    _add_model_args(abl)
    abl.add_argument("--out", type=Path, required=True, help="folder for the orthogonalised model (must be empty)")
    abl.add_argument("--direction", type=Path, help="a direction .safetensors (save_vector) instead of computing one")
    abl.add_argument("--layer", type=int,
                     help="layer of the difference-in-means direction (default round(0.6 * n_layers))")
    abl.add_argument("--position", help="end-of-instruction column: 'last' (default), -n..-1 or an eoi token's text")
    abl.add_argument("--select", action="store_true",
                     help="choose layer and position with select_direction (slow on CPU)")
    abl.add_argument("--n-train", type=int,
                     help="harmful and harmless train instructions each (default 32, the run's direction policy)")
    abl.add_argument("--n-val", type=int,
                     help="harmful and harmless val instructions each for --select (default 16, as in run)")
    abl.add_argument("--force", action="store_true", help="write into a non-empty --out (its weight files are replaced)")
    abl.add_argument("--gguf", action="store_true",
                     help="also write OUT/model.gguf for llama.cpp (models from a GGUF: the offline ones or --model X.gguf)")
    abl.add_argument("--quiet", action="store_true", help="no progress output")
    abl.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    opt = abl.add_argument_group("optimised abliteration (--optimize: a resumable Optuna study, see steering.optimize)")
    opt.add_argument("--optimize", action="store_true",
                     help="search direction index and per-layer edit weights (heretic's space, plus norm-preserving "
                          "edits) on refusal, KL and CE; OUT/study.journal resumes a killed study")
    opt.add_argument("--trials", type=int, help="completed trials of the study (default 50)")
    opt.add_argument("--eval-set", help="harmful prompts: harmbench, strongreject, instructions (default) or a text "
                                        "file, one prompt per line; optimised on one split, reported on the other")
    opt.add_argument("--n-harmful", type=int, help="harmful prompts per split (default 32)")
    opt.add_argument("--n-harmless", type=int, help="harmless prompts per split for KL and CE (default 32)")
    opt.add_argument("--seed", type=int, help="seed of the prompt samples and the sampler (default 0)")
    opt.add_argument("--max-new-tokens", type=int, help="tokens generated per prompt to judge refusal (default 16)")
    opt.add_argument("--norm-preserving", choices=["search", "on", "off"],
                     help="keep each edited weight column's norm: searched (default), always or never")
    opt.add_argument("--layers", help="edit only layers A-B (e.g. those the patching grids show matter)")
    opt.add_argument("--max-kl", type=float,
                     help="the chosen trial: lowest refusal among Pareto trials with KL <= this (default 0.5)")
    opt.add_argument("--judge", help="refusal judge: substring (default) or a separate chat model's folder, "
                                     ".gguf file, offline name or hub id")

    exp = sub.add_parser("export-direction", help="write a run's refusal direction for llama.cpp, repeng or steering-vectors")
    exp.add_argument("run", type=Path, help="run folder written by `refusal-lab run --out`")
    exp.add_argument("--format", required=True, choices=["llama-cpp", "steering-vectors", "repeng"],
                     help="llama-cpp / repeng: a control-vector GGUF; steering-vectors: a safetensors SteeringVector")
    exp.add_argument("--out", type=Path, help="file to write (default RUN/vectors/direction.<format>.gguf / .safetensors)")
    exp.add_argument("--alpha", type=float, default=1.0,
                     help="scale baked into the vector (default 1: the raw difference-in-means vector)")
    exp.add_argument("--model", type=Path,
                     help="a .gguf file or model folder to check the vector against (layers, width)")
    exp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _load(args):
    from refusal_lab.models.loading import load_model

    chat_template = None
    if getattr(args, "chat_template", None):
        from refusal_lab.errors import PromptError

        path = Path(args.chat_template)
        if not path.is_file():
            raise PromptError(f"Chat template file {path} does not exist; give a path to a Jinja template file.")
        chat_template = path.read_text()
    # progress=False silences the loaders' own bars too (models.progress.progress_bars)
    return load_model(args.model, dtype=args.dtype or "float32", device=args.device, device_map=args.device_map,
                      trust_remote_code=args.trust_remote_code, token=args.token or os.environ.get("HF_TOKEN"),
                      chat_template=chat_template, progress=not getattr(args, "quiet", False))


def _check_prompt_inputs(objects: str | None, template: str | None) -> None:
    """Validate the object list and the template before the (slow) model load, so bad input fails fast.

    Raises the same :class:`~refusal_lab.errors.PromptError` sentences that building the prompts would.
    """
    from refusal_lab.prompts.data import load_objects, validate_template

    lists = load_objects(objects)
    if template is not None:
        validate_template(template)
    elif lists.template is not None:
        validate_template(lists.template)


_JUDGE_CHOICES = ("'substring', 'self', a chat model's folder or .gguf file, an offline model's name "
                  "(qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct), or a Hugging Face hub id (owner/name)")


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as the hub client reads them (also when set after its import)."""
    from huggingface_hub import constants

    on = {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or any(os.environ.get(k, "").strip().upper() in on
                                                 for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_judge(judge: str | None) -> None:
    """Validate ``--judge`` (or the config's ``judge``) before the (slow) model load.

    Accepted: ``substring``, ``self``, an existing model folder (with config.json) or ``.gguf``
    file, an offline model's name (``qwen2.5-coder-1.5b-instruct``), or a hub id ``owner/name``; in offline mode (HF_HUB_OFFLINE=1) the hub id must be in the
    local Hugging Face cache. Anything else raises :class:`~refusal_lab.errors.ConfigError`.
    """
    from refusal_lab.errors import ConfigError

    if judge is None or judge in ("substring", "self"):
        return
    text = str(judge).strip()
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"--judge {text} is a file but not a .gguf model; give {_JUDGE_CHOICES}.")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--judge folder {text} has no config.json, so it is not a Hugging Face model folder; "
                              f"give {_JUDGE_CHOICES}.")
        return
    from refusal_lab.models.offline import get_offline_model

    if get_offline_model(text) is not None:  # an offline model by name (e.g. qwen2.5-coder-1.5b-instruct)
        return
    if text.startswith(("/", ".", "~")) or "\\" in text or text.lower().endswith(".gguf") or text.count("/") > 1:
        raise ConfigError(f"--judge {text} does not exist; give {_JUDGE_CHOICES}.")
    import re

    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    valid = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", text) is not None
    if valid:
        try:
            validate_repo_id(text)
        except HFValidationError:
            valid = False
    if not valid:
        raise ConfigError(f"--judge {text!r} is neither a known judge, an existing path nor a hub id of the form "
                          f"owner/name; give {_JUDGE_CHOICES}.")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(text, "config.json"), str):
            raise ConfigError(f"--judge {text} is not in the local Hugging Face cache and the hub is off "
                              "(HF_HUB_OFFLINE); download it first, or give a local model folder or .gguf file.")


def cmd_run(args) -> int:
    from refusal_lab.artifacts import read_json
    from refusal_lab.errors import ConfigError
    from refusal_lab.run.config import RunConfig, model_slug
    from refusal_lab.run.pipeline import Pipeline

    data = {}
    if args.config:
        if not args.config.is_file():
            raise ConfigError(f"Config file {args.config} does not exist.")
        try:
            data = read_json(args.config)
        except ValueError as e:
            raise ConfigError(f"Config file {args.config} is not valid JSON ({e}).") from None
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {args.config} must hold a JSON object of settings.")
    flags = {"model": args.model, "dtype": args.dtype, "device": args.device, "objects": args.objects,
             "template": args.template, "mode": args.mode, "refusal": args.refusal, "compliance": args.compliance,
             "heads_position": args.heads_position, "threshold": args.threshold, "judge": args.judge}
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.grids:
        data["grids"] = [g.strip() for g in args.grids.split(",") if g.strip()]
    if args.necessity:
        data["directions"] = ["sufficiency", "necessity"]
    if args.no_attribution:
        data["attribution"] = False
    if args.no_steering:
        data["steering"] = False
    if args.exhaustive:
        data["steering_exhaustive"] = True
    cfg = RunConfig.from_dict(data, where=str(args.config) if args.config else "the options")
    # the merged settings (file, then flags) are what the model is loaded with
    args.model, args.dtype, args.device = cfg.model, cfg.dtype, cfg.device
    _check_prompt_inputs(cfg.objects, cfg.template)
    check_judge(cfg.judge)
    if args.ray_workers is not None and not args.ray:
        raise ConfigError("--ray-workers needs --ray ADDRESS (auto, host:port, ray://host:port or local).")
    executor = None
    if args.ray:  # connect before the (slow) model load, so a bad address fails fast
        from refusal_lab.distributed import RayExecutor

        executor = RayExecutor.connect(args.ray, workers=args.ray_workers)
    try:
        model = _load(args)
        out = args.out or Path("runs") / model_slug(model.cfg.model_name)
        if executor is not None:
            from refusal_lab.distributed import load_kwargs

            executor.load = load_kwargs(args, cfg)
        results = Pipeline(model, cfg, out, force=args.force, progress=not args.quiet, executor=executor,
                           strict=args.strict).run()
    finally:
        if executor is not None:
            executor.close()
    print(f"wrote {out}/results.json and {out}/report.html")
    for line in results["findings"]:
        print(" -", line)
    if args.profile:
        from refusal_lab.run.profile import GiB, format_profile

        tensors = {t.data_ptr(): t for t in model.hf_model.state_dict().values()}  # tied weights once
        weights = sum(t.numel() * t.element_size() for t in tensors.values()) / GiB
        print(format_profile(results.get("profile", {}), weights))
    return 0


def cmd_inspect(args) -> int:
    from refusal_lab.inspect import inspect_model

    _check_prompt_inputs(args.objects, args.template)
    model = _load(args)
    info = inspect_model(model, objects=args.objects, template=args.template, mode=args.mode or "single_token",
                         refusal=args.refusal or "Sorry", compliance=args.compliance or "Sure")
    if args.json:
        print(json.dumps(info, indent=1, ensure_ascii=False))
    else:
        from refusal_lab.inspect import format_inspect

        print(format_inspect(info))
    return 0


def cmd_compare(args) -> int:
    from refusal_lab.errors import RefusalLabError
    from refusal_lab.report import compare_runs

    for r in args.runs:
        if not (r / "results.json").is_file():
            raise RefusalLabError(f"{r} has no results.json; run `refusal-lab run --out {r}` first.")
    path = compare_runs(list(args.runs), args.out)
    print(f"wrote {path}")
    return 0


def cmd_abliterate(args) -> int:
    import torch

    from refusal_lab.errors import ConfigError

    say = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.optimize:
        return _cmd_optimize(args, say)
    given = [f for f, v in OPTIMIZE_FLAGS.items() if getattr(args, v) is not None]
    if given:
        raise ConfigError(f"{given[0]} only applies with --optimize; add --optimize or drop {given[0]}.")
    if args.direction is not None and (args.layer is not None or args.position is not None or args.select):
        raise ConfigError("--direction gives the direction itself; drop --layer/--position/--select or --direction.")
    if args.select and (args.layer is not None or args.position is not None):
        raise ConfigError("--select chooses the layer and position itself; drop --layer/--position or --select.")
    for flag, value in (("--n-train", args.n_train), ("--n-val", args.n_val)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive number of instructions, got {value}.")
    out = args.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the orthogonalised model.")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ConfigError(f"--out {out} is not empty; give an empty or new folder, or --force to write into it.")
    gguf_source = None
    if args.gguf:  # before the (slow) load: only a model that came from a GGUF has one to copy from
        from refusal_lab.steering.export import source_gguf_of

        gguf_source = source_gguf_of(args.model)
    vector = meta = None
    if args.direction is not None:
        from refusal_lab.steering.vectors import load_vector

        if not args.direction.is_file():
            raise ConfigError(f"Direction file {args.direction} does not exist; "
                              "give a .safetensors file written by save_vector.")
        try:
            vector, meta = load_vector(args.direction)
        except Exception as e:  # noqa: BLE001 - not a safetensors file / no 'vector' tensor
            raise ConfigError(f"{args.direction} is not a direction file written by save_vector "
                              f"({type(e).__name__}: {e}).") from None
    say("loading the model...")
    model = _load(args)
    from refusal_lab.steering.abliterate import instruction_direction, orthogonalize_weights, write_abliteration
    from refusal_lab.steering.selection import DirectionPolicy

    if vector is not None:
        if vector.numel() != model.cfg.d_model:
            raise ConfigError(f"{args.direction} holds a direction of {vector.numel()} entries but the model's "
                              f"d_model is {model.cfg.d_model}; give a direction computed on this model.")
        vector = vector.reshape(-1).to(torch.float64)
        info = {"layer": meta.get("layer"), "position": meta.get("position"),
                "dataset": meta.get("dataset", f"from {args.direction}"),
                "method": meta.get("method", "given direction"), "direction_source": str(args.direction)}
        say(f"direction: {args.direction} (|v| = {float(vector.norm()):.3f})")
    else:
        sizes = {k: v for k, v in (("n_train", args.n_train), ("n_val", args.n_val)) if v is not None}
        choice = instruction_direction(model, args.layer, args.position, select=args.select,
                                       policy=DirectionPolicy(**sizes), log=say, progress=not args.quiet)
        vector, info = choice.vector, choice.info
    say("orthogonalising the weights...")
    report = orthogonalize_weights(model, vector)
    if not report.exact:
        say(f"note: {model.cfg.model_type} has {report.note} (max |P| = {report.max_projector_norm:.3g}).")
    if out.is_dir() and args.force:
        for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
            stale.unlink()
    say(f"saving to {out}...")
    from refusal_lab.models.progress import progress_bars

    with progress_bars(not args.quiet):  # transformers' own bars while saving, as while loading
        write_abliteration(out, model, vector, report, info)
    if gguf_source is not None:
        _write_gguf(gguf_source, out, model, say)
    print(f"wrote {out} (exact: {str(report.exact).lower()}; "
          f"layer {info.get('layer')}, position {info.get('position')})")
    return 0


OPTIMIZE_FLAGS = {"--trials": "trials", "--eval-set": "eval_set", "--n-harmful": "n_harmful",
                  "--n-harmless": "n_harmless", "--seed": "seed", "--max-new-tokens": "max_new_tokens",
                  "--norm-preserving": "norm_preserving", "--layers": "layers", "--max-kl": "max_kl", "--judge": "judge"}


def _cmd_optimize(args, say) -> int:
    """``abliterate --optimize``: every input checked before the (slow) load, then the study."""
    from refusal_lab.errors import ConfigError
    from refusal_lab.steering.optimize import STUDY_FILE, OptimizeSettings, parse_layer_range, run_optimization

    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("--optimize needs optuna; install the extra with: pip install -e '.[optimize]'.")
    for flag, value in (("--direction", args.direction), ("--layer", args.layer), ("--position", args.position),
                        ("--n-val", args.n_val)):
        if value is not None:
            raise ConfigError(f"--optimize searches the direction itself; drop {flag}.")
    if args.select or args.gguf:
        raise ConfigError(f"--optimize does not take {'--select' if args.select else '--gguf'}; drop it.")
    if args.judge == "self":
        raise ConfigError("--judge self cannot judge trials (the edited model would judge itself); give substring "
                          "or a separate judge model.")
    check_judge(args.judge)
    layers = parse_layer_range(args.layers)
    given = {"eval_set": args.eval_set, "n_trials": args.trials, "n_harmful": args.n_harmful,
             "n_harmless": args.n_harmless, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
             "norm_preserving": args.norm_preserving, "max_kl": args.max_kl, "n_train": args.n_train,
             "judge": args.judge}
    settings = OptimizeSettings(**{k: v for k, v in given.items() if v is not None}, layers=layers)
    settings.check()
    out = args.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the study and the model.")
    if (out.is_dir() and any(out.iterdir()) and not (out / STUDY_FILE).is_file() and not args.force):
        raise ConfigError(f"--out {out} is not empty and holds no {STUDY_FILE} to resume; give an empty or new "
                          "folder, or --force to write into it.")
    say("loading the model...")
    model = _load(args)
    if layers is not None:
        parse_layer_range(args.layers, model.cfg.n_layers)
    judge = None
    if settings.judge != "substring":
        from refusal_lab.models.loading import load_model
        from refusal_lab.steering.evaluation import ChatModelJudge

        say(f"loading the judge {settings.judge}...")
        judge = ChatModelJudge(load_model(settings.judge, dtype=args.dtype or "float32", device=args.device,
                                          progress=not args.quiet))
    record = run_optimization(model, out, settings, judge=judge, progress=not args.quiet, log=say)
    c = record["chosen"]
    held = c["heldout"]["refusal"]
    base = c["heldout_baseline"]["refusal"]
    print(f"wrote {out}/optimize.json, {out}/optimize.html and {out}/model (trial {c['number']} of "
          f"{len(record['trials'])}: held-out refusal {base['k']}/{base['n']} -> {held['k']}/{held['n']}, "
          f"KL {c['heldout']['kl']:.4f})")
    return 0


def _write_gguf(source, out: Path, model, say) -> None:
    """OUT/model.gguf from the GGUF the model came from (an offline model's is re-assembled from its parts)."""
    import tempfile

    from refusal_lab.steering.export import write_abliterated_gguf

    kind, where = source
    say(f"writing {out / 'model.gguf'}...")
    if kind == "file":
        write_abliterated_gguf(where, out / "model.gguf", model)
        return
    from refusal_lab.models.offline import offline_part_paths
    from refusal_lab.models.offline.assembly import assemble_parts

    with tempfile.TemporaryDirectory(dir=out, prefix=".gguf-") as tmp:
        path = Path(tmp) / where.gguf_name
        if assemble_parts(offline_part_paths(where), path, progress=False, desc=where.name) != where.gguf_sha256:
            from refusal_lab.errors import ModelLoadError

            raise ModelLoadError(f"The parts of {where.name} do not assemble to its GGUF; reinstall them with: "
                                 f"{where.reinstall_hint}")
        write_abliterated_gguf(path, out / "model.gguf", model)


def cmd_export_direction(args) -> int:
    import math

    from refusal_lab.errors import ConfigError
    from refusal_lab.steering.export import SUFFIX, check_model_shape, export_direction, model_shape, read_run_direction

    if not math.isfinite(args.alpha):
        raise ConfigError(f"--alpha must be a finite number, got {args.alpha}.")
    d = read_run_direction(args.run)
    check_model_shape(d, d.n_layers, None, where=f"the run's model ({d.model})")
    if args.model is not None:
        import dataclasses

        n_layers, d_model, model_type = model_shape(args.model)
        check_model_shape(d, n_layers, d_model, where=f"--model {args.model}")
        if d.model_type is None:  # no results.json: the hint comes from the model checked against
            d = dataclasses.replace(d, model_type=model_type)
    out = args.out or args.run / "vectors" / f"direction{SUFFIX[args.format]}"
    path = export_direction(d, args.format, out, alpha=args.alpha)
    hint = f"; the run chose alpha {d.chosen_alpha:g}" if d.chosen_alpha is not None else ""
    print(f"wrote {path} ({args.format}: block {d.block}'s output = blocks.{d.layer}.hook_resid_pre, "
          f"alpha {args.alpha:g}{hint})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from refusal_lab.errors import RefusalLabError

    try:
        return {"run": cmd_run, "inspect": cmd_inspect, "compare": cmd_compare, "abliterate": cmd_abliterate,
                "export-direction": cmd_export_direction}[args.command](args)
    except RefusalLabError as e:
        if args.debug:
            raise
        print(f"refusal-lab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("refusal-lab: interrupted; finished steps are kept, run the same command again to resume.", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one sentence by default, the traceback with --debug
        if args.debug:
            raise
        print(f"refusal-lab: unexpected error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
