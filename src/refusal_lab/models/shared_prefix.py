"""Prompts that begin alike, run with their common beginning computed once.

Chat prompts share a long beginning (the chat template's system turn and the user turn's opening:
about half of Qwen2.5's instruction prompts). Under an edit that treats every column alike
(directional ablation of every residual write, an addition at every column), that beginning's
activations are the same in every row, so :class:`SharedPrefix` runs it once as a one-row prompt,
keeps its keys and values, and runs each batch's remaining tokens on top of them
(:meth:`HookedChatModel.prefill` with ``kv_prefix``), right-padded so that every row's real tokens
stay contiguous (sliding windows count columns), reading each row's logits at its own last token.
Positions and key distances are those of the whole left-padded prompt, so the result equals the
whole forward to rounding (tested per architecture). Edits that pick columns by index see other
column numbers, and ``ln_final`` sites are not run: only column-independent residual edits belong here.

:meth:`SharedPrefix.record` also keeps the unedited residual entering chosen layers (prefix and
every batch), so that an edit at layer ``l`` or later runs only blocks ``l..``
(:meth:`SharedPrefix.last_logits` with ``cone``): the blocks below an edit compute what the unedited
run computed, prefix included, and the blocks run need only their own keys and values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Cone", "SharedPrefix", "repeat_rows", "row_logits"]


def repeat_rows(kv: dict | None, b: int) -> dict | None:
    """A one-row prefill's keys and values as ``b`` rows (views, no copy)."""
    return None if kv is None else {l: (k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for l, (k, v) in kv.items()}


def row_logits(model, resid: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Logits [b, vocab] at each row's own last column ``last`` [b] of ``resid`` [b, S, d] (a
    right-padded suffix batch): final norm and unembedding of those columns only."""
    a = model.adapter
    final = resid[torch.arange(resid.shape[0], device=resid.device), last.to(resid.device)]
    return a.final_logits(a.final_norm(final.to(a.final_norm.weight.device)).to(a.lm_head.weight.device))


@dataclass
class Cone:
    """The unedited run's residuals entering ``layers``: the prefix's [1, P, d] and each batch's
    [b, S, d] (a cone edit's blocks start from them; the blocks below are not run at all, so their
    keys and values are not needed either)."""

    layers: tuple[int, ...]
    prefix_resid: dict[int, torch.Tensor]
    resid: list[dict[int, torch.Tensor]]


@dataclass
class SharedPrefix:
    """Left-padded ``(ids, mask)`` batches split at the tokens every row begins with.

    ``prefix`` [1, P] is the common beginning (at most every row's length - 1, so each row keeps its
    last token); ``batches`` are ``(rows, suffix_ids [b, S], mask [b, P + S], last [b])`` with the
    rows' own tokens after the prefix, right-padded per batch, and each row's last real column."""

    prefix: torch.Tensor
    batches: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]
    n: int

    @classmethod
    def split(cls, ids: torch.Tensor, mask: torch.Tensor | None, batch_size: int, device=None) -> SharedPrefix:
        """Split ``ids`` [n, T] (left-padded; ``mask`` None = no padding) into the common prefix and
        batches of ``batch_size`` consecutive rows."""
        mask = torch.ones_like(ids) if mask is None else mask
        rows = [ids[i][mask[i].bool()] for i in range(ids.shape[0])]
        P = min(len(r) for r in rows) - 1
        first = rows[0]
        for r in rows[1:]:
            same = (r[:P] == first[:P]).long()
            P = int(same.cumprod(0).sum()) if P > 0 else 0
        device = ids.device if device is None else device
        batches = []
        for s in range(0, len(rows), batch_size):
            idx = list(range(s, min(s + batch_size, len(rows))))
            S = max(len(rows[i]) - P for i in idx)
            sid = torch.zeros(len(idx), S, dtype=ids.dtype)
            smask = torch.zeros(len(idx), P + S, dtype=mask.dtype)
            smask[:, :P] = 1
            last = torch.zeros(len(idx), dtype=torch.long)
            for j, i in enumerate(idx):
                tail = rows[i][P:]
                sid[j, :len(tail)] = tail
                smask[j, P:P + len(tail)] = 1
                last[j] = len(tail) - 1
            batches.append((idx, sid.to(device), smask.to(device), last.to(device)))
        return cls(first[:P].reshape(1, P).to(device), batches, len(rows))

    @property
    def prefix_len(self) -> int:
        return int(self.prefix.shape[1])

    def last_logits(self, model, fwd_hooks: Sequence = (), *, cone: Cone | None = None,
                    start_layer: int = 0) -> torch.Tensor:
        """Last-column logits [n, vocab] of every row under ``fwd_hooks`` (column-independent edits
        only): the prefix once, then each batch on its keys and values. With ``cone`` (from
        :meth:`record`) and ``start_layer`` one of its layers, only blocks ``start_layer..`` run,
        from the unedited residuals there: right for edits at that layer or later."""
        return self._run(model, list(fwd_hooks), cone=cone, start_layer=start_layer)[0]

    def iter_last_logits(self, model, fwd_hooks: Sequence = ()):
        """``(row indices, last-column logits [b, vocab])`` batch by batch under ``fwd_hooks``
        (column-independent edits only), the prefix run once before the first batch: a caller may
        stop early (e.g. once a running sum decides) and pays only for the batches it took. The
        same values as :meth:`last_logits`, bit for bit."""
        for idx, logits, _ in self._iter_run(model, list(fwd_hooks)):
            yield idx, logits

    @torch.no_grad()
    def mean_resid(self, model, layers: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Mean over rows of ``blocks.{l}.hook_resid_pre`` at each row's column ``p`` (negative:
        from its last token, as in a left-padded batch), unedited: float64 [len(layers), len(positions), d].
        A column inside the common prefix takes the prefix's value (the same in every row)."""
        total = torch.zeros(len(layers), len(positions), model.cfg.d_model, dtype=torch.float64)
        for _, x in self._resid_rows(model, layers, positions):
            total += x
        return total / self.n

    @torch.no_grad()
    def row_resid(self, model, layers: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Each row's ``blocks.{l}.hook_resid_pre`` at its column ``p`` (negative, as in
        :meth:`mean_resid`), unedited: float64 [n, len(layers), len(positions), d] in row order."""
        out = torch.zeros(self.n, len(layers), len(positions), model.cfg.d_model, dtype=torch.float64)
        for i, x in self._resid_rows(model, layers, positions):
            out[i] = x
        return out

    def _resid_rows(self, model, layers: Sequence[int], positions: Sequence[int]):
        """``(row, [len(layers), len(positions), d] float64)`` for every row, batch by batch; each
        forward stops after the last layer it reads."""
        layers, positions = [int(l) for l in layers], [int(q) for q in positions]
        if any(q >= 0 for q in positions):
            raise ValueError("mean_resid and row_resid take columns counted from each row's end (negative positions).")
        names = [f"blocks.{l}.hook_resid_pre" for l in layers]
        stop = max(layers) + 1
        P, kv, pre_res = self.prefix_len, None, None
        if P:
            pre = model.prefill(self.prefix, record_kv=True, logits="none", names=names, stop_layer=stop)
            kv = pre.kv
            pre_res = torch.stack([pre.cache[n][0] for n in names]).to(torch.float64).cpu()  # [L, P, d]
        for rows, sid, smask, last in self.batches:
            b = sid.shape[0]
            run = model.prefill(sid, smask, kv_prefix=repeat_rows(kv, b), logits="none", names=names, stop_layer=stop)
            acts = torch.stack([run.cache[n] for n in names]).to(torch.float64).cpu()  # [L, b, S, d]
            cols = last.cpu()[:, None] + 1 + torch.tensor(positions)[None]  # [b, Q] in the suffix (< 0: prefix)
            for r in range(b):
                x = torch.empty(len(layers), len(positions), model.cfg.d_model, dtype=torch.float64)
                for j in range(len(positions)):
                    c = int(cols[r, j])
                    if c >= 0:
                        x[:, j] = acts[:, r, c]
                    elif P + c >= 0:
                        x[:, j] = pre_res[:, P + c]
                    else:
                        raise ValueError(f"Position {positions[j]} is before the start of row {rows[r]}'s prompt.")
                yield rows[r], x

    def record(self, model, layers: Sequence[int]) -> tuple[torch.Tensor, Cone]:
        """The unedited last-column logits [n, vocab] and the :class:`Cone` of ``layers``."""
        return self._run(model, [], record=tuple(sorted(set(int(l) for l in layers))))

    def _run(self, model, hooks: list, *, cone: Cone | None = None, start_layer: int = 0,
             record: tuple[int, ...] | None = None):
        prefix_resid: dict = {}
        out, resid_cache = [], []
        for _, logits, resid in self._iter_run(model, hooks, cone=cone, start_layer=start_layer, record=record,
                                               prefix_resid=prefix_resid):
            out.append(logits)
            resid_cache.append(resid)
        logits = torch.cat(out)
        if record is None:
            return logits, None
        return logits, Cone(record, prefix_resid, resid_cache)

    def _iter_run(self, model, hooks: list, *, cone: Cone | None = None, start_layer: int = 0,
                  record: tuple[int, ...] | None = None, prefix_resid: dict | None = None):
        """``(row indices, last-column logits, {layer: resid_pre} of the batch or None)`` batch by
        batch, the prefix run once first (its recorded residuals put into ``prefix_resid``)."""
        if start_layer and (cone is None or start_layer not in cone.layers):
            raise ValueError(f"start_layer {start_layer} needs a cone recorded at that layer.")
        names = [f"blocks.{l}.hook_resid_pre" for l in record] if record else None
        kv = None
        if self.prefix_len:
            pre = model.prefill(self.prefix, fwd_hooks=hooks, record_kv=True, logits="none", names=names,
                                start_layer=start_layer, resid=cone.prefix_resid[start_layer] if start_layer else None)
            kv = pre.kv  # the blocks run: those from start_layer on
            if record and prefix_resid is not None:
                prefix_resid.update({l: pre.cache[n] for l, n in zip(record, names)})
        for bi, (idx, sid, smask, last) in enumerate(self.batches):
            b = sid.shape[0]
            run = model.prefill(sid, smask, fwd_hooks=hooks, kv_prefix=repeat_rows(kv, b), logits="none", names=names,
                                start_layer=start_layer, resid=cone.resid[bi][start_layer] if start_layer else None)
            yield idx, row_logits(model, run.resid, last), ({l: run.cache[n] for l, n in zip(record, names)}
                                                              if record else None)
