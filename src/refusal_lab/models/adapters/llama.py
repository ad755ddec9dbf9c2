"""Llama (Llama 2/3 chat): pre-norm blocks, RoPE, grouped-query attention."""

from refusal_lab.models.adapters.base import Adapter


class LlamaAdapter(Adapter):
    model_types = ("llama",)
