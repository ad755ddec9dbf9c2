"""Load a Hugging Face causal LM and its tokenizer, with every failure as one clear sentence.

``load_hf`` accepts ``None`` (the offline default, built from registry packages by
:mod:`refusal_lab.models.offline`), the short name of an offline model
(``qwen2.5-coder-1.5b-instruct``; see :data:`~refusal_lab.models.offline.OFFLINE_MODELS`), a
local model folder, a ``.gguf`` file (dequantized once and cached) or a hub id
(:func:`resolve_spec` decides which). Weights are read from safetensors only (never pickled
``.bin`` files) and remote code runs only when asked. Hub and ``transformers`` exceptions are
mapped to :class:`~refusal_lab.errors.ModelLoadError` (or a subclass) chained to the original by
:mod:`refusal_lab.models.load_errors`, so the CLI can print one sentence and still show the
traceback with ``--debug``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from refusal_lab.errors import ConfigError, ModelLoadError, PromptError, UnsupportedArchitectureError
from refusal_lab.models.load_errors import mapped_errors
from refusal_lab.models.offline import (
    DEFAULT_OFFLINE_MODEL,
    cached_gguf_dir,
    get_offline_model,
    offline_model_dir,
    read_source_info,
)
from refusal_lab.models.progress import progress_bars

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

EAGER_ATTENTION_MODEL_TYPES = frozenset({"gemma2"})
"""Model types needing eager attention: Gemma 2's attention logit soft-capping is not in SDPA."""


# --------------------------------------------------------------------------------------------
# public entry point


def load_hf(
    spec: str | os.PathLike[str] | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    token: str | bool | None = None,
    revision: str | None = None,
    chat_template: str | None = None,
    supported_model_types: set[str] | frozenset[str] | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load ``(model, tokenizer, display_name)``; the model is in eval mode with frozen params.

    ``spec``: None (offline default), an offline model's short name (exact, case-insensitive;
    an existing path of that name wins), a local folder, a ``.gguf`` file or a hub id.
    ``device`` is ignored when ``device_map`` is given (e.g. ``"auto"`` over several GPUs).
    ``chat_template`` replaces a missing (or existing) chat template; without one, a tokenizer
    lacking a template raises :class:`PromptError`. ``supported_model_types`` restricts the
    architectures accepted (:class:`UnsupportedArchitectureError` otherwise). ``cache_dir`` is
    the GGUF conversion cache; ``progress=False`` silences every progress bar and message of the
    load (assembly, GGUF dequantization, hub downloads, "Loading weights").
    """
    torch_dtype = resolve_dtype(dtype)
    target_device = None if device_map is not None else _resolve_device(device)
    with progress_bars(progress):
        return _load(
            spec, torch_dtype=torch_dtype, target_device=target_device, device_map=device_map,
            trust_remote_code=trust_remote_code, token=token, revision=revision,
            chat_template=chat_template, supported_model_types=supported_model_types,
            cache_dir=cache_dir, progress=progress,
        )


def read_ahead(folder: Path) -> None:
    """Ask the kernel to start reading a local model folder's weight files now
    (``posix_fadvise(WILLNEED)``, asynchronous): the weights are memory-mapped and would otherwise
    come from disk page fault by page fault in the first forward, long after the loader started —
    on a machine whose page cache has dropped the files since the last run, the first step of a
    run stalled 7-18 s of wall time that way. A no-op where the platform has no ``posix_fadvise``."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for f in sorted(folder.glob("*.safetensors")):
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _load(
    spec: str | os.PathLike[str] | None,
    *,
    torch_dtype: torch.dtype,
    target_device: torch.device | None,
    device_map: str | dict[str, Any] | None,
    trust_remote_code: bool,
    token: str | bool | None,
    revision: str | None,
    chat_template: str | None,
    supported_model_types: set[str] | frozenset[str] | None,
    cache_dir: Path | None,
    progress: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, name, local = resolve_spec(spec, cache_dir=cache_dir, progress=progress)
    hub_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "token": token}
    if not local and revision is not None:
        hub_kwargs["revision"] = revision

    if local:
        _check_local_folder(Path(source), name)
        read_ahead(Path(source))
    with mapped_errors(name, "configuration", revision):
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    model_type = getattr(config, "model_type", None) or "unknown"
    if supported_model_types is not None and model_type not in supported_model_types:
        raise UnsupportedArchitectureError(
            f"'{name}' has model type '{model_type}', which refusal_lab does not support; "
            f"supported model types: {', '.join(sorted(supported_model_types))}."
        )

    with mapped_errors(name, "tokenizer", revision):
        tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left", **hub_kwargs)
    prepare_tokenizer(tokenizer, name, chat_template)

    attn = "eager" if model_type in EAGER_ATTENTION_MODEL_TYPES else "sdpa"
    with mapped_errors(name, "weights", revision):
        model = AutoModelForCausalLM.from_pretrained(
            source,
            config=config,
            dtype=torch_dtype,
            use_safetensors=True,
            attn_implementation=attn,
            # straight into the target dtype and device: one copy of the weights, never a CPU copy
            # followed by ``.to(device)`` (transformers 5 always loads with low memory use)
            device_map=device_map if device_map is not None else {"": target_device},
            **hub_kwargs,
        )
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, name


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"Unknown dtype '{dtype}'; use one of float32, bfloat16 or float16.")
    return DTYPES[key]


