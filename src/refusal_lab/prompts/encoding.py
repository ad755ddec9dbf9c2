"""One object prompt, tokenized and labelled: which tokens are the object, which the fixed text.

The object's tokens are found from character offsets in the chat-formatted string, never by
tokenizing the object alone: byte-level BPEs fold the preceding space into the object token
(``' bomb'``), and neighbouring text can merge with the object. A prompt whose object cannot be
placed cleanly is not an error here: :attr:`EncodedPrompt.problem` says why, and the builder drops
it with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from refusal_lab.prompts.chat import format_instruction
from refusal_lab.prompts.data import OBJECT_PLACEHOLDER
from refusal_lab.prompts.tokens import display_tokens, tokenize_with_offsets


@dataclass
class EncodedPrompt:
    """One tokenized object prompt before alignment with the others."""

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
        """Ids before the object (chat prefix and instruction text)."""
        return tuple(self.ids[: self.first_obj])

    @property
    def suffix(self) -> tuple[int, ...]:
        """Ids after the object (instruction text and end-of-instruction tokens)."""
        return tuple(self.ids[self.first_obj + self.n_obj :])

    @property
    def obj_tokens(self) -> list[str]:
        return self.tokens[self.first_obj : self.first_obj + self.n_obj]


def encode_object_prompt(tokenizer, obj: str, side: str, template: str, chat_template) -> EncodedPrompt:
    """Format ``template`` with ``obj``, tokenize it and label every token by its role."""
    before, after = template.split(OBJECT_PLACEHOLDER)
    instruction = before + obj + after
    text, a, b, add_special = format_instruction(tokenizer, instruction, chat_template)
    if b - a != len(instruction):  # the template stripped surrounding whitespace
        a -= len(instruction) - len(instruction.lstrip())
    os_, oe = a + len(before), a + len(before) + len(obj)
    ids, offsets = tokenize_with_offsets(tokenizer, text, add_special)
    tokens = display_tokens(tokenizer, ids, offsets, text)

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
    enc = EncodedPrompt(obj, side, text, ids, tokens, labels)
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
