"""Greedy tokens without the whole float32 unembedding: a bfloat16 product bounds every logit, and
float32 logits are computed only for the tokens that can still be the largest.

A decoding step needs one thing from the unembedding (``d_model x vocab``, 28 % of a step of the
default model): the index of the largest logit. :class:`CertifiedArgmax` computes every logit in
bfloat16 (inputs rounded to bfloat16, products accumulated in float32, the result rounded to
bfloat16: about half the time of the float32 product on a CPU with native bfloat16 instructions),
bounds its error rigorously, keeps every token whose bound reaches the best lower bound, and
computes those candidates' float32 logits. The token with the largest float32 logit is always among
them, so the answer is the float32 argmax (ties: the lowest id, as ``argmax``) — equal to the full
product's to float32 rounding (the candidates' dot products are summed in another order).

The bound, for the logit of token v with unembedding row w_v and input h (u = 2^-8, bfloat16's unit
roundoff): rounding both inputs moves the product by at most (2u + u^2) sum_i |h_i w_vi|, float32
accumulation over d terms by at most d 2^-24 sum_i |h_i w_vi|, the output rounding by u |logit|;
sum_i |h_i w_vi| <= ||h|| ||w_v|| <= ||h|| max_v ||w_v||. One bound B per row (the largest row norm)
keeps the extra work to two passes over the bfloat16 logits; it is taken twice over for safety.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["CertifiedArgmax", "native_bf16"]

U = 2.0 ** -8
"""bfloat16's unit roundoff (8 significant bits)."""
SAFETY = 2.0
"""The bound is taken this many times over."""
MAX_CANDIDATES = 1 << 16
"""More candidates than this in one call (flat logits) and the call takes the float32 product."""


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where the bfloat16
    product is the faster one; elsewhere it is emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


class CertifiedArgmax:
    """``argmax(normed @ weight.T)`` per row, exactly as float32 (module doc), with the bulk of the
    product in bfloat16. ``weight`` [vocab, d] float32 on the CPU, no bias."""

    def __init__(self, weight: torch.Tensor):
        w = weight.detach()
        if w.dtype != torch.float32 or w.device.type != "cpu" or w.ndim != 2:
            raise ValueError("CertifiedArgmax needs a float32 CPU weight [vocab, d].")
        self.weight = w
        self.weight16 = w.to(torch.bfloat16)
        self.max_norm = float(w.norm(dim=1).max())

    @staticmethod
    def applicable(adapter) -> bool:
        """Whether a model's unembedding can take this path: float32 on a CPU with native
        bfloat16, no bias, no final logit softcapping (a saturated tanh can tie logits), oneDNN
        on (``REFUSAL_LAB_LINEAR=torch`` turns both off)."""
        from refusal_lab.models import cpu_linear

        head = adapter.lm_head
        return (head.weight.dtype == torch.float32 and head.weight.device.type == "cpu" and head.bias is None
                and not getattr(adapter.config, "final_logit_softcapping", None) and cpu_linear.available()
                and native_bf16())

    @torch.no_grad()
    def __call__(self, normed: torch.Tensor) -> torch.Tensor:
        h = normed.detach().to(torch.float32).reshape(-1, self.weight.shape[1])
        approx = torch.ops.mkldnn._linear_pointwise(h.to(torch.bfloat16), self.weight16, None, "none", [], "")
        hi, lo = approx.amax(-1).float(), approx.amin(-1).float()
        d = self.weight.shape[1]
        bound = SAFETY * ((2 * U + U * U + d * 2.0 ** -24) * h.norm(dim=1) * self.max_norm
                          + U * torch.maximum(hi.abs(), lo.abs()) * (1 + U))
        if not bool(torch.isfinite(bound).all()):
            return self._full(h).reshape(normed.shape[:-1])
        # a token below max - 2B cannot win: its logit < its bf16 value + B < max - B <= the best logit
        floor = hi - 2 * bound
        floor = (floor - floor.abs() * 2 * U).to(torch.bfloat16)  # rounding to bfloat16 may not raise it
        rows, ids = (approx >= floor[:, None]).nonzero(as_tuple=True)
        if rows.numel() > MAX_CANDIDATES:
            return self._full(h).reshape(normed.shape[:-1])
        exact = (h[rows] * self.weight[ids]).sum(-1)
        best = torch.full((h.shape[0],), float("-inf")).scatter_reduce(0, rows, exact, "amax")
        top = exact == best[rows]
        vocab = self.weight.shape[0]
        out = torch.full((h.shape[0],), vocab, dtype=torch.long).scatter_reduce(0, rows[top], ids[top], "amin")
        lost = out == vocab  # a row without a finite candidate (NaN logits): the plain product decides
        if bool(lost.any()):
            out[lost] = self._full(h[lost])
        return out.reshape(normed.shape[:-1])

    def _full(self, h: torch.Tensor) -> torch.Tensor:
        from refusal_lab.models.cpu_linear import linear

        return linear(h, self.weight).argmax(-1)
