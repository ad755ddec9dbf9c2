"""Standard harmful-prompt sets for evaluation: HarmBench (text behaviours), StrongREJECT and the
project's own instruction splits, each cut into an *optimise* part and a *held-out* part.

The CSVs are copied verbatim from MIT-licensed wheels into ``refusal_lab/data/eval_sets/`` (its
README records source, licence, upstream commit and sha256); nothing here imports those packages.

* ``harmbench``: the ``standard`` functional category only (no context string; contextual rows need
  their context, copyright rows a hash judge): optimise on the 41 val rows, report on the 159 test rows.
* ``strongreject``: the 313 forbidden prompts, shuffled with ``random.Random(seed)``; the first 40 %
  optimise, the rest are held out.
* ``instructions``: the packaged Arditi et al. splits, optimise on val, report on test.
* a path to a text file (one prompt per line, blank lines skipped): split like StrongREJECT.
"""

from __future__ import annotations

import csv
import random
from functools import lru_cache
from importlib import resources
from pathlib import Path

from refusal_lab.errors import PromptError
from refusal_lab.prompts.data import load_instructions

__all__ = ["EVAL_FILES", "EVAL_SETS", "EVAL_SPLITS", "check_eval_set", "eval_set_dir", "load_eval_set"]

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


def _seeded_split(prompts: list[str], split: str, seed: int) -> list[str]:
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    cut = int(round(STRONGREJECT_OPTIMIZE_FRAC * len(prompts)))
    keep = order[:cut] if split == "optimize" else order[cut:]
    return [prompts[i] for i in keep]


def _strongreject(split: str, seed: int) -> list[str]:
    return _seeded_split([r["forbidden_prompt"].strip() for r in _rows("strongreject_dataset.csv")], split, seed)


def _text_file(path: Path, split: str, seed: int) -> list[str]:
    try:
        lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"Eval set file {path} cannot be read ({e}); give a UTF-8 text file, one prompt per line.") from None
    prompts = [x for x in lines if x]
    if len(prompts) < 2:
        raise PromptError(f"Eval set file {path} holds {len(prompts)} prompts; it needs at least 2 (one to optimise "
                          "on, one held out), one per line.")
    return _seeded_split(prompts, split, seed)


def check_eval_set(name: str) -> None:
    """Raise the loader's one sentence for an unknown eval set (before any model is loaded)."""
    if name in EVAL_SETS:
        return
    if Path(name).is_file():
        _text_file(Path(name), "optimize", 0)
        return
    raise PromptError(f"Unknown eval set {name!r}; use one of: {', '.join(EVAL_SETS)}, or a text file with one "
                      "prompt per line.")


def load_eval_set(name: str, split: str, n: int | None = None, seed: int = 0) -> list[str]:
    """Harmful prompts of eval set ``name`` (``harmbench``, ``strongreject``, ``instructions`` or a text file),
    ``split`` ``optimize`` (chosen on) or ``heldout`` (reported on); the two never share a prompt.

    ``n``: a seeded sample of ``n`` (``random.Random(seed)``), all when the split is smaller or
    ``n`` is None. StrongREJECT's optimise/held-out cut is seeded by ``seed`` too."""
    check_eval_set(name)
    if split not in EVAL_SPLITS:
        raise PromptError(f"Unknown eval split {split!r}; use 'optimize' or 'heldout'.")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise PromptError(f"n must be a positive number of prompts, got {n!r}.")
    if name == "harmbench":
        rows = _harmbench(split)
    elif name == "strongreject":
        rows = _strongreject(split, seed)
    elif name == "instructions":
        rows = load_instructions("val" if split == "optimize" else "test", "harmful")
    else:
        rows = _text_file(Path(name), split, seed)
    if n is None or n >= len(rows):
        return list(rows)
    return random.Random(seed).sample(rows, n)
