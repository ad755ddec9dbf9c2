"""Standard harmful-prompt sets for evaluation: HarmBench (text behaviours), StrongREJECT and the
project's own instruction splits, each cut into an *optimise* part and a *held-out* part.

The CSVs are copied verbatim from MIT-licensed wheels into ``refusal_lab/data/eval_sets/`` (its
README records source, licence, upstream commit and sha256); nothing here imports those packages.

* ``harmbench``: the ``standard`` functional category only (no context string; contextual rows need
  their context, copyright rows a hash judge): optimise on the 41 val rows, report on the 159 test rows.
* ``strongreject``: the 313 forbidden prompts, shuffled with ``random.Random(seed)``; the first 40 %
  optimise, the rest are held out.
* ``instructions``: the packaged Arditi et al. splits, optimise on val, report on test.
"""

from __future__ import annotations

import csv
import random
from functools import lru_cache
from importlib import resources
from pathlib import Path

from refusal_lab.errors import PromptError
from refusal_lab.prompts.data import load_instructions

__all__ = ["EVAL_FILES", "EVAL_SETS", "EVAL_SPLITS", "eval_set_dir", "load_eval_set"]

EVAL_SETS = ("harmbench", "strongreject", "instructions")
EVAL_SPLITS = ("optimize", "heldout")
EVAL_FILES = ("harmbench_behaviors_text_val.csv", "harmbench_behaviors_text_test.csv", "strongreject_dataset.csv")
STRONGREJECT_OPTIMIZE_FRAC = 0.4


def eval_set_dir() -> Path:
    """The packaged folder holding the evaluation CSVs and their README."""
    return Path(str(resources.files("refusal_lab").joinpath("data", "eval_sets")))


@lru_cache(maxsize=None)
def _rows(name: str) -> tuple[dict, ...]:
    with open(eval_set_dir() / name, newline="", encoding="utf-8") as f:
        return tuple(csv.DictReader(f))


def _harmbench(split: str) -> list[str]:
    rows = _rows("harmbench_behaviors_text_val.csv" if split == "optimize" else "harmbench_behaviors_text_test.csv")
    return [r["Behavior"].strip() for r in rows
            if r["FunctionalCategory"] == "standard" and not (r.get("ContextString") or "").strip()]


def _strongreject(split: str, seed: int) -> list[str]:
    prompts = [r["forbidden_prompt"].strip() for r in _rows("strongreject_dataset.csv")]
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    cut = int(round(STRONGREJECT_OPTIMIZE_FRAC * len(prompts)))
    keep = order[:cut] if split == "optimize" else order[cut:]
    return [prompts[i] for i in keep]


def load_eval_set(name: str, split: str, n: int | None = None, seed: int = 0) -> list[str]:
    """Harmful prompts of eval set ``name`` (``harmbench``, ``strongreject``, ``instructions``),
    ``split`` ``optimize`` (chosen on) or ``heldout`` (reported on); the two never share a prompt.

    ``n``: a seeded sample of ``n`` (``random.Random(seed)``), all when the split is smaller or
    ``n`` is None. StrongREJECT's optimise/held-out cut is seeded by ``seed`` too."""
    if name not in EVAL_SETS:
        raise PromptError(f"Unknown eval set {name!r}; use one of: {', '.join(EVAL_SETS)}.")
    if split not in EVAL_SPLITS:
        raise PromptError(f"Unknown eval split {split!r}; use 'optimize' or 'heldout'.")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise PromptError(f"n must be a positive number of prompts, got {n!r}.")
    if name == "harmbench":
        rows = _harmbench(split)
    elif name == "strongreject":
        rows = _strongreject(split, seed)
    else:
        rows = load_instructions("val" if split == "optimize" else "test", "harmful")
    if n is None or n >= len(rows):
        return list(rows)
    return random.Random(seed).sample(rows, n)
