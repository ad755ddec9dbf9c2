"""Chat-formatted, position-aligned prompts for harmful-vs-harmless activation patching.

Activation patching swaps activations between a harmful prompt and its harmless partner *at the
same position*, so both must have the same number of tokens and the same token roles in every
column. This module builds such prompts from an object template ("Tell me how to make a {object}.")
placed inside the model's own chat template, and labels every column:

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

Tokenization policy (BOS): the chat-formatted string is tokenized with
``add_special_tokens=False`` because chat templates that need a BOS write it themselves (Gemma's
starts with ``<bos>``, Llama's with ``<|begin_of_text|>``); letting the tokenizer add another would
give a double BOS. Without a chat template (``chat_template=False``, base models) the raw
instruction is tokenized with ``add_special_tokens=True`` so the tokenizer adds its usual BOS.

The object's tokens are found from character offsets in the formatted string, never by
tokenizing the object alone: byte-level BPEs fold the preceding space into the object token
(``' bomb'``), and neighbouring text can merge with the object.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from refusal_lab.errors import PromptError
from refusal_lab.prompts.data import OBJECT_PLACEHOLDER, ObjectLists, validate_objects, validate_template

DEFAULT_TEMPLATE = "Tell me how to make a {object}."
PAD_STR = "<pad>"
Side = Literal["harmful", "harmless"]
Mode = Literal["single_token", "align"]

COLUMN_LABELS = ("pad", "prefix", "pre_obj", "obj_part", "obj", "post_obj", "eoi", "mixed", "last")
"""Labels a column (or a prompt's token) can carry."""
SPECIAL_POSITION_SPECS = ("all", "from_obj")
"""Extra names accepted by :meth:`ObjectPrompts.resolve_positions`: every column / ``obj`` to the end."""

_SENTINEL = "\u2063REFUSAL_LAB_INSTRUCTION\u2063"


# --------------------------------------------------------------------------------------- chat


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(tokenizer, instruction: str, chat_template: str | None = None) -> str:
    """Format ``instruction`` as a single user turn followed by the assistant generation prompt.

    Uses the model's own template (or ``chat_template`` if given) unchanged, including any default
    system prompt it inserts (Qwen2.5 adds "You are Qwen, created by Alibaba Cloud..."), because
    that is what the model saw in training. Returns the string (``tokenize=False``).
    """
    if not isinstance(instruction, str):
        raise PromptError(f"The instruction must be a string, got {type(instruction).__name__}.")
    if chat_template is None and not _has_chat_template(tokenizer):
        raise PromptError(
            "The tokenizer has no chat template; load the chat/instruct version of the model or "
            "pass chat_template=<jinja template> (or chat_template=False for raw prompts)."
        )
    try:
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}],
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
    except PromptError:
        raise
    except Exception as e:  # jinja errors: undefined variables, raise_exception(...) in templates
        raise PromptError(
            f"The chat template failed to render one user message ({type(e).__name__}: {e}); "
            "pass a chat_template that accepts a single user turn."
        ) from None
    if isinstance(out, list):  # some versions return a batch
        out = out[0]
    if not isinstance(out, str):
        raise PromptError(
            f"apply_chat_template returned {type(out).__name__} instead of a string; "
            "upgrade transformers or pass a plain Jinja chat_template."
        )
    return out


def _format(tokenizer, instruction: str, chat_template: str | None | bool) -> tuple[str, int, int, bool]:
    """Return (text, instruction start, instruction end, add_special_tokens) in the formatted text."""
    if chat_template is False:
        return instruction, 0, len(instruction), True
    text = apply_chat_template(tokenizer, instruction, None if chat_template is True else chat_template)
    # Where does the instruction start? Render a sentinel to learn the template's own prefix.
    probe = apply_chat_template(tokenizer, _SENTINEL, None if chat_template is True else chat_template)
    if probe.count(_SENTINEL) == 1:
        start = probe.index(_SENTINEL)
        if text[start : start + len(instruction)] == instruction and text.startswith(probe[:start]):
            return text, start, start + len(instruction), False
    for candidate in (instruction, instruction.strip()):
        if candidate and text.count(candidate) == 1:
            start = text.index(candidate)
            return text, start, start + len(candidate), False
    raise PromptError(
        f"The chat template changes the instruction text {instruction!r}, so its tokens cannot be "
        "located; use a template without leading/trailing whitespace or pass another chat_template."
    )


# ---------------------------------------------------------------------------------- tokenizing


