"""``load_model``: an offline model, a hub id, a local folder or a ``.gguf`` file -> :class:`HookedChatModel`."""

from __future__ import annotations

import torch

from refusal_lab.models.adapters import SUPPORTED_MODEL_TYPES, adapter_class
from refusal_lab.models.hooked import HookedChatModel


def load_model(
    spec: str | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    token: str | None = None,
    revision: str | None = None,
    chat_template: str | None = None,
    progress: bool = True,
) -> HookedChatModel:
    """Load a chat model with TransformerLens-named sites.

    ``spec`` is None for the offline default (Qwen2.5-Coder-0.5B-Instruct from registry
    packages), the short name of an offline model (``qwen2.5-coder-0.5b-instruct``,
    ``qwen2.5-coder-1.5b-instruct``: see ``refusal_lab.models.offline.OFFLINE_MODELS``; an
    existing path of the same name wins), a hub id (``google/gemma-2-2b-it``), a local directory
    or a ``.gguf`` file. Weights are read from safetensors or GGUF only; ``trust_remote_code``
    only when asked. ``device_map='auto'`` spreads layers over several GPUs (activations follow
    the layers). ``progress=False`` prints no progress bar or message while loading (assembly
    and dequantization of an offline model or ``.gguf`` file, downloads, "Loading weights").
    """
    from refusal_lab.models.hf_loading import load_hf

    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_model, tokenizer, name = load_hf(
        spec,
        dtype=dtype,
        device=device,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        token=token,
        revision=revision,
        chat_template=chat_template,
        supported_model_types=set(SUPPORTED_MODEL_TYPES),
        progress=progress,
    )
    wanted = adapter_class(hf_model.config.model_type).attn_implementation
    if getattr(hf_model.config, "_attn_implementation", None) != wanted:
        hf_model.set_attn_implementation(wanted)  # transformers >= 5 (pyproject) always has it
    return HookedChatModel(hf_model, tokenizer, name=name)
