"""fp32 matrix products on the CPU through oneDNN instead of PyTorch's default BLAS.

PyTorch's CPU wheels run ``nn.Linear`` in float32 through MKL's ``sgemm``. On the AMD EPYC (Zen 2)
machines this project runs on, that reaches about half of the AVX2 peak at large row counts and a
third of it at the 16-48 rows of a decoding step, while oneDNN's matmul, which ships in the same
wheel, reaches the peak; on Zen 4 (AVX-512) oneDNN is 1.1-2.3x faster too
(``benchmarks/bench_linear.py`` measures both on every shape of the default model: a 16-token
decoding 1.91x faster on Zen 2, 1.47x on Zen 4). Greedy decoding is matrix products at small row
counts, so this is most of the steering steps' time.

:func:`linear` is ``F.linear`` with that choice: oneDNN for float32 CPU products that need no
gradient, ``F.linear`` for everything else (other dtypes and devices, and any product autograd must
differentiate, forward-mode and ``torch.func`` transforms included: the first-order estimates,
attribution patching and AtP*'s JVPs keep PyTorch's path). The two
agree to float32 rounding (summation order), not bit for bit. :func:`use_onednn_linear` switches
every ``nn.Linear`` of a model to it in place (:class:`OneDNNLinear`, a subclass: weights, hooks,
``state_dict`` and ``isinstance`` checks are unchanged); :class:`~refusal_lab.models.hooked.HookedChatModel`
does so on construction, and ``REFUSAL_LAB_LINEAR=torch`` in the environment turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

__all__ = ["ENV", "OneDNNLinear", "available", "linear", "under_transform", "use_onednn_linear"]

ENV = "REFUSAL_LAB_LINEAR"
"""Environment variable: ``torch`` keeps PyTorch's default matrix products (``onednn``, the default, uses oneDNN)."""

NARROW = 512
SMALL_ROWS = 64
"""Products with fewer output columns than ``NARROW`` and fewer rows than ``SMALL_ROWS`` (the
key/value projections while decoding) stay on ``F.linear``, which measured faster there."""


def available() -> bool:
    """Whether this PyTorch build has oneDNN's linear operator and the environment has not turned it off."""
    if os.environ.get(ENV, "onednn").strip().lower() == "torch":
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _needs_derivative(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether any automatic differentiation may need this product: autograd (a tensor requires a
    gradient), forward-mode AD (a dual level is open) or a ``torch.func`` transform (``jvp``,
    ``vmap``, ``grad``: wrapped tensors). oneDNN's operator has no derivative formulas, so under
    those it would silently drop tangents."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    return under_transform(*tensors)


def under_transform(*tensors: torch.Tensor) -> bool:
    """Whether forward-mode AD (a dual level is open) or a ``torch.func`` transform (any of
    ``tensors`` is wrapped) is running: code paths they cannot follow keep the plain computation."""
    return fwAD._current_level >= 0 or any(_wrapped(t) for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: through oneDNN for a float32 CPU product that no automatic
    differentiation needs (equal to rounding), else ``F.linear`` itself."""
    if (x.dtype is torch.float32 and weight.dtype is torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.dim() >= 2 and not _needs_derivative(x, weight, bias)
            and (weight.shape[0] >= NARROW or x.numel() // max(x.shape[-1], 1) >= SMALL_ROWS)
            and available()):
        if bias is not None and bias.dtype is not torch.float32:
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`linear` (made by :func:`use_onednn_linear`, never built directly)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn_linear(module: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` under ``module`` to :class:`OneDNNLinear` in place (the class
    only: parameters, hooks and buffers stay); returns how many were switched. Subclasses of
    ``nn.Linear`` (quantized or adapter layers) are left alone."""
    n = 0
    for mod in module.modules():
        if type(mod) is nn.Linear:
            mod.__class__ = OneDNNLinear
            n += 1
    return n
