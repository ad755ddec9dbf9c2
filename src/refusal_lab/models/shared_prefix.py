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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SharedPrefix"]


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

    def last_logits(self, model, fwd_hooks: Sequence = ()) -> torch.Tensor:
        """Last-column logits [n, vocab] of every row under ``fwd_hooks`` (column-independent edits
        only): the prefix once, then each batch on its keys and values."""
        hooks = list(fwd_hooks)
        if self.prefix_len == 0:
            kv = None
        else:
            kv = model.prefill(self.prefix, fwd_hooks=hooks, record_kv=True, logits="none").kv
        a = model.adapter
        out = []
        for _, sid, smask, last in self.batches:
            b = sid.shape[0]
            prefix = None if kv is None else {l: (k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
                                              for l, (k, v) in kv.items()}
            resid = model.prefill(sid, smask, fwd_hooks=hooks, kv_prefix=prefix, logits="none").resid
            final = resid[torch.arange(b, device=resid.device), last.to(resid.device)]
            final = final.to(a.final_norm.weight.device)
            out.append(a.final_logits(a.final_norm(final).to(a.lm_head.weight.device)))
        return torch.cat(out)
