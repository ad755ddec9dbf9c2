"""Steering interventions as hook lists for :class:`HookedChatModel` (``fwd_hooks=`` or
``with model.hooks(...)``).

* :func:`addition_hooks`: activation addition ``resid_pre[l] += alpha * v`` at chosen columns.
* :func:`ablation_hooks`: directional ablation — the unit direction is projected out of every
  write to the residual stream (``hook_embed``, every ``hook_attn_out`` and ``hook_mlp_out``, which
  come after Gemma's post-norms), so no residual site of any layer ever contains it.

Hook lists combine by concatenation (``add + ablate``): edits at a shared site apply in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from refusal_lab.errors import SiteError
from refusal_lab.models.edits import Add, ProjectOut
from refusal_lab.models.hooked import HookPoint

__all__ = ["SteerAdd", "ablation_hooks", "addition_hooks", "unit"]

Positions = Sequence[int] | torch.Tensor | str | None


def unit(direction: torch.Tensor) -> torch.Tensor:
    """``direction / |direction|`` in float64."""
    d = torch.as_tensor(direction).detach().to(torch.float64).reshape(-1)
    n = d.norm()
    if not torch.isfinite(n) or n == 0:
        raise SiteError("The direction has zero (or non-finite) norm; it cannot be normalised.")
    return d / n


@dataclass
class SteerAdd:
    """Add ``alpha * vector`` (a :class:`~refusal_lab.models.edits.Add`) at columns that may be
    given relative to the prompt.

    ``positions``: absolute columns (None = all). ``start`` (an int): every column ``>= start``; a
    negative ``start`` counts from the end of the prompt. ``generated=True``: only columns ``>=
    prompt length`` (the tokens :meth:`HookedChatModel.generate` produces). The prompt length is
    learnt from the prompt pass (the call whose columns start at 0), so one instance follows one
    ``generate`` at a time; a plain forward over a prompt is left unchanged by ``generated=True``.
    ``batch``: the rows to edit (None = all).
    """

    vector: torch.Tensor
    alpha: float = 1.0
    positions: Sequence[int] | torch.Tensor | None = None
    start: int | None = None
    generated: bool = False
    batch: object = None
    prompt_len: int | None = field(default=None, init=False, repr=False)  # learnt from the prompt pass

    def __call__(self, act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        cols = hook.cols
        if cols.numel() and int(cols[0]) == 0:
            self.prompt_len = int(cols.numel())
        positions = self.positions
        if self.generated or (self.start is not None and self.start < 0):
            if self.prompt_len is None:
                raise SiteError("SteerAdd saw no prompt pass (columns from 0); it cannot locate the prompt's end.")
            positions = cols[cols >= self.prompt_len + (0 if self.generated else self.start)]
        elif self.start is not None:
            positions = cols[cols >= self.start]
        return Add(vector=self.vector, alpha=self.alpha, positions=positions, batch=self.batch)(act, hook)


def _resolve(positions: Positions):
    """(positions, start, generated) for SteerAdd from the public ``positions`` spec."""
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return None, None, False
    if isinstance(positions, str):
        if positions == "generated":
            return None, None, True
        if positions.startswith("from:"):
            try:
                return None, int(positions[5:]), False
            except ValueError:
                pass
        raise SiteError(
            f"positions={positions!r} is not understood; use None/'all', 'generated', 'from:<col>' "
            "(negative: from the prompt's end) or a list of absolute columns."
        )
    return positions, None, False


def addition_hooks(vector: torch.Tensor, layer: int, alpha: float = 1.0, positions: Positions = None,
                   *, site: str = "hook_resid_pre", batch=None) -> list[tuple[str, SteerAdd]]:
    """``[(f"blocks.{layer}.{site}", add alpha * vector)]``.

    ``positions``: None or ``"all"`` (every column, prompt and generated), ``"generated"`` (only
    newly generated tokens), ``"from:<col>"`` (columns >= col; negative = from the prompt's end,
    e.g. ``"from:-5"`` = the 5 eoi tokens and everything generated), or a list of absolute columns.
    """
    pos, start, generated = _resolve(positions)
    v = torch.as_tensor(vector).detach().reshape(-1)
    return [(f"blocks.{int(layer)}.{site}",
             SteerAdd(vector=v, alpha=float(alpha), positions=pos, start=start, generated=generated, batch=batch))]


def ablation_hooks(model, direction: torch.Tensor, *, batch=None) -> list[tuple[str, ProjectOut]]:
    """Directional ablation of ``direction`` (normalised) from every residual-stream write:
    ``hook_embed`` and ``blocks.{l}.hook_attn_out`` / ``blocks.{l}.hook_mlp_out`` for every layer."""
    r = unit(direction).to(torch.float32)
    if r.numel() != model.cfg.d_model:
        raise SiteError(f"The direction has {r.numel()} entries but the model's d_model is {model.cfg.d_model}.")
    names = ["hook_embed"]
    for l in range(model.cfg.n_layers):
        names += [f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out"]
    edit = ProjectOut(direction=r, batch=batch)
    return [(n, edit) for n in names]
