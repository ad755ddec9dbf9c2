"""The prompts the steering code runs on, cut into batches, and the progress bars that count them.

Every steering computation (direction selection, alpha sweeps, the held-out evaluation,
abliteration's difference in means) runs seeded samples of the packaged instructions through the
model batch by batch and shows one tqdm bar per step; these are the one place that samples, cuts
and counts, so the batch counts a bar announces are the batches that run.

* :func:`instruction_sample`: ``n`` seeded harmful and harmless instructions of one split.
* :func:`length_batches`: instructions tokenized as chat prompts and batched by length (less padding).
* :func:`tensor_batches`: fixed-size slices of already tokenized ``(ids, mask)``.
* :func:`n_batches` / :func:`progress_bar`: how many batches a loop runs, and its bar on stderr.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence

import torch

from refusal_lab.prompts import build_instruction_prompts, load_instructions

__all__ = ["instruction_sample", "length_batches", "n_batches", "progress_bar", "tensor_batches"]


def instruction_sample(split: str, n: int, seed: int) -> dict[str, list[str]]:
    """``{"harmful": [...], "harmless": [...]}``: ``n`` seeded instructions of ``split`` each (all of
    a side whose split is smaller)."""
    return {k: load_instructions(split, k, n=min(n, len(load_instructions(split, k))), seed=seed)
            for k in ("harmful", "harmless")}


def length_batches(model, instructions: Sequence[str], batch_size: int,
                   chat_template=None) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """``(indices, ids, mask)`` batches of the instructions as chat prompts, shortest first, on the
    model's device; ``indices`` say which instructions each batch holds."""
    tok = model.tokenizer
    lengths = [len(build_instruction_prompts(tok, [s], chat_template)[0][0]) for s in instructions]
    order = sorted(range(len(instructions)), key=lambda i: lengths[i])
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        ids, mask = build_instruction_prompts(tok, [instructions[i] for i in idx], chat_template)
        yield idx, ids.to(model.device), mask.to(model.device)


def tensor_batches(ids: torch.Tensor, mask: torch.Tensor | None, batch_size: int,
                   device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive ``(ids, mask)`` slices of ``batch_size`` rows on ``device`` (``mask=None``: all ones)."""
    if mask is None:
        mask = torch.ones_like(ids)
    for s in range(0, ids.shape[0], batch_size):
        yield ids[s : s + batch_size].to(device), mask[s : s + batch_size].to(device)


def n_batches(n: int, batch_size: int) -> int:
    """How many batches :func:`length_batches` / :func:`tensor_batches` cut ``n`` prompts into."""
    return math.ceil(n / max(int(batch_size), 1)) if n > 0 else 0


def progress_bar(total: int, desc: str, progress: bool = True, unit: str = "batch"):
    """The steering steps' tqdm bar on stderr (n of N, ETA); disabled when ``progress`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not progress, file=sys.stderr)
