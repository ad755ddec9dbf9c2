"""Splitting one patching grid into shards that reproduce the single-process values exactly.

A shard is a :class:`GridSpec` with a subset of the grid's cells, computed by the same engine
(:func:`refusal_lab.patching.engine.patch_grid`) and written back into the full
``[n_pairs, rows, cols]`` tensor by :func:`merge`.

* Per-layer grids (``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out``, ``heads``) are split
  by **layers**: each cell is an independent patched forward, so any subset of layers gives the
  same cell values.
* Cumulative grids are split by **columns**: cell (l, c) branches off the trunk of column c (which
  patches every layer at c), so a column shard computes its trunks once and nothing twice, and its
  trunks and branches run in exactly the batches of the single-process run.

Shards are balanced by cone cost (layers × columns each patched forward really computes).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from refusal_lab.patching.engine import GridSpec


def shard_axis(spec: GridSpec) -> str:
    """``"cols"`` for cumulative grids, ``"layers"`` otherwise."""
    return "cols" if spec.grid.endswith("cumulative") else "layers"


def _unit_costs(spec: GridSpec, n_layers: int, seq_len: int) -> list[float]:
    """Relative cost of each shard unit (a layer, or a column of a cumulative grid)."""
    if shard_axis(spec) == "cols":
        # trunk: every layer at columns c..T-1; branches: layers l+1..L-1 for each cell l
        return [(seq_len - c) * (n_layers + sum(n_layers - 1 - l for l in spec.layers)) for c in spec.cols]
    if spec.grid == "heads":
        width = (seq_len - min(spec.cols)) * len(spec.heads or [])
        return [(n_layers - l) * width for l in spec.layers]
    return [(n_layers - l) * sum(seq_len - c for c in spec.cols) for l in spec.layers]


def split_spec(spec: GridSpec, n_shards: int, n_layers: int, seq_len: int) -> list[GridSpec]:
    """At most ``n_shards`` non-empty sub-specs covering every cell of ``spec`` once.

    Units are assigned greedily, most expensive first, to the currently cheapest shard (LPT), and
    kept in the grid's order inside each shard."""
    axis = shard_axis(spec)
    units = list(getattr(spec, axis))
    costs = _unit_costs(spec, n_layers, seq_len)
    n = max(1, min(n_shards, len(units)))
    bins: list[list[int]] = [[] for _ in range(n)]
    load = [0.0] * n
    for i in sorted(range(len(units)), key=lambda i: (-costs[i], i)):
        k = min(range(n), key=lambda k: (load[k], k))
        bins[k].append(i)
        load[k] += costs[i]
    return [replace(spec, **{axis: [units[i] for i in sorted(b)]}) for b in bins if b]


def merge(spec: GridSpec, shards: list[GridSpec], parts: list[torch.Tensor], n_pairs: int) -> torch.Tensor:
    """The full ``[n_pairs, *spec.shape]`` tensor from each shard's ``[n_pairs, *shard.shape]`` part."""
    axis = shard_axis(spec)
    full = getattr(spec, axis)
    out = torch.empty(n_pairs, *spec.shape)
    filled = torch.zeros(spec.shape[0] if axis == "layers" else spec.shape[1], dtype=torch.bool)
    for shard, part in zip(shards, parts):
        idx = [full.index(u) for u in getattr(shard, axis)]
        if tuple(part.shape) != (n_pairs, *shard.shape):
            raise ValueError(f"shard of {spec.grid} returned shape {tuple(part.shape)}, expected {(n_pairs, *shard.shape)}")
        if axis == "layers":
            out[:, idx] = part.to(out.dtype)
        else:
            out[:, :, idx] = part.to(out.dtype)
        filled[idx] = True
    if not bool(filled.all()):
        raise ValueError(f"shards of {spec.grid} do not cover every {axis[:-1]}")
    return out
