"""A tiny random chat model saved to a folder, loadable by ``refusal_lab.load_model(str(folder))``.

The tokenizer is a small byte-level BPE (like Qwen's) whose merges turn every word it knows into a
single token, so it behaves like a word-level tokenizer on the prompts the tests use, with a
Qwen-like ChatML chat template. (A plain ``WordLevel`` model cannot be used: for ``model_type``
``qwen2`` transformers always rebuilds the tokenizer as ``Qwen2Tokenizer`` from the saved vocabulary
and merges, which would drop every word.) Its vocabulary holds the chat special tokens, the role
names, "Sorry", "Sure", "I", the words of "Tell me how to make a {object}." and every object of the
packaged ``seed_gemma2_replication`` list as single tokens, so the ``single_token`` mode keeps all
7 + 7 objects. Building and saving takes well under a second.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen-like ChatML (without Qwen's default system prompt)."""

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
START_WORDS = ["user", "assistant", "system", "Tell", "Sorry", "Sure", "I", "As", "Unfortunately", "Here"]
"""Words known at the start of a text (no leading space)."""
WORDS = ["Tell", "me", "how", "to", "make", "a", "an", "the", "Sorry", "Sure", "I", "can", "not", "help",
         "with", "that", "is", "recipe", "buddy", "please"]
"""Words known after a space (``Ġword`` tokens), besides the packaged objects."""


def _byte_symbols() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


def _seed_objects() -> list[str]:
    from refusal_lab.prompts import load_objects

    lists = load_objects("seed_gemma2_replication")
    return list(lists.harmful) + list(lists.harmless)


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """256 byte symbols, then one token per word prefix; merges build each word left to right.

    Merges of space-prefixed words come first so that ``Ġmake`` is never split by a merge from
    ``make``; the helper checks every word encodes to one token anyway.
    """
    vocab = list(_byte_symbols())
    merges: list[tuple[str, str]] = []
    seen = set(vocab)
    words = ["\u0120" + w for w in dict.fromkeys(WORDS + _seed_objects())] + list(dict.fromkeys(START_WORDS))
    for w in words:
        for k in range(2, len(w) + 1):
            piece = w[:k]
            if piece not in seen:
                seen.add(piece)
                vocab.append(piece)
                merges.append((w[: k - 1], w[k - 1]))
    return tuple(vocab), tuple(merges)


def tiny_chat_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """The tokenizer (pad ``<|endoftext|>``, eos ``<|im_end|>``, no BOS), checked word by word."""
    vocab, merges = _vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    assert tok.get_vocab_size() == len(vocab) + len(SPECIALS)
    kwargs = {"chat_template": chat_template} if chat_template else {}
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, **kwargs)
    check_single_tokens(out)
    return out


def check_single_tokens(tok) -> None:
    """Every known word (and ' word') is exactly one token under ``tok``."""
    for text in START_WORDS + [" " + w for w in WORDS + _seed_objects()]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (text, tok.convert_ids_to_tokens(ids))


def save_tokenizer(folder: Path, chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    tok = tiny_chat_tokenizer(chat_template)
    tok.save_pretrained(folder)
    return tok


def make_tiny_chat_model(tmp_path: Path, model_type: str = "qwen2", *, chat_template: str | None = CHAT_TEMPLATE,
                         seed: int = 0, name: str | None = None) -> Path:
    """Save a tiny random ``model_type`` model (3 layers, 4 heads, d_model 64) with the word-level
    chat tokenizer into ``tmp_path/<name>`` (safetensors) and return the folder.

    ``chat_template=None`` saves a tokenizer without a chat template (a "base model").
    """
    from tests.tiny_models import tiny_model

    folder = Path(tmp_path) / (name or f"tiny-{model_type}-chat")
    tok = save_tokenizer(folder, chat_template)
    n_vocab = len(tok)
    model = tiny_model(model_type, seed=seed, vocab_size=n_vocab)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = None
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = None
    assert model.get_input_embeddings().weight.shape[0] == n_vocab
    _save_quietly(model, folder)
    return folder


def _save_quietly(model, folder: Path) -> None:
    """``save_pretrained`` (safetensors) without the "Writing model shards" bar on stderr."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def make_tiny_gpt2_chat_model(tmp_path: Path, name: str = "tiny-gpt2-chat") -> Path:
    """A tiny GPT-2 (an architecture refusal_lab has no adapter for) with the chat tokenizer."""
    import torch
    import transformers

    folder = Path(tmp_path) / name
    tok = save_tokenizer(folder)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=len(tok),
                                  eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    _save_quietly(transformers.GPT2LMHeadModel(cfg), folder)
    return folder


SMALL_STEERING = {
    "steering_n_train": 6, "steering_n_val": 4, "steering_n_test": 4, "steering_alphas": [0.0, 2.0],
    "steering_object_alphas": [0.0, 8.0], "steering_tokens": 3,
}
"""Steering settings small enough for a tiny-model ``refusal-lab run`` in a test (a few seconds)."""


def small_steering_config(folder: Path, **extra) -> Path:
    """Write a ``--config`` JSON file with :data:`SMALL_STEERING` (plus ``extra``) into ``folder``."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "small_steering.json"
    path.write_text(json.dumps({**SMALL_STEERING, **extra}))
    return path
