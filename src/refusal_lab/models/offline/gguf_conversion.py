"""GGUF file -> plain Hugging Face folder, dequantized once and cached.

``transformers`` can read GGUF but dequantizes on *every* load (a minute or more), so we
dequantize once and cache a plain Hugging Face folder (``config.json`` + ``model.safetensors`` +
tokenizer files) that later loads in seconds. The offline models (assembled from their parts by
:mod:`~refusal_lab.models.offline.assembly`) and ``.gguf`` files given by the user go through the
same :func:`build_hf_dir`; a user file is cached under a key of its path, size and mtime.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from refusal_lab.errors import ModelLoadError
from refusal_lab.models.offline.cache import (
    conversion_lock,
    disk_errors,
    is_complete_model_dir,
    models_dir,
    publish_folder,
    staged_folder,
)
from refusal_lab.models.progress import progress_bars


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
    out_dir = models_dir(cache_dir) / "gguf" / f"{stem}-{gguf_cache_key(p)}"
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
    with conversion_lock(out_dir):
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
        build_hf_dir(gguf_path, out_dir, info, progress=progress)
    return out_dir


def build_hf_dir(gguf_path: Path, target: Path, source: Mapping[str, Any], *, progress: bool) -> None:
    """Dequantize ``gguf_path`` and move a complete HF folder to ``target`` (caller holds
    :func:`~refusal_lab.models.offline.cache.conversion_lock`); ``source`` goes into the marker."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with staged_folder(target) as build:
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
        with disk_errors(target.parent):
            if progress:
                print("Writing safetensors ...", file=sys.stderr)
            save_config(model, build)
            save_weights(model, build / "model.safetensors")
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
        publish_folder(build, target, marker)


def save_config(model: Any, out_dir: Path) -> None:
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


def save_weights(model: Any, path: Path) -> None:
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
