"""An offline model's installed part packages -> one verified GGUF -> its cached HF folder.

The parts are located with ``find_spec`` (never imported), concatenated into a temporary GGUF
while hashing, checked against the registry's size and sha256 (a partial or tampered install
fails here with one sentence naming the reinstall command), converted by
:func:`~refusal_lab.models.offline.gguf_conversion.build_hf_dir`, and the GGUF is deleted: only
the converted folder is kept.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from refusal_lab.errors import ModelLoadError
from refusal_lab.models.offline import gguf_conversion
from refusal_lab.models.offline.cache import (
    conversion_lock,
    disk_errors,
    is_complete_model_dir,
    offline_cache_path,
    staged_folder,
)
from refusal_lab.models.offline.registry import DEFAULT_OFFLINE_MODEL, OfflineModel, require_offline_model

_CHUNK = 8 * 1024 * 1024


def offline_part_paths(model: str | OfflineModel | None = None) -> list[Path]:
    """Paths of ``part01.bin`` ... from ``model``'s installed registry packages (default: the 0.5B).

    Uses ``find_spec`` so the packages are located without being imported. A missing part raises
    one :class:`ModelLoadError` sentence naming the packages and the install extra.
    """
    m = require_offline_model(model)
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
    Later calls return at once when the folder is complete. ``progress=False`` prints nothing
    (no bars, no messages).
    """
    m = require_offline_model(model)
    target = offline_cache_path(m, cache_dir)
    if is_complete_model_dir(target):
        return target
    parts = offline_part_paths(m)
    with conversion_lock(target):
        if is_complete_model_dir(target):  # another process finished while we waited
            return target
        total = sum(p.stat().st_size for p in parts)
        if total != m.gguf_size:
            raise ModelLoadError(
                f"The parts of {m.name} add up to {total:,} bytes instead of {m.gguf_size:,}; "
                f"reinstall them with: {m.reinstall_hint}"
            )
        with staged_folder(target, tag="gguf-") as staging:  # the assembled GGUF is not kept
            gguf_path = staging / m.gguf_name
            digest = assemble_parts(parts, gguf_path, progress=progress, desc=f"Assembling {m.name}")
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
            gguf_conversion.build_hf_dir(gguf_path, target, source, progress=progress)
    return target


def assemble_parts(parts: list[Path], out: Path, *, progress: bool, desc: str) -> str:
    """Stream ``parts`` into ``out`` in order; return the sha256 of the concatenation."""
    from tqdm.auto import tqdm

    sha = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    with disk_errors(out.parent), open(out, "wb") as dst, tqdm(
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
