"""The model cache: where converted folders live, and how one is written so that it is either
complete or absent.

Layout (root: ``$REFUSAL_LAB_CACHE`` or ``~/.cache/refusal_lab``)::

    models/qwen2.5-coder-0.5b-instruct/      the offline default
    models/qwen2.5-coder-1.5b-instruct/      the showcase model
    models/gguf/<file stem>-<key>/            a user .gguf; key = hash of (resolved path, size, mtime)

Every folder is built in a hidden temp folder next to its target (:func:`staged_folder`) and moved
into place with ``os.replace`` by :func:`publish_folder`, which writes :data:`MARKER_FILE` last;
so a folder with the marker is complete. :func:`conversion_lock` keeps two processes from
building the same folder at once and clears what a killed build left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from refusal_lab.errors import ModelLoadError
from refusal_lab.models.offline.registry import OfflineModel, require_offline_model

CACHE_ENV = "REFUSAL_LAB_CACHE"
MARKER_FILE = "refusal_lab_source.json"
"""Written last into a converted folder; its presence means the folder is complete."""

_TMP_INFIX = ".tmp-"


def default_cache_dir() -> Path:
    """``$REFUSAL_LAB_CACHE`` if set, else ``~/.cache/refusal_lab``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refusal_lab"


def models_dir(cache_dir: Path | None) -> Path:
    """``<cache>/models``, the folder holding every converted model (``None``: the default cache)."""
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "models"


def offline_cache_path(model: str | OfflineModel | None = None, cache_dir: Path | None = None) -> Path:
    """Where ``model``'s converted folder lives (or will live); nothing is built or checked."""
    return models_dir(cache_dir) / require_offline_model(model).cache_subdir


def is_complete_model_dir(path: Path) -> bool:
    """True when ``path`` is a finished conversion (marker, config and weights all present)."""
    return all((path / f).is_file() for f in (MARKER_FILE, "config.json", "model.safetensors"))


def read_source_info(path: Path) -> dict[str, Any] | None:
    """The marker JSON of a converted folder (display name, sha256, ...), or None if absent."""
    try:
        return json.loads((Path(path) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def conversion_lock(target: Path) -> Iterator[None]:
    """Hold a file lock for ``target`` and clear leftovers of killed conversions."""
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    with disk_errors(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        for stale in target.parent.glob(f".{target.name}{_TMP_INFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists() and not is_complete_model_dir(target):
            shutil.rmtree(target)  # not ours to trust: never produced by a finished conversion
        yield


@contextlib.contextmanager
def staged_folder(target: Path, tag: str = "") -> Iterator[Path]:
    """A hidden temp folder next to ``target`` (cleared by :func:`conversion_lock` if we die),
    removed on exit; after :func:`publish_folder` has moved it into place, that is a no-op."""
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_INFIX}{tag}", dir=target.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish_folder(build: Path, target: Path, marker: Mapping[str, Any]) -> None:
    """Write ``marker`` as :data:`MARKER_FILE` (the last file), flush and move ``build`` to ``target``."""
    with disk_errors(target.parent):
        (build / MARKER_FILE).write_text(json.dumps(dict(marker), indent=2) + "\n")
        for f in build.rglob("*"):  # so that the rename cannot expose unwritten data
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(build, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        os.replace(build, target)


@contextlib.contextmanager
def disk_errors(where: Path) -> Iterator[None]:
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
