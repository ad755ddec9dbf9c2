"""Build the prompt tensors the library runs on: paired object prompts for patching, and batches of
chat-formatted instructions for steering and evaluation.

:func:`build_object_prompts` turns an object list and a template ("Tell me how to make a
{object}.") into :class:`~refusal_lab.prompts.aligned.ObjectPrompts`: every prompt is encoded
(:mod:`refusal_lab.prompts.encoding`), prompts whose fixed text tokenizes differently from the
others are dropped with a reason, the two sides are paired by index, and left padding puts the
last object token of every prompt in the same column. :func:`build_instruction_prompts` only
formats and left-pads, so the end-of-instruction tokens share the last columns.

Tokenization policy (BOS): the chat-formatted string is tokenized with
``add_special_tokens=False`` because chat templates that need a BOS write it themselves (Gemma's
starts with ``<bos>``, Llama's with ``<|begin_of_text|>``); letting the tokenizer add another would
give a double BOS. Without a chat template (``chat_template=False``, base models) the raw
instruction is tokenized with ``add_special_tokens=True`` so the tokenizer adds its usual BOS.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal, Sequence

import torch

from refusal_lab.errors import PromptError
from refusal_lab.prompts.aligned import PAD_STR, ObjectPrompts
from refusal_lab.prompts.chat import apply_chat_template, format_instruction, has_chat_template
from refusal_lab.prompts.data import ObjectLists, validate_objects, validate_template
from refusal_lab.prompts.encoding import EncodedPrompt, encode_object_prompt
from refusal_lab.prompts.tokens import (
    display_tokens,
    format_token_list,
    pad_token_id,
    token_strings,
    tokenize_with_offsets,
)

DEFAULT_TEMPLATE = "Tell me how to make a {object}."
Mode = Literal["single_token", "align"]


# ------------------------------------------------------------------------------ object prompts


def _drop(dropped: list[dict], enc: EncodedPrompt, reason: str) -> None:
    dropped.append({"object": enc.object, "side": enc.side, "reason": reason})


def _filter_common(
    encs: list[EncodedPrompt], key, what: str, dropped: list[dict], tokenizer
) -> list[EncodedPrompt]:
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
        mine, want = token_strings(tokenizer, k), token_strings(tokenizer, ref)
        if what == "before":  # show the differing tail of the prefix
            n = 0
            while n < min(len(k), len(ref)) and k[n] == ref[n]:
                n += 1
            mine, want = mine[n:], want[n:]
        _drop(
            dropped,
            e,
            f"the text {what} {e.object!r} tokenizes as {format_token_list(mine)} instead of "
            f"{format_token_list(want)} as in the other prompts",
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
    if chat_template is None and not has_chat_template(tokenizer):
        apply_chat_template(tokenizer, "", None)  # raises the standard "no chat template" error

    dropped: list[dict] = []
    encs: dict[str, list[EncodedPrompt]] = {"harmful": [], "harmless": []}
    for side in ("harmful", "harmless"):
        for obj in getattr(objects, side):
            enc = encode_object_prompt(tokenizer, obj, side, template, chat_template)
            if enc.problem:
                _drop(dropped, enc, enc.problem)
            elif mode == "single_token" and enc.n_obj != 1:
                _drop(
                    dropped,
                    enc,
                    f"{obj!r} is {enc.n_obj} tokens {format_token_list(enc.obj_tokens)} under this tokenizer",
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
    pad_id = pad_token_id(tokenizer)

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


# ------------------------------------------------------------------------- instruction prompts


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
    pad_id = pad_token_id(tokenizer)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def eoi_tokens(
    tokenizer, chat_template: str | None = None, instruction: str = "Tell me how to make a cake."
) -> list[str]:
    """The tokens the chat template appends after a user instruction (e.g. Qwen's 5 eoi tokens).

    Useful for choosing positions ``-len(eoi)..-1`` on :func:`build_instruction_prompts` output.
    """
    text, _, b, add_special = format_instruction(tokenizer, instruction, chat_template)
    ids, offsets = tokenize_with_offsets(tokenizer, text, add_special)
    return [t for t, (s, _) in zip(display_tokens(tokenizer, ids, offsets, text), offsets) if s >= b]