def _offsets_by_decoding(tokenizer, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Character offsets for slow tokenizers, from cumulative decoding (must round-trip)."""
    full = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if not full.endswith(text):
        raise PromptError(
            "This (slow) tokenizer does not decode back to the prompt text, so token positions cannot "
            "be located; load the fast tokenizer (use_fast=True)."
        )
    shift = len(full) - len(text)  # special tokens the tokenizer added in front (e.g. BOS)
    offsets, prev = [], 0
    for k in range(len(ids)):
        end = len(
            tokenizer.decode(ids[: k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        ) - shift
        end = max(0, min(end, len(text)))
        if end < prev:
            raise PromptError(
                "This (slow) tokenizer decodes prefixes inconsistently, so token positions cannot be "
                "located; load the fast tokenizer (use_fast=True)."
            )
        offsets.append((prev, end))
        prev = end
    return offsets


def _tokenize(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return ids, _offsets_by_decoding(tokenizer, ids, text)


def _token_strs(tokenizer, ids: Sequence[int]) -> list[str]:
    return [
        tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for i in ids
    ]


def _display_tokens(tokenizer, ids: Sequence[int], offsets: Sequence[tuple[int, int]], text: str) -> list[str]:
    """Decoded tokens, restoring a leading space that single-token decoding drops (SentencePiece)."""
    out = []
    for dec, (s, e) in zip(_token_strs(tokenizer, ids), offsets):
        seg = text[s:e]
        out.append(seg if seg and seg != dec and seg.strip() == dec.strip() and seg.endswith(dec) else dec)
    return out


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


@dataclass
class _Encoded:
    """One tokenized object prompt before alignment (internal)."""

    object: str
    side: str
    text: str
    ids: list[int]
    tokens: list[str]
    labels: list[str]  # prefix / pre_obj / obj_part / obj / post_obj / eoi
    first_obj: int = -1
    n_obj: int = 0
    problem: str | None = None  # set when the object cannot be placed

    @property
    def prefix(self) -> tuple[int, ...]:
        return tuple(self.ids[: self.first_obj])

    @property
    def suffix(self) -> tuple[int, ...]:
        return tuple(self.ids[self.first_obj + self.n_obj :])

    @property
    def obj_tokens(self) -> list[str]:
        return self.tokens[self.first_obj : self.first_obj + self.n_obj]


def _encode_object_prompt(tokenizer, obj: str, side: str, template: str, chat_template) -> _Encoded:
    before, after = template.split(OBJECT_PLACEHOLDER)
    instruction = before + obj + after
    text, a, b, add_special = _format(tokenizer, instruction, chat_template)
    if b - a != len(instruction):  # the template stripped surrounding whitespace
        a -= len(instruction) - len(instruction.lstrip())
    os_, oe = a + len(before), a + len(before) + len(obj)
    ids, offsets = _tokenize(tokenizer, text, add_special)
    tokens = _display_tokens(tokenizer, ids, offsets, text)

    # Whitespace just before the object that a tokenizer splits off as its own token (' ' + 'ted'
    # + 'dy') belongs to the object, not to the fixed text before it.
    ws_start = os_ - (len(before) - len(before.rstrip()))
    labels: list[str] = []
    obj_idx: list[int] = []
    cursor = 0
    for k, (s, e) in enumerate(offsets):
        if s == e:  # zero-width (e.g. a BOS/EOS the tokenizer added): label by where it sits
            labels.append(
                "prefix" if cursor <= a else "pre_obj" if cursor <= os_ else "post_obj" if cursor < b else "eoi"
            )
            continue
        cursor = max(cursor, e)
        if (e > os_ and s < oe) or (s >= ws_start and e <= os_ and s >= a):
            obj_idx.append(k)
            labels.append("obj_part")
        elif s < a:
            labels.append("prefix")
        elif e <= os_:
            labels.append("pre_obj")
        elif s < b:
            labels.append("post_obj")
        else:
            labels.append("eoi")
    enc = _Encoded(obj, side, text, ids, tokens, labels)
    if not obj_idx:
        enc.problem = f"{obj!r} could not be located in the tokenized prompt (no token covers it)"
        return enc
    first, last = obj_idx[0], obj_idx[-1]
    labels[last] = "obj"
    enc.first_obj, enc.n_obj = first, last - first + 1
    s_first, e_last = offsets[first][0], offsets[last][1]
    if text[s_first:os_].strip() or e_last > oe:
        merged = "".join(tokens[first : last + 1])
        enc.problem = (
            f"{obj!r} merges with the template text around it into {merged!r} under this tokenizer, "
            "so its tokens do not line up with the other prompts"
        )
    return enc


def _fmt_tokens(tokens: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(t) for t in tokens[:limit])
    return f"({shown}{', ...' if len(tokens) > limit else ''})"


# ---------------------------------------------------------------------------------- dataclasses


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


# ------------------------------------------------------------------------------------ building


def _drop(dropped: list[dict], enc: _Encoded, reason: str) -> None:
    dropped.append({"object": enc.object, "side": enc.side, "reason": reason})


def _filter_common(
    encs: list[_Encoded], key, what: str, dropped: list[dict], tokenizer
) -> list[_Encoded]:
    """Keep prompts whose ``key`` (prefix or suffix ids) equals the most common one; drop the rest."""
    if not encs:
        return encs
    ref = Counter(key(e) for e in encs).most_common(1)[0][0]
    kept = []
    for e in encs:
        k = key(e)
        if k == ref:
            kept.append(e)
            continue
        mine, want = _token_strs(tokenizer, k), _token_strs(tokenizer, ref)
        if what == "before":  # show the differing tail of the prefix
            n = 0
            while n < min(len(k), len(ref)) and k[n] == ref[n]:
                n += 1
            mine, want = mine[n:], want[n:]
        _drop(
            dropped,
            e,
            f"the text {what} {e.object!r} tokenizes as {_fmt_tokens(mine)} instead of "
            f"{_fmt_tokens(want)} as in the other prompts",
        )
    return kept


def build_object_prompts(
    tokenizer,
    objects: ObjectLists,
    template: str | None = None,
    mode: Mode = "single_token",
    chat_template: str | None | bool = None,
) -> ObjectPrompts:
    """Build paired, position-aligned harmful/harmless prompts for activation patching.

    ``template`` defaults to the object list's own template, else ``"Tell me how to make a
    {object}."``. ``chat_template``: ``None`` uses the tokenizer's, a string overrides it, ``False``
    skips chat formatting (base models).

    Modes:
      * ``single_token`` keeps objects that are exactly one token *in context*; every column then
        has the same role in every prompt and no padding is needed.
      * ``align`` keeps multi-token objects and left-pads so that the last object token of every
        prompt sits in column ``obj_index``.
    In both modes a prompt whose text before or after the object tokenizes differently from the
    others is dropped, and ``harmful[i]`` stays paired with ``harmless[i]`` (the longer side is
    truncated; truncated objects are recorded with reason "no partner"). Every dropped object is
    listed in ``ObjectPrompts.dropped`` with its reason; an error is raised only if a side ends up
    empty.
    """
    if mode not in ("single_token", "align"):
        raise PromptError(f"Unknown prompt mode {mode!r}; use 'single_token' or 'align'.")
    objects = validate_objects(objects)
    if template is None:
        template = objects.template or DEFAULT_TEMPLATE
    validate_template(template)
    if chat_template is None and not _has_chat_template(tokenizer):
        apply_chat_template(tokenizer, "", None)  # raises the standard "no chat template" error

    dropped: list[dict] = []
    encs: dict[str, list[_Encoded]] = {"harmful": [], "harmless": []}
    for side in ("harmful", "harmless"):
        for obj in getattr(objects, side):
            enc = _encode_object_prompt(tokenizer, obj, side, template, chat_template)
            if enc.problem:
                _drop(dropped, enc, enc.problem)
            elif mode == "single_token" and enc.n_obj != 1:
                _drop(
                    dropped,
                    enc,
                    f"{obj!r} is {enc.n_obj} tokens {_fmt_tokens(enc.obj_tokens)} under this tokenizer",
                )
            else:
                encs[side].append(enc)

    # The text around the object is fixed, so its tokens must match across prompts.
    pool = encs["harmful"] + encs["harmless"]
    pool = _filter_common(pool, lambda e: e.prefix, "before", dropped, tokenizer)
    pool = _filter_common(pool, lambda e: e.suffix, "after", dropped, tokenizer)
    kept = {s: [e for e in pool if e.side == s] for s in ("harmful", "harmless")}

    for side in ("harmful", "harmless"):
        if not kept[side]:
            reasons = [d["reason"] for d in dropped if d["side"] == side]
            hint = "use mode='align' or other objects" if mode == "single_token" else "use other objects"
            raise PromptError(
                f"No {side} object is usable in mode {mode!r} with this tokenizer "
                f"(e.g. {reasons[0] if reasons else 'none given'}); {hint}."
            )

    n = min(len(kept["harmful"]), len(kept["harmless"]))
    for side in ("harmful", "harmless"):
        other = "harmless" if side == "harmful" else "harmful"
        for e in kept[side][n:]:
            _drop(dropped, e, f"no partner: only {n} {other} objects are usable, and pairs are matched by index")
        kept[side] = kept[side][:n]

    # Left-pad so the last object token sits in the same column.
    all_kept = kept["harmful"] + kept["harmless"]
    obj_end = max(e.first_obj + e.n_obj for e in all_kept)
    obj_index = obj_end - 1
    T = obj_end + len(all_kept[0].suffix)
    pad_id = _pad_id(tokenizer)

    def padded(side: str):
        ids, mask, labs, toks = [], [], [], []
        for e in kept[side]:
            p = obj_end - (e.first_obj + e.n_obj)
            ids.append([pad_id] * p + e.ids)
            mask.append([0] * p + [1] * len(e.ids))
            labs.append(["pad"] * p + e.labels)
            toks.append([PAD_STR] * p + e.tokens)
        return (
            torch.tensor(ids, dtype=torch.long),
            torch.tensor(mask, dtype=torch.long),
            labs,
            toks,
        )

    h_ids, h_mask, h_labs, h_toks = padded("harmful")
    s_ids, s_mask, s_labs, s_toks = padded("harmless")
    all_labs, all_toks = h_labs + s_labs, h_toks + s_toks

    labels: list[str] = []
    column_tokens: list[str] = []
    for c in range(T):
        col = {labs[c] for labs in all_labs if labs[c] != "pad"}
        labels.append(col.pop() if len(col) == 1 else ("pad" if not col else "mixed"))
        if c == obj_index:
            column_tokens.append("{obj}")
        elif c > obj_index:
            column_tokens.append(s_toks[0][c])
        else:
            ctoks = {toks[c] for toks, labs in zip(all_toks, all_labs) if labs[c] != "pad"}
            if len(ctoks) == 1:
                column_tokens.append(ctoks.pop())
            else:
                column_tokens.append("{obj_part}" if labels[c] == "obj_part" else "{mixed}")
    last_label = labels[-1]
    labels[-1] = "last"

    return ObjectPrompts(
        harmful_ids=h_ids,
        harmless_ids=s_ids,
        harmful_mask=h_mask,
        harmless_mask=s_mask,
        harmful_objects=[e.object for e in kept["harmful"]],
        harmless_objects=[e.object for e in kept["harmless"]],
        dropped=dropped,
        labels=labels,
        column_tokens=column_tokens,
        harmful_labels=h_labs,
        harmless_labels=s_labs,
        harmful_tokens=h_toks,
        harmless_tokens=s_toks,
        harmful_texts=[e.text for e in kept["harmful"]],
        harmless_texts=[e.text for e in kept["harmless"]],
        obj_index=obj_index,
        seq_len=T,
        mode=mode,
        template=template,
        chat_template_used=chat_template is not False,
        last_label=last_label,
    )


def build_instruction_prompts(
    tokenizer,
    instructions: Sequence[str],
    chat_template: str | None | bool = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-format and left-pad a list of instructions: returns ``(ids [n, T], mask [n, T])``.

    Left padding aligns prompts from the right, so the chat template's end-of-instruction tokens
    occupy the same last columns in every row (position ``-1`` is the last eoi token for all).
    Same BOS policy as :func:`build_object_prompts`.
    """
    if isinstance(instructions, str) or not len(instructions):
        raise PromptError("Give a non-empty list of instruction strings (not a single string).")
    rows = []
    for i, instr in enumerate(instructions):
        if not isinstance(instr, str) or not instr.strip():
            raise PromptError(f"Instruction {i} is {instr!r}; every instruction must be a non-empty string.")
        if chat_template is False:
            text, add_special = instr, True
        else:
            text, add_special = apply_chat_template(tokenizer, instr, chat_template), False
        rows.append(list(tokenizer(text, add_special_tokens=add_special)["input_ids"]))
    T = max(len(r) for r in rows)
    pad_id = _pad_id(tokenizer)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def eoi_tokens(
    tokenizer, chat_template: str | None = None, instruction: str = "Tell me how to make a cake."
) -> list[str]:
    """The tokens the chat template appends after a user instruction (e.g. Qwen's 5 eoi tokens).

    Useful for choosing positions ``-len(eoi)..-1`` on :func:`build_instruction_prompts` output.
    """
    text, _, b, add_special = _format(tokenizer, instruction, chat_template)
    ids, offsets = _tokenize(tokenizer, text, add_special)
    return [t for t, (s, _) in zip(_display_tokens(tokenizer, ids, offsets, text), offsets) if s >= b]
