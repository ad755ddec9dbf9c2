"""The reference computation of a patching grid: one full forward (all prompts) per cell with a
patching hook, as TransformerLens's ``patching`` module does. Slow (cells × full forwards) and
simple, so that the cone engine (:mod:`refusal_lab.patching.engine`) can be tested against it;
both patch through the same :class:`~refusal_lab.models.edits.Patch`."""

from __future__ import annotations

import torch

from refusal_lab.models.edits import Patch
from refusal_lab.models.hooked import ActivationCache, HookedChatModel
from refusal_lab.patching.engine import GRID_SITES, Batch, GridSpec, NormedMetric


@torch.no_grad()
def naive_patch(
    model: HookedChatModel,
    receiver: Batch,
    source: ActivationCache,
    spec: GridSpec,
    metric: NormedMetric,
) -> torch.Tensor:
    """Metric per prompt and cell [n, len(layers), len(cols or heads)], one full forward per cell."""
    site = GRID_SITES[spec.grid]
    n = receiver.n
    out = torch.empty(n, *spec.shape)
    idx = torch.arange(n)

    def patch(name: str, cols: list[int], head: int | None = None) -> tuple[str, Patch]:
        values = source[name][:, cols] if head is None else source[name][:, cols, head]
        return name, Patch.block(values, cols, head)

    for a, l in enumerate(spec.layers):
        for b in range(spec.shape[1]):
            if spec.grid == "heads":
                hooks = [patch(f"blocks.{l}.{site}", spec.cols, spec.heads[b])]
            else:
                c = spec.cols[b]
                layers = range(l + 1) if spec.grid.endswith("cumulative") else [l]
                hooks = [patch(f"blocks.{k}.{site}", [c]) for k in layers]
            logits = model(receiver.ids, receiver.mask, fwd_hooks=hooks, logits="last")
            out[:, a, b] = metric.from_logits(logits, idx).cpu()
    return out
