"""Paired harmful/harmless prompts aligned column by column (:class:`ObjectPrompts`), with the role
of every column and the position specs (``"eoi"``, ``-1``, ``"obj,-1"``) resolved against them.

Activation patching swaps activations between a harmful prompt and its harmless partner *at the
same position*, so both must have the same number of tokens and the same token roles in every
column. :func:`refusal_lab.prompts.build_object_prompts` builds them; this module is the result
and its vocabulary of column labels:

``prefix``   tokens the chat template puts before the user instruction (BOS, system prompt, role tag)
``pre_obj``  instruction tokens before the object (``Tell``, `` me``, ... `` a``)
``obj_part`` earlier tokens of a multi-token object (only in ``align`` mode, per prompt)
``obj``      the last token of the object
``post_obj`` instruction tokens after the object (e.g. ``.``)
``eoi``      end-of-instruction tokens the chat template appends (``<|im_end|>``, ``\\n``,
             ``<|im_start|>``, ``assistant``, ``\\n`` for Qwen)
``last``     the final column (also counted as ``eoi``, or as whatever it is, by ``label_indices``)
``pad``      left padding (``align`` mode, per prompt)
``mixed``    a column whose role differs between prompts (``align`` mode, left of ``obj``)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from refusal_lab.errors import PromptError

PAD_STR = "<pad>"
"""Display token of a left-padding position."""
Side = Literal["harmful", "harmless"]

COLUMN_LABELS = ("pad", "prefix", "pre_obj", "obj_part", "obj", "post_obj", "eoi", "mixed", "last")
"""Labels a column (or a prompt's token) can carry."""
SPECIAL_POSITION_SPECS = ("all", "from_obj")
"""Extra names accepted by :meth:`ObjectPrompts.resolve_positions`: every column / ``obj`` to the end."""


@dataclass(frozen=True)
class Position:
    """One column of the aligned prompts: its index, its role label and a display token."""

    index: int
    label: str
    token: str


@dataclass
class ObjectPrompts:
    """Paired harmful/harmless prompts with identical length and per-column role labels.

    ``harmful_ids[i]`` pairs with ``harmless_ids[i]``. All tensors are ``[n, T]`` (``T = seq_len``),
    left-padded in ``align`` mode (mask 0 on padding); in ``single_token`` mode there is no padding
    and every column has the same role in every prompt. Column ``obj_index`` holds the (last)
    object token of every prompt; all columns after it hold identical tokens in every prompt.
    """

    harmful_ids: torch.Tensor  # [n, T] long
    harmless_ids: torch.Tensor  # [n, T] long
    harmful_mask: torch.Tensor  # [n, T] long, 0 on left padding
    harmless_mask: torch.Tensor  # [n, T] long
    harmful_objects: list[str]
    harmless_objects: list[str]
    dropped: list[dict]  # {"object", "side", "reason"}
    labels: list[str]  # [T] column labels; the final column is "last"
    column_tokens: list[str]  # [T] display token per column; "{obj}" at obj_index
    harmful_labels: list[list[str]]  # [n][T] per-prompt labels (no "last"/"mixed")
    harmless_labels: list[list[str]]
    harmful_tokens: list[list[str]]  # [n][T] decoded tokens, PAD_STR on padding
    harmless_tokens: list[list[str]]
    harmful_texts: list[str]  # chat-formatted strings
    harmless_texts: list[str]
    obj_index: int
    seq_len: int
    mode: str
    template: str
    chat_template_used: bool
    last_label: str = field(default="eoi")  # what the final column is besides "last"

    def __repr__(self) -> str:
        return (
            f"ObjectPrompts(mode={self.mode!r}, n_pairs={self.n_pairs}, seq_len={self.seq_len}, "
            f"obj_index={self.obj_index}, harmful={self.harmful_objects}, harmless={self.harmless_objects}, "
            f"dropped={len(self.dropped)}, template={self.template!r})"
        )

    # -- access helpers ------------------------------------------------------------------------

    @property
    def n_pairs(self) -> int:
        return len(self.harmful_objects)

    def _side(self, side: str) -> str:
        if side not in ("harmful", "harmless"):
            raise PromptError(f"Unknown side {side!r}; use 'harmful' or 'harmless'.")
        return side

    def ids(self, side: Side) -> torch.Tensor:
        """Token ids ``[n, T]`` of one side."""
        return getattr(self, f"{self._side(side)}_ids")

    def mask(self, side: Side) -> torch.Tensor:
        """Attention mask ``[n, T]`` of one side (0 on left padding)."""
        return getattr(self, f"{self._side(side)}_mask")

    def tokens_str(self, side: Side, i: int) -> list[str]:
        """Decoded tokens of prompt ``i`` of ``side`` (length T, ``"<pad>"`` on padding)."""
        return list(getattr(self, f"{self._side(side)}_tokens")[i])

    def prompt_labels(self, side: Side, i: int) -> list[str]:
        """Per-token labels of prompt ``i`` of ``side`` (``pad``/``obj_part`` where they apply)."""
        return list(getattr(self, f"{self._side(side)}_labels")[i])

    @property
    def positions(self) -> list[Position]:
        """Every column as a :class:`Position` (index, label, display token)."""
        return [Position(i, lab, tok) for i, (lab, tok) in enumerate(zip(self.labels, self.column_tokens))]

    # -- position specs ------------------------------------------------------------------------

    def available_labels(self) -> list[str]:
        """Labels that select at least one column, plus ``all`` and ``from_obj``."""
        present = [lab for lab in COLUMN_LABELS if self._label_indices(lab)]
        return present + list(SPECIAL_POSITION_SPECS)

    def _label_indices(self, label: str) -> list[int]:
        T = self.seq_len
        if label == "last":
            return [T - 1]
        if label == "all":
            return list(range(T))
        if label == "from_obj":
            return list(range(self.obj_index, T))
        idx = [i for i, lab in enumerate(self.labels) if lab == label]
        if self.last_label == label:
            idx.append(T - 1)
        return idx

    def label_indices(self, label: str) -> list[int]:
        """Columns carrying ``label`` (``eoi`` includes the last column when it is an eoi token)."""
        if label not in COLUMN_LABELS and label not in SPECIAL_POSITION_SPECS:
            raise PromptError(
                f"Unknown position label {label!r}; use one of: {', '.join(self.available_labels())} "
                "or an integer index."
            )
        return self._label_indices(label)

    def resolve_positions(self, spec: str | int | Sequence[str | int]) -> list[int]:
        """Turn a position spec into sorted, unique column indices.

        Accepts a label (``"eoi"``), an int (negative counts from the end), a comma-separated
        string (``"obj,-1"``) or a list of these.
        """
        T = self.seq_len
        out: set[int] = set()

        def one(item) -> None:
            if isinstance(item, bool):
                raise PromptError(f"Position {item!r} is not a label or an integer index.")
            if isinstance(item, int):
                if not -T <= item < T:
                    raise PromptError(
                        f"Position {item} is out of range for prompts of {T} tokens; use -{T}..{T - 1} "
                        f"or a label ({', '.join(self.available_labels())})."
                    )
                out.add(item % T)
                return
            if isinstance(item, str):
                parts = [p.strip() for p in item.split(",")]
                if len(parts) > 1:
                    for p in parts:
                        one(p)
                    return
                p = parts[0]
                if p.lstrip("-").isdigit():
                    one(int(p))
                    return
                idx = self.label_indices(p)
                if not idx:
                    raise PromptError(
                        f"Position label {p!r} selects no column of these prompts; use one of: "
                        f"{', '.join(self.available_labels())}."
                    )
                out.update(idx)
                return
            if isinstance(item, (list, tuple)):
                if not item:
                    raise PromptError("The position list is empty; give at least one label or index.")
                for x in item:
                    one(x)
                return
            raise PromptError(
                f"Position {item!r} is not a label, an integer or a list; use e.g. 'eoi', -1 or ['obj', -1]."
            )

        one(spec)
        return sorted(out)
