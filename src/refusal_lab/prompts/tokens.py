"""Tokenizing chat-formatted text with character offsets, and the strings shown for tokens.

The prompt builders label every token by the characters it covers, so they need offsets for fast
tokenizers (``return_offsets_mapping``) and slow ones alike; for slow tokenizers the offsets come
from cumulative decoding, which must round-trip or the prompt is refused. Display strings are the
decoded tokens with a leading space restored where single-token decoding drops it (SentencePiece),
so that ``inspect`` and the report show ``' bomb'`` rather than ``'bomb'``.
"""

from __future__ import annotations

from typing import Sequence

from refusal_lab.errors import PromptError

Offsets = list[tuple[int, int]]
"""``(start, end)`` character offsets of each token in the tokenized text."""


def offsets_by_decoding(tokenizer, ids: list[int], text: str) -> Offsets:
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


def tokenize_with_offsets(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], Offsets]:
    """Token ids of ``text`` and each token's character offsets (fast or slow tokenizer)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return ids, offsets_by_decoding(tokenizer, ids, text)


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each id decoded on its own (special tokens kept, no clean-up)."""
    return [
        tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for i in ids
    ]


def display_tokens(tokenizer, ids: Sequence[int], offsets: Sequence[tuple[int, int]], text: str) -> list[str]:
    """Decoded tokens, restoring a leading space that single-token decoding drops (SentencePiece)."""
    out = []
    for dec, (s, e) in zip(token_strings(tokenizer, ids), offsets):
        seg = text[s:e]
        out.append(seg if seg and seg != dec and seg.strip() == dec.strip() and seg.endswith(dec) else dec)
    return out


def pad_token_id(tokenizer) -> int:
    """The id used for left padding: the pad token, else the (first) eos token, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def format_token_list(tokens: Sequence[str], limit: int = 8) -> str:
    """``('Tell', ' me', ...)``: up to ``limit`` tokens for an error message."""
    shown = ", ".join(repr(t) for t in tokens[:limit])
    return f"({shown}{', ...' if len(tokens) > limit else ''})"
