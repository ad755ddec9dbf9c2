"""Packaged prompt data: harmful/harmless object lists, instruction templates and instruction splits.

Object lists live in ``refusal_lab/data/objects/<name>.json`` with keys ``harmful``, ``harmless``
(lists of strings), optional ``template`` (e.g. ``"Tell me how to make a {object}."``) and ``source``.
Instruction splits live in ``refusal_lab/data/instructions/<kind>_<split>.json`` as lists of
``{"instruction": str, "category": str | null}``. Everything is validated on load so that a typo in
a user-supplied file fails here with one sentence instead of deep inside a patching run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from refusal_lab.errors import PromptError

DEFAULT_OBJECTS = "seed_gemma2_replication"
"""Name of the object list used when none is given (the Gemma 2 replication's 7 + 7 objects)."""

OBJECT_PLACEHOLDER = "{object}"

_NON_OBJECT_FILES = {"templates"}  # JSON files in data/objects/ that are not object lists
SPLITS = ("train", "val", "test")
KINDS = ("harmful", "harmless")


@dataclass
class ObjectLists:
    """Harmful and harmless objects for "Tell me how to make a {object}." style prompts.

    ``harmful[i]`` is paired with ``harmless[i]`` when prompts are built. ``template`` is the
    instruction template stored with the list (``None`` if the file has none); ``source`` says where
    the list came from; ``path`` is the file it was read from (``None`` when built in code).
    """

    harmful: list[str]
    harmless: list[str]
    template: str | None = None
    source: str | None = None
    path: str | None = None


def _data_dir(sub: str) -> Path:
    return Path(str(resources.files("refusal_lab").joinpath("data", sub)))


def packaged_object_lists() -> list[str]:
    """Names of the object lists shipped with the package (usable as ``load_objects(name)``)."""
    return sorted(
        p.stem for p in _data_dir("objects").glob("*.json") if p.stem not in _NON_OBJECT_FILES
    )


def _resolve_objects_path(path_or_name: str | Path | None) -> Path:
    if path_or_name is None:
        path_or_name = DEFAULT_OBJECTS
    p = Path(path_or_name)
    if p.is_file():
        return p
    name = str(path_or_name)
    stem = name[:-5] if name.endswith(".json") else name
    if "/" not in name and "\\" not in name and stem not in _NON_OBJECT_FILES:
        packaged = _data_dir("objects") / f"{stem}.json"
        if packaged.is_file():
            return packaged
    raise PromptError(
        f"Object list {name!r} is neither an existing JSON file nor a packaged list; pass a path to "
        f"a JSON file or one of: {', '.join(packaged_object_lists())}."
    )


def validate_template(template: str, where: str = "the template") -> str:
    """Check that an instruction template holds ``{object}`` exactly once; return it unchanged."""
    if not isinstance(template, str):
        raise PromptError(f"{where} must be a string containing {{object}} once, got {template!r}.")
    count = template.count(OBJECT_PLACEHOLDER)
    if count != 1:
        raise PromptError(
            f"{where} {template!r} contains {{object}} {count} times; write it exactly once, "
            f"e.g. 'Tell me how to make a {{object}}.'."
        )
    return template


def _validate_side(values: object, side: str, where: str) -> list[str]:
    if not isinstance(values, (list, tuple)) or not values:
        got = "an empty list" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
        raise PromptError(
            f"{where}: key {side!r} must be a non-empty list of object strings, got {got}."
        )
    out: list[str] = []
    seen: set[str] = set()
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v.strip():
            raise PromptError(
                f"{where}: {side}[{i}] is {v!r}; every object must be a non-empty string."
            )
        v = v.strip()
        if v in seen:
            raise PromptError(
                f"{where}: {side} object {v!r} is listed twice; remove the duplicate."
            )
        seen.add(v)
        out.append(v)
    return out


def validate_objects(objects: ObjectLists, where: str = "object list") -> ObjectLists:
    """Validate (and whitespace-strip) an :class:`ObjectLists` built in code; return a clean copy."""
    harmful = _validate_side(objects.harmful, "harmful", where)
    harmless = _validate_side(objects.harmless, "harmless", where)
    both = sorted(set(harmful) & set(harmless))
    if both:
        raise PromptError(
            f"{where}: {both[0]!r} is listed as both harmful and harmless; keep it on one side only."
        )
    template = objects.template
    if template is not None:
        validate_template(template, f"{where}: template")
    return ObjectLists(harmful, harmless, template, objects.source, objects.path)


def load_objects(path_or_name: str | Path | None = None) -> ObjectLists:
    """Load and validate an object list from a JSON file or a packaged name.

    ``None`` loads the default (``seed_gemma2_replication``); a name such as
    ``"arditi_obeso_2023"`` loads the packaged file; anything else is read as a path.
    Objects are whitespace-stripped; empty objects, duplicates within a side and objects on both
    sides are errors.
    """
    path = _resolve_objects_path(path_or_name)
    where = f"object list {str(path_or_name if path_or_name is not None else DEFAULT_OBJECTS)!r}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PromptError(
            f"{where} ({path}) is not valid JSON ({e.msg} at line {e.lineno}); fix the file."
        ) from None
    except OSError as e:
        raise PromptError(f"{where} ({path}) cannot be read ({e.strerror}); check the path.") from None
    if not isinstance(data, dict):
        raise PromptError(
            f"{where} must be a JSON object with keys 'harmful' and 'harmless', "
            f"got a JSON {type(data).__name__}."
        )
    for key in ("harmful", "harmless"):
        if key not in data:
            raise PromptError(f"{where} has no key {key!r}; add a list of {key} objects.")
    source = data.get("source")
    if source is not None and not isinstance(source, str):
        raise PromptError(f"{where}: 'source' must be a string, got {type(source).__name__}.")
    return validate_objects(
        ObjectLists(
            harmful=data["harmful"],
            harmless=data["harmless"],
            template=data.get("template"),
            source=source,
            path=str(path),
        ),
        where,
    )


def load_templates() -> list[str]:
    """The packaged instruction templates (phrasings used to test robustness), each with ``{object}``."""
    data = json.loads((_data_dir("objects") / "templates.json").read_text(encoding="utf-8"))
    return [validate_template(t, "packaged template") for t in data["templates"]]


@lru_cache(maxsize=None)
def _read_instructions(split: str, kind: str) -> tuple[str, ...]:
    path = _data_dir("instructions") / f"{kind}_{split}.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    return tuple(r["instruction"] for r in rows)


def load_instructions(
    split: str,
    kind: Literal["harmful", "harmless"],
    n: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Instructions from the packaged splits (Arditi et al. 2024's train/val/test).

    ``n=None`` returns the whole split in file order; otherwise a reproducible random sample of
    ``n`` distinct rows (``random.Random(seed)``), so that runs with the same seed see the same
    instructions.
    """
    if split not in SPLITS:
        raise PromptError(f"Unknown instruction split {split!r}; use one of: {', '.join(SPLITS)}.")
    if kind not in KINDS:
        raise PromptError(f"Unknown instruction kind {kind!r}; use 'harmful' or 'harmless'.")
    rows = list(_read_instructions(split, kind))
    if n is None:
        return rows
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PromptError(f"n must be a positive integer or None, got {n!r}.")
    if n > len(rows):
        raise PromptError(
            f"The {kind} {split} split has {len(rows)} instructions but n={n} were asked for; "
            f"pass n <= {len(rows)} or n=None."
        )
    return random.Random(seed).sample(rows, n)
