"""Architecture adapters: where each TransformerLens site lives inside a Hugging Face model.

An adapter names the submodules of one decoder architecture and says how one block is computed
from them. :class:`refusal_lab.models.hooked.HookedChatModel` runs the block loop itself, calling
these submodules, so every site is a point in that loop rather than a guess about module outputs:

    resid_pre ──ln1──▶ attn ──(post_attn_norm)──▶ attn_out ──(+)──▶ resid_mid
    resid_mid ──ln2──▶ mlp  ──(post_mlp_norm)───▶ mlp_out  ──(+)──▶ resid_post

``attn_out``/``mlp_out`` are exactly what is added to the residual stream, i.e. *after* Gemma 2/3's
post-norms (TransformerLens puts ``hook_attn_out`` after ``ln1_post`` too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from refusal_lab.models.cpu_linear import linear


@dataclass
class Adapter:
    """Module paths and block structure for one family of decoder-only chat models.

    Subclasses set the class variables; instances hold the resolved modules of one model.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: names of the two extra norms applied to the sublayer outputs before the residual add
    post_attn_norm: ClassVar[str | None] = None
    post_mlp_norm: ClassVar[str | None] = None
    #: norm applied to the residual before the MLP (Llama: post_attention_layernorm)
    pre_mlp_norm: ClassVar[str] = "post_attention_layernorm"
    #: rotary module takes the layer type as a third argument (Gemma 3: local/global RoPE)
    rotary_per_layer_type: ClassVar[bool] = False
    #: the attention implementation that matches the reference forward exactly
    attn_implementation: ClassVar[str] = "sdpa"

    hf_model: nn.Module

    # ---- resolved modules -------------------------------------------------------------------
    @property
    def config(self):
        return self.hf_model.config

    @property
    def base(self) -> nn.Module:
        return self.hf_model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.layers

    @property
    def embed_tokens(self) -> nn.Module:
        return self.base.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.base.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.hf_model.lm_head

    def attn(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def o_proj(self, layer: int) -> nn.Linear:
        return self.attn(layer).o_proj

    def ln1(self, layer: int) -> nn.Module:
        return self.layers[layer].input_layernorm

    def ln2(self, layer: int) -> nn.Module:
        return getattr(self.layers[layer], self.pre_mlp_norm)

    def mlp(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    def attn_post_norm(self, layer: int) -> nn.Module | None:
        return getattr(self.layers[layer], self.post_attn_norm) if self.post_attn_norm else None

    def mlp_post_norm(self, layer: int) -> nn.Module | None:
        return getattr(self.layers[layer], self.post_mlp_norm) if self.post_mlp_norm else None

    # ---- shapes -----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.n_heads

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def d_head(self) -> int:
        return getattr(self.config, "head_dim", None) or self.d_model // self.n_heads

    @property
    def d_vocab(self) -> int:
        return self.lm_head.weight.shape[0]

    # ---- computation pieces -----------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, pos] -> [batch, pos, d_model]; what enters block 0 (Gemma's sqrt(d) scale included)."""
        return self.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer: int):
        """(cos, sin) for ``layer``; the same object for every layer of the same RoPE type."""
        if self.rotary_per_layer_type:
            return self.base.rotary_emb(hidden, position_ids, self.layer_type(layer))
        return self.base.rotary_emb(hidden, position_ids)

    def rotary_key(self, layer: int) -> str:
        """Layers with the same key share their rotary embeddings (computed once per forward)."""
        return self.layer_type(layer) if self.rotary_per_layer_type else "all"

    def layer_type(self, layer: int) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[layer] if types else "full_attention"

    def sliding_window(self, layer: int) -> int | None:
        """Keys more than ``window - 1`` columns behind the query are masked (HF semantics)."""
        if self.layer_type(layer) == "sliding_attention":
            return getattr(self.config, "sliding_window", None)
        return None

    def final_logits(self, normalized: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Unembed ``ln_final`` output; ``rows`` restricts to some vocabulary ids (cheap metrics)."""
        weight = self.lm_head.weight if rows is None else self.lm_head.weight[rows]
        bias = self.lm_head.bias
        if bias is not None and rows is not None:
            bias = bias[rows]
        logits = linear(normalized, weight, bias)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def ln_scale_weight(self, norm: nn.Module) -> torch.Tensor:
        """The elementwise gain of an RMSNorm as it multiplies the normalised vector."""
        return norm.weight

    def rms_scale(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """1 / rms(x) [..., 1] in float32, with ``norm``'s epsilon: the per-position scale the RMSNorm
        ``norm`` applies to ``x`` (before its gain, :meth:`ln_scale_weight`)."""
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
        return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
