"""Ready-made hook functions: read, replace, add to, or project out a vector at a site.

Each edit applies to chosen token columns (absolute indices, None = all) and a chosen slice of
the batch (None = all rows), so one forward pass can give different rows different edits — the
patching engine and the steering sweeps rely on that. Edits never modify the activation in place.

    with model.hooks([("blocks.5.hook_resid_pre", Add(v, alpha=4.0, positions=[-1 + T]))]):
        logits = model(ids, mask)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refusal_lab.errors import SiteError
from refusal_lab.models.hooked import HookPoint

Rows = int | slice | Sequence[int] | torch.Tensor | None


def _row_index(rows: Rows, b: int, device) -> torch.Tensor:
    if rows is None:
        return torch.arange(b, device=device)
    if isinstance(rows, slice):
        return torch.arange(b, device=device)[rows]
    return torch.as_tensor(rows, device=device).reshape(-1)


@dataclass(kw_only=True)  # keyword-only, so subclasses take their value first: Add(v, alpha=4.0)
class _Edit:
    positions: Sequence[int] | torch.Tensor | None = None
    batch: Rows = None
    head: int | None = None  # for attn.hook_z / attn.hook_result: edit one head only

    def _select(self, act: torch.Tensor, hook: HookPoint):
        """(row index [r], column index [c]) of the entries this edit touches in ``act``."""
        rows = _row_index(self.batch, act.shape[0], act.device)
        cmask = hook.col_mask(self.positions)
        cols = torch.arange(act.shape[1], device=act.device) if cmask is None else cmask.nonzero().flatten().to(act.device)
        return rows, cols

    def _view(self, act: torch.Tensor, hook: HookPoint | None = None) -> torch.Tensor:
        if self.head is None:
            return act
        name = hook.name if hook is not None else "this site"
        if act.ndim != 4:
            raise SiteError(
                f"head={self.head} only applies to per-head sites (attn.hook_z, attn.hook_result), not '{name}'."
            )
        if not 0 <= int(self.head) < act.shape[2]:
            raise SiteError(
                f"Head {self.head} is out of range at '{name}': this model has heads 0..{act.shape[2] - 1}."
            )
        return act[:, :, self.head]

    def __call__(self, act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        rows, cols = self._select(act, hook)
        if rows.numel() == 0 or cols.numel() == 0:
            return act
        out = act.clone()
        target = self._view(out, hook)
        sub = target[rows[:, None], cols[None, :]]  # [r, c, ...]
        target[rows[:, None], cols[None, :]] = self.apply(sub, rows, cols, hook).to(act.dtype)
        return out

    def apply(self, sub: torch.Tensor, rows, cols, hook) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass
class Replace(_Edit):
    """Set the activation to ``value``, broadcast against [rows, cols, ...] (e.g. a cached
    activation of another prompt indexed the same way, or a single vector)."""

    value: torch.Tensor | None = None

    def apply(self, sub, rows, cols, hook):
        v = self.value.to(sub.device)
        return v.expand_as(sub) if v.shape != sub.shape else v


@dataclass
class Add(_Edit):
    """Add ``alpha * vector`` (activation addition / steering)."""

    vector: torch.Tensor | None = None
    alpha: float = 1.0

    def apply(self, sub, rows, cols, hook):
        return sub + self.alpha * self.vector.to(sub.device, sub.dtype)


@dataclass
class ProjectOut(_Edit):
    """Remove the component along ``direction`` (normalised here): x - (x·r̂) r̂."""

    direction: torch.Tensor | None = None

    def apply(self, sub, rows, cols, hook):
        r = self.direction.to(sub.device, torch.float32)
        r = r / r.norm()
        x = sub.float()
        return (x - (x @ r)[..., None] * r).to(sub.dtype)


@dataclass
class Read:
    """Store the activation (or a column subset) in ``self.value`` without changing it."""

    positions: Sequence[int] | torch.Tensor | None = None
    value: torch.Tensor | None = None

    def __call__(self, act: torch.Tensor, hook: HookPoint) -> None:
        cmask = hook.col_mask(self.positions)
        self.value = (act if cmask is None else act[:, cmask.to(act.device)]).detach()
        return None
