"""Gemma 3 (text): Gemma 2's sandwich norms plus q/k norms and separate local/global RoPE
(the rotary module takes the layer type)."""

from refusal_lab.models.adapters.gemma2 import Gemma2Adapter


class Gemma3Adapter(Gemma2Adapter):
    model_types = ("gemma3_text",)
    rotary_per_layer_type = True
    attn_implementation = "sdpa"  # no attention soft-capping in Gemma 3
