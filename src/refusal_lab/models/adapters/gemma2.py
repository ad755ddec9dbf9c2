"""Gemma 2: sandwich norms. The attention and MLP outputs each pass through an RMSNorm with gain
(1 + w) *before* joining the residual stream, so ``hook_attn_out``/``hook_mlp_out`` sit after
``post_attention_layernorm``/``post_feedforward_layernorm``. Embeddings are scaled by sqrt(d_model)
inside ``embed_tokens``; attention and final logits are soft-capped (eager attention needed)."""

from refusal_lab.models.adapters.base import Adapter


class Gemma2Adapter(Adapter):
    model_types = ("gemma2",)
    post_attn_norm = "post_attention_layernorm"
    post_mlp_norm = "post_feedforward_layernorm"
    pre_mlp_norm = "pre_feedforward_layernorm"
    attn_implementation = "eager"

    def ln_scale_weight(self, norm):
        return 1.0 + norm.weight
