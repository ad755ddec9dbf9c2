"""One adapter per architecture; :func:`get_adapter` picks it from ``config.model_type``."""

from __future__ import annotations

from torch import nn

from refusal_lab.errors import UnsupportedArchitectureError
from refusal_lab.models.adapters.base import Adapter
from refusal_lab.models.adapters.gemma2 import Gemma2Adapter
from refusal_lab.models.adapters.gemma3 import Gemma3Adapter
from refusal_lab.models.adapters.llama import LlamaAdapter
from refusal_lab.models.adapters.mistral import MistralAdapter
from refusal_lab.models.adapters.qwen import QwenAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, QwenAdapter, MistralAdapter, Gemma2Adapter, Gemma3Adapter)
SUPPORTED_MODEL_TYPES: dict[str, type[Adapter]] = {t: a for a in ADAPTERS for t in a.model_types}


def adapter_class(model_type: str) -> type[Adapter]:
    try:
        return SUPPORTED_MODEL_TYPES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"Architecture '{model_type}' is not supported yet; supported model types are "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}."
        ) from None


def get_adapter(hf_model: nn.Module) -> Adapter:
    return adapter_class(hf_model.config.model_type)(hf_model)


__all__ = ["Adapter", "SUPPORTED_MODEL_TYPES", "adapter_class", "get_adapter"]
