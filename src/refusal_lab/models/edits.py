"""Ready-made hook functions: patch, replace, add to, or project out a vector at a site.

Each edit applies to chosen token columns (absolute indices, None = all) and a chosen slice of
the batch (None = all rows), so one forward pass can give different rows different edits — the
patching engine and the steering sweeps rely on that. Edits never modify the activation in place:
every one ends in :func:`write`, one indexed write into a copy.

* :class:`Patch`: the batched patch — entry k sets (row k, column k[, head k]) to value k. The
  patching engine's cone runs, its naive reference and the refusal heads' patched generation
  (:mod:`refusal_lab.patching.heads`) all patch through it.
* :class:`Replace`, :class:`Add`, :class:`ProjectOut`: one operation on rows × columns (× one head).

    with model.hooks([("blocks.5.hook_resid_pre", Add(v, alpha=4.0, positions=[-1 + T]))]):
        logits = model(ids, mask)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refusal_lab.errors import SiteError
from refusal_lab.models.sites import HookPoint

Rows = int | slice | Sequence[int] | torch.Tensor | None


def positional(hook: HookPoint) -> None:
    """Edits index [b, pos, ...] sites; ``attn.hook_pattern`` is [b, head, q, k] (a SiteError)."""
    if hook.name.endswith("attn.hook_pattern"):
        raise SiteError(
            f"'{hook.name}' is [batch, head, query, key]; the ready-made edits index [batch, pos, ...] sites. "
            "Edit a pattern with a hook function that returns the changed pattern."
        )


def write(act: torch.Tensor, index: tuple, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``act`` with ``values`` (cast to its dtype and device) written at ``index``, a tuple of
    index tensors over its leading axes (row, column[, head]) that broadcast against each other."""
    out = act.clone()
    out[index] = values.to(act.device, act.dtype)
    return out


@dataclass
class Patch:
    """Set ``act[rows[k], cols[k](, heads[k])] = values[k]`` for every entry k, in one write.

    ``cols`` are absolute token columns: an entry whose column is not in this call (a prefix-cached
    run, a generated token) is skipped. ``heads`` for the per-head sites (``attn.hook_z``)."""

    rows: torch.Tensor  # [k] batch rows
    cols: torch.Tensor  # [k] absolute token columns
    values: torch.Tensor  # [k, ...] the site's trailing shape
    heads: torch.Tensor | None = None  # [k]

    @classmethod
    def block(cls, values: torch.Tensor, cols: Sequence[int], head: int | None = None) -> "Patch":
        """Write ``values`` [b, len(cols), ...] at every (row, column) of rows 0..b-1 × ``cols`` (at ``head``)."""
        b, c = values.shape[:2]
        return cls(torch.arange(b).repeat_interleave(c), torch.as_tensor(list(cols)).repeat(b),
                   values.reshape(b * c, *values.shape[2:]), None if head is None else torch.full((b * c,), int(head)))

    def __call__(self, act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        positional(hook)
        if self.heads is not None and act.ndim != 4:
            raise SiteError(f"A per-head patch only applies to per-head sites (attn.hook_z), not '{hook.name}'.")
        cols = self.cols - int(hook.cols[0])  # this call's columns are consecutive
        keep = (cols >= 0) & (cols < act.shape[1])
        if not bool(keep.any()):
            return act
        index = [self.rows, cols] + ([] if self.heads is None else [self.heads])
        values = self.values
        if not bool(keep.all()):
            index, values = [i[keep] for i in index], values[keep.to(values.device)]
        return write(act, tuple(i.to(act.device) for i in index), values)


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
        positional(hook)
        rows, cols = self._select(act, hook)
        if rows.numel() == 0 or cols.numel() == 0:
            return act
        sub = self._view(act, hook)[rows[:, None], cols[None, :]]  # [r, c, ...]
        index = (rows[:, None], cols[None, :]) + (() if self.head is None else (int(self.head),))
        return write(act, index, self.apply(sub, rows, cols, hook))

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
