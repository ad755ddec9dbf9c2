"""Qwen2 / Qwen2.5 / Qwen3: Llama-shaped blocks; Qwen2 has q/k/v biases, Qwen3 q/k RMSNorms
inside attention (both handled by the HF attention module); optional sliding-window layers."""

from refusal_lab.models.adapters.base import Adapter


class QwenAdapter(Adapter):
    model_types = ("qwen2", "qwen3")
