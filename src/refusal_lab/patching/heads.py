"""Patching a set of attention heads together: the refusal heads' joint sufficiency and their
patched generations.

The patch sets every selected head's ``attn.hook_z`` at the given columns to its value in the
source run. :func:`head_edits` describes it once, per prompt; :func:`patch_heads` runs it through
the cone engine (a metric per prompt) and :func:`head_patch_hooks` turns the same edits into
``fwd_hooks`` (one :class:`~refusal_lab.models.edits.Patch` per layer, built by the engine's own
:func:`~refusal_lab.patching.engine.edit_patch`) for any forward or ``generate``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from refusal_lab.models.edits import Patch
from refusal_lab.models.hooked import ActivationCache, HookedChatModel
from refusal_lab.patching.engine import Edit, NormedMetric, Receiver, Row, edit_patch, run_rows

Heads = Sequence[tuple[int, int]]  # (layer, head)


def head_edits(source: ActivationCache, heads: Heads, cols: Sequence[int], prompt: int) -> list[Edit]:
    """Prompt ``prompt``'s edits: every (layer, head) of ``heads`` at every column of ``cols`` set to
    the source run's ``attn.hook_z``."""
    return [Edit(l, "attn.hook_z", c, source[f"blocks.{l}.attn.hook_z"][prompt, c, h], h) for l, h in heads for c in cols]


@torch.no_grad()
def patch_heads(
    model: HookedChatModel,
    receiver: Receiver,
    source: ActivationCache,
    heads: Heads,
    cols: Sequence[int],
    metric: NormedMetric,
    max_rows: int | None = None,
) -> torch.Tensor:
    """Metric [n] of every receiving prompt with all ``heads`` patched together from the source at
    ``cols`` (prompt i from source prompt i), by the cone engine: one row per prompt, starting at the
    first patched layer and column."""
    first = min(l for l, _ in heads)
    rows = [Row(i, first, min(cols), head_edits(source, heads, cols, i)) for i in range(receiver.batch.n)]
    return run_rows(model, receiver, rows, metric, max_rows)


def head_patch_hooks(source: ActivationCache, heads: Heads, cols: Sequence[int]) -> list[tuple[str, Patch]]:
    """``fwd_hooks`` applying :func:`patch_heads`'s patch to every prompt of the source run (row i
    from source prompt i) in a forward or a ``generate`` of the receiving prompts; the patched
    columns are prompt columns, so generated tokens are not patched."""
    n = source[f"blocks.{heads[0][0]}.attn.hook_z"].shape[0]
    by_site: dict[str, list[tuple[int, Edit]]] = defaultdict(list)
    for i in range(n):
        for e in head_edits(source, heads, cols, i):
            by_site[f"blocks.{e.layer}.{e.site}"].append((i, e))
    return [(site, edit_patch(items)) for site, items in by_site.items()]
