"""Weight orthogonalisation ("abliteration", Arditi et al. 2024 §4): bake directional ablation
into the weights so the saved model never writes the direction into its residual stream.

For architectures without post-norms (Llama, Qwen2/3, Mistral) every residual-stream write is the
output of a linear map, so with ``r̂`` the unit direction:

* ``embed_tokens.weight`` rows: ``W_E <- W_E - (W_E r̂) r̂ᵀ``;
* each ``self_attn.o_proj`` and ``mlp.down_proj`` (output side): ``W <- W - r̂ (r̂ᵀ W)``, and
  ``b <- b - (r̂ᵀ b) r̂`` for a bias.

This equals :func:`refusal_lab.steering.interventions.ablation_hooks` exactly (up to rounding).
With Gemma 2/3's post-norms the sublayer output is ``g * x / rms(x)``: removing ``r̂`` from ``x``
changes ``rms(x)`` and so rescales every other coordinate too, and ``g * (x - ...)`` is not the
projection of the normed output either, so no edit of ``o_proj``/``down_proj`` reproduces the
hook-based ablation; :func:`orthogonalize_weights` refuses those models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from refusal_lab.errors import RefusalLabError
from refusal_lab.steering.interventions import unit

__all__ = ["orthogonalize_weights", "save_abliterated"]


def _untie_lm_head(model) -> None:
    """Give ``lm_head`` its own copy of the weight if it shares the embedding's (tied models):
    the embedding edit must not touch the unembedding."""
    a = model.adapter
    emb, head = a.embed_tokens.weight, a.lm_head.weight
    if head is emb or head.data_ptr() == emb.data_ptr():
        a.lm_head.weight = nn.Parameter(head.detach().clone(), requires_grad=False)
    for cfg in (model.hf_model.config, getattr(model.hf_model.config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


@torch.no_grad()
def _project_rows(weight: torch.Tensor, r: torch.Tensor) -> None:
    """Rows are d_model vectors (embedding [V, d]): W <- W - (W r) rᵀ."""
    w = weight.to(torch.float64)
    weight.copy_((w - torch.outer(w @ r, r)).to(weight.dtype))


@torch.no_grad()
def _project_out_side(linear: nn.Module, r: torch.Tensor) -> None:
    """nn.Linear with out_features = d_model (weight [d, in]): W <- W - r (rᵀ W), b <- b - (rᵀ b) r."""
    w = linear.weight.to(torch.float64)
    linear.weight.copy_((w - torch.outer(r, r @ w)).to(linear.weight.dtype))
    b = getattr(linear, "bias", None)
    if b is not None:
        bd = b.to(torch.float64)
        b.copy_((bd - (r @ bd) * r).to(b.dtype))


@torch.no_grad()
def orthogonalize_weights(model, direction: torch.Tensor) -> None:
    """Remove ``direction`` (normalised) from every residual-stream write of ``model.hf_model``,
    in place (the :class:`HookedChatModel` wrapping it sees the edit). Arithmetic is float64."""
    if model.cfg.has_post_norms:
        raise RefusalLabError(
            f"Weight orthogonalisation cannot reproduce directional ablation for '{model.cfg.model_type}': its "
            "post-attention/post-MLP RMSNorms rescale by the RMS of the pre-norm output, which removing the "
            "direction changes, so use the hook-based ablation (ablation_hooks) for Gemma 2/3 models instead."
        )
    a = model.adapter
    if direction.numel() != model.cfg.d_model:
        raise RefusalLabError(
            f"The direction has {direction.numel()} entries but the model's d_model is {model.cfg.d_model}; "
            "give a direction from this model's residual stream."
        )
    dev = a.embed_tokens.weight.device
    r = unit(direction).to(dev)
    _untie_lm_head(model)
    _project_rows(a.embed_tokens.weight, r)
    for l in range(a.n_layers):
        o = a.o_proj(l)
        down = a.mlp(l).down_proj
        _project_out_side(o, r.to(o.weight.device))
        _project_out_side(down, r.to(down.weight.device))


def save_abliterated(model, out_dir: str | Path) -> Path:
    """Save the (orthogonalised) HF model as safetensors, plus the tokenizer if the model has one;
    the folder loads with ``transformers.AutoModelForCausalLM.from_pretrained``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.hf_model.save_pretrained(str(out), safe_serialization=True)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    return out