# --------------------------------------------------------------------------------------------
# resolving what to load


def resolve_spec(
    spec: str | os.PathLike[str] | None, *, cache_dir: Path | None, progress: bool
) -> tuple[str, str, bool]:
    """``spec`` -> (path or hub id for transformers, display name, is_local).

    Order: None -> the offline default; an existing file or folder; an offline model's short
    name; a path-like string that does not exist (error); else a hub id.
    """
    if spec is None:
        return str(offline_model_dir(cache_dir, progress=progress)), DEFAULT_OFFLINE_MODEL.display_name, True
    text = os.fspath(spec)
    path = Path(text).expanduser()
    offline_model = None if path.exists() else get_offline_model(text)
    if offline_model is not None:
        folder = offline_model_dir(cache_dir, progress=progress, model=offline_model)
        return str(folder), offline_model.display_name, True
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"'{text}' is a file but not a .gguf model; pass a model folder, a .gguf file or a hub id."
            )
        folder = cached_gguf_dir(path, cache_dir, progress=progress)
        return str(folder), path.name, True
    if path.is_dir():
        info = read_source_info(path) or {}
        return str(path), str(info.get("display_name") or text), True
    if _looks_like_path(text):
        raise ModelLoadError(f"Model path '{text}' does not exist; check the path.")
    return text, text, False


def _looks_like_path(text: str) -> bool:
    """True when ``text`` cannot be a hub id, so a missing file is the likely mistake."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.lower().endswith(".gguf") or text.startswith(("/", ".", "~")) or "\\" in text:
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def _check_local_folder(folder: Path, name: str) -> None:
    """Fail early, in one sentence, on folders transformers would reject with a long message."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"'{name}' has no config.json, so it is not a Hugging Face model folder; pass the folder "
            "that contains config.json, a .gguf file or a hub id."
        )
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise ModelLoadError(
            f"'{name}' has only pickled PyTorch weights (.bin/.pt), which refusal_lab never loads; "
            "convert them to safetensors (e.g. load once and save_pretrained) and retry."
        )
    raise ModelLoadError(f"'{name}' contains no model weights (no *.safetensors file).")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """Validate ``device`` and check the accelerator is really there."""
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"Unknown device '{device}'; use cpu, cuda, cuda:N or mps.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device '{device}' was requested but CUDA is not available; use --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"Device '{device}' does not exist: only {torch.cuda.device_count()} CUDA device(s) are visible."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"Device '{device}' was requested but MPS is not available; use --device cpu.")
    return dev


def prepare_tokenizer(tokenizer: Any, name: str, chat_template: str | None) -> None:
    """Left padding, a pad token (eos if none), and a chat template (given or the model's own)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    elif not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            f"'{name}' has no chat template (it is probably a base model, not a chat model); "
            "use its -it/-Instruct variant or pass a Jinja chat template with --chat-template."
        )
