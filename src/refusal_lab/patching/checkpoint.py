"""Within-grid checkpoints: the values of a patching grid's finished rows, saved after every batch.

A long exact grid (hours on a large model) that is interrupted resumes from the rows it had
finished. The file is a safetensors file written atomically; its metadata carries a key of
everything the values depend on (model, grid spec, metric, the receiver's tokens, the source
values of the patched sites), and a checkpoint whose key differs is ignored and overwritten.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from refusal_lab.artifacts import save_tensors
from refusal_lab.models.hooked import ActivationCache, HookedChatModel

if TYPE_CHECKING:  # pragma: no cover
    from refusal_lab.patching.engine import GridSpec, NormedMetric, Receiver


def grid_key(model: HookedChatModel, receiver: Receiver, source: ActivationCache, spec: GridSpec, sites: set[str],
             metric: NormedMetric, n_rows: int) -> str:
    """What a grid checkpoint must match: the model, the grid spec, the metric, the receiver's
    tokens and the source values of the patched ``sites``."""
    h = hashlib.sha256()
    h.update(json.dumps([model.cfg.model_name, model.cfg.dtype, spec.grid, spec.layers, spec.cols, spec.heads,
                         repr(metric), n_rows]).encode())
    for t in (receiver.batch.ids, receiver.batch.mask):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for name in sorted(sites):
        h.update(source[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RowCheckpoint:
    """``values`` [n_rows] and ``done`` [n_rows] of one grid's rows, read from ``path`` when its key
    matches (else zeros / none done), and saved there by :meth:`save` after every batch."""

    def __init__(self, path: Path | str, key: str, spec: GridSpec, n_rows: int):
        self.path = Path(path)
        self.meta = {"key": key, "grid": spec.grid, "layers": json.dumps(spec.layers), "cols": json.dumps(spec.cols),
                     "heads": json.dumps(spec.heads)}
        self.values = torch.zeros(n_rows)
        self.done = torch.zeros(n_rows, dtype=torch.bool)
        if self.path.exists():
            try:
                with safe_open(str(self.path), "pt") as f:
                    if (f.metadata() or {}).get("key") == key:
                        self.values, self.done = f.get_tensor("values"), f.get_tensor("done").bool()
            except Exception:  # unreadable: start afresh (it is rewritten atomically)
                pass

    def save(self, chunk: list[int], vals: torch.Tensor) -> None:
        """Record the values of rows ``chunk`` and write the file."""
        self.values[chunk] = vals
        self.done[chunk] = True
        save_tensors(self.path, {"values": self.values, "done": self.done.to(torch.uint8)}, self.meta)
