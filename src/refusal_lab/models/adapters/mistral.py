"""Mistral: Llama-shaped blocks; ``config.sliding_window`` applies to every layer when set."""

from refusal_lab.models.adapters.base import Adapter


class MistralAdapter(Adapter):
    model_types = ("mistral",)

    def sliding_window(self, layer: int) -> int | None:
        return getattr(self.config, "sliding_window", None)
