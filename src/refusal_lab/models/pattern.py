"""The attention-pattern site ``blocks.{l}.attn.hook_pattern``, computed only when it is watched.

The pattern is Hugging Face's *eager* attention probabilities [b, n_heads, q, k]: ``softmax(q·kᵀ *
scaling, soft-capped, + mask)`` in float32, cast to the model's dtype, with the query/key states
exactly as the HF attention module hands them to its attention function (after q/k norms and RoPE;
keys over any cached prefix), GQA keys repeated per query head, and the additive mask of
:func:`refusal_lab.models.forward.attention_mask_4d` (causal, left padding, sliding window).

How: the HF attention module picks its attention function by ``config._attn_implementation`` and
passes its keyword arguments through. For a layer whose pattern is watched, :func:`watching`
switches that name to :data:`PATTERN_IMPL` for the one call and passes a :class:`PatternRequest`;
:func:`pattern_attention` computes the pattern from the very q/k/v and mask the module computed, so
nothing about q/k is re-derived here (no per-architecture code). Unwatched layers never get here:
a run that does not ask for the pattern takes the unchanged code path.

Outputs. An eager model (Gemma 2) gets ``pattern @ v``, the same operations as HF's eager function,
so its attention output is bitwise unchanged. An sdpa model keeps its sdpa output unless a hook
*changed* the pattern (returned another tensor, or wrote into it in place: its version counter
moved); then the output is ``edited pattern @ v`` (eager), so edits drive the layer. Caching, reading
hooks and identity hooks therefore leave every other site bitwise unchanged on every architecture;
an edited sdpa layer differs from sdpa by fp rounding wherever the edit changed nothing (fp32: ~1e-6
on later sites). Why not switch the whole forward to eager, or re-derive q/k outside the module:
the first changes unwatched layers' numbers, the second duplicates each architecture's q/k path.
A watched layer costs one [b, h, q, k] tensor (``run_with_cache(names=True)`` caches every layer's,
as TransformerLens does); a watched sdpa layer also still runs sdpa for its output.

Rows of padded query columns attend to nothing real: their values are meaningless (as in HF).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

#: the attention-implementation name registered with Hugging Face for a watched layer's one call
PATTERN_IMPL = "refusal_lab_pattern"
REQUEST_KW = "refusal_lab_pattern_request"


@dataclass
class PatternRequest:
    """What a watched layer's attention call needs: the site (hooks and cache, returns the pattern
    to use) and the implementation the model normally runs."""

    site: Callable[[torch.Tensor], torch.Tensor]
    impl: str


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv_heads, k, d] -> [b, kv_heads * groups, k, d], query head h reading kv head h // groups (HF's repeat_kv)."""
    if groups == 1:
        return x
    b, h, k, d = x.shape
    return x[:, :, None].expand(b, h, groups, k, d).reshape(b, h * groups, k, d)


def eager_pattern(module: nn.Module, query, key, mask, scaling: float | None, softcap: float | None) -> torch.Tensor:
    """Post-softmax attention probabilities [b, h, q, k], with the operations of HF's eager attention."""
    if scaling is None:
        scaling = module.head_dim**-0.5
    keys = expand_kv(key, module.num_key_value_groups)
    scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    return nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


def pattern_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """An HF attention function: (output [b, q, h, d], pattern) with the pattern site applied."""
    req: PatternRequest = kwargs.pop(REQUEST_KW)
    computed = eager_pattern(module, query, key, attention_mask, kwargs.get("scaling"), kwargs.get("softcap"))
    version = computed._version
    pattern = req.site(computed)
    if req.impl == "eager" or pattern is not computed or computed._version != version:
        p = nn.functional.dropout(pattern, p=kwargs.get("dropout", 0.0), training=module.training)
        out = torch.matmul(p, expand_kv(value, module.num_key_value_groups))
        return out.transpose(1, 2).contiguous(), pattern
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(req.impl, None)
    out, _ = inner(module, query, key, value, attention_mask, **kwargs)
    return out, pattern


AttentionInterface.register(PATTERN_IMPL, pattern_attention)


@contextlib.contextmanager
def watching(attn: nn.Module, site: Callable[[torch.Tensor], torch.Tensor]):
    """For one call of the HF attention module ``attn``: route it through :func:`pattern_attention`;
    yields the keyword arguments to pass to that call."""
    cfg = attn.config
    impl = cfg._attn_implementation
    cfg._attn_implementation = PATTERN_IMPL
    try:
        yield {REQUEST_KW: PatternRequest(site, impl)}
    finally:
        cfg._attn_implementation = impl
