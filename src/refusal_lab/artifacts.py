"""Run-folder artifacts, written atomically (temporary file in the same folder, then rename), so a
run killed at any point — even with ``kill -9`` — never leaves a half-written file that looks
finished. Tensors go to safetensors (no pickle anywhere); everything else is JSON or CSV."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _umask_mode() -> int:
    """0o666 minus the process umask: what a plain open() would have created (mkstemp uses 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _atomic_target(path: Path):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


atomic_target = _atomic_target
"""Public name of :func:`_atomic_target`: ``with atomic_target(path) as tmp: writer(tmp)`` for writers that
want a file name (matplotlib's ``savefig``); ``path`` appears only once ``tmp`` is complete."""


def _atomic_write(path: Path, write) -> Path:
    with _atomic_target(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def _clean(obj: Any) -> Any:
    """JSON-safe: tensors/numpy to lists, NaN/inf to None (strict JSON for browsers)."""
    if isinstance(obj, torch.Tensor):
        return _clean(obj.detach().cpu().tolist())
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _clean(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> Path:
    data = json.dumps(_clean(obj), indent=1, ensure_ascii=False, allow_nan=False).encode()
    return _atomic_write(path, lambda f: f.write(data))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: Path, text: str) -> Path:
    data = text.encode()
    return _atomic_write(path, lambda f: f.write(data))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Atomic safetensors file (tensors made contiguous and moved to CPU)."""
    with _atomic_target(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
    return Path(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def write_csv(path: Path, frame) -> Path:
    data = frame.to_csv(index=False).encode()
    return _atomic_write(path, lambda f: f.write(data))
