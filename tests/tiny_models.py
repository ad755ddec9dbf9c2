"""Tiny random-weight models of every supported architecture, built from ``transformers`` config
classes (no downloads). Tests use them to pin down hook semantics; the benchmarks import the same
builders (``from tests.tiny_models import ...``, run from the repository root) for their CPU smoke
modes. A test fixture, so it lives here and not in the package: nothing in ``src/`` imports it."""

from __future__ import annotations

import torch
import transformers

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def tiny_config(model_type: str, **overrides):
    """A small config of ``model_type`` with features that matter switched on (GQA, q/k norms,
    sliding windows, soft-capping) so tests exercise them."""
    kw = dict(TINY)
    if model_type == "llama":
        cfg = transformers.LlamaConfig(**kw, head_dim=16)
    elif model_type == "qwen2":
        cfg = transformers.Qwen2Config(**kw)
    elif model_type == "qwen3":
        cfg = transformers.Qwen3Config(**kw, head_dim=16)
    elif model_type == "mistral":
        cfg = transformers.MistralConfig(**kw, head_dim=16, sliding_window=5)
    elif model_type == "gemma2":
        cfg = transformers.Gemma2Config(**kw, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
                                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    elif model_type == "gemma3_text":
        cfg = transformers.Gemma3TextConfig(**kw, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
                                            layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    else:
        raise ValueError(model_type)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random-weight causal LM; norm gains are randomised too (Gemma's (1 + w) must be tested
    with w != 0, and zero-initialised gains would hide mistakes)."""
    from refusal_lab.models.adapters import adapter_class

    cfg = tiny_config(model_type, **overrides)
    cfg._attn_implementation = adapter_class(cfg.model_type).attn_implementation
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if model_type.startswith("gemma") else 1.0))
            elif p.ndim >= 2:
                p.copy_(torch.randn_like(p) * 0.08)
            elif "bias" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return model.eval().requires_grad_(False)


SUPPORTED_TINY = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")
