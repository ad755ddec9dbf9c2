"""Chat formatting of one user instruction, and where the instruction sits in the formatted text.

Every prompt the library builds is a single user turn followed by the assistant generation prompt,
rendered by the model's own chat template (or one the caller gives). The builders need more than
the string: to label tokens by role they must know the character span of the instruction inside
it, which :func:`format_instruction` finds by rendering a sentinel instruction first (so the
template's own prefix is known) instead of searching for the text, which could occur twice.
"""

from __future__ import annotations

from typing import NamedTuple

from refusal_lab.errors import PromptError

_SENTINEL = "\u2063REFUSAL_LAB_INSTRUCTION\u2063"


def has_chat_template(tokenizer) -> bool:
    """True when ``tokenizer`` carries a (non-empty) chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(tokenizer, instruction: str, chat_template: str | None = None) -> str:
    """Format ``instruction`` as a single user turn followed by the assistant generation prompt.

    Uses the model's own template (or ``chat_template`` if given) unchanged, including any default
    system prompt it inserts (Qwen2.5 adds "You are Qwen, created by Alibaba Cloud..."), because
    that is what the model saw in training. Returns the string (``tokenize=False``).
    """
    if not isinstance(instruction, str):
        raise PromptError(f"The instruction must be a string, got {type(instruction).__name__}.")
    if chat_template is None and not has_chat_template(tokenizer):
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


class FormattedInstruction(NamedTuple):
    """A chat-formatted instruction: the text, the instruction's span in it, the BOS policy."""

    text: str
    start: int
    """Character offset of the instruction's first character in :attr:`text`."""
    end: int
    """Character offset just past the instruction (``end - start`` < its length if the template strips it)."""
    add_special_tokens: bool
    """What to pass to the tokenizer: True only without a chat template (see ``prompts.builder``)."""


def format_instruction(tokenizer, instruction: str, chat_template: str | None | bool) -> FormattedInstruction:
    """Chat-format ``instruction`` and locate it in the result.

    ``chat_template``: ``None`` or ``True`` uses the tokenizer's template, a string overrides it,
    ``False`` returns the raw instruction (base models; the tokenizer then adds its usual BOS).
    """
    if chat_template is False:
        return FormattedInstruction(instruction, 0, len(instruction), True)
    template = None if chat_template is True else chat_template
    text = apply_chat_template(tokenizer, instruction, template)
    # Where does the instruction start? Render a sentinel to learn the template's own prefix.
    probe = apply_chat_template(tokenizer, _SENTINEL, template)
    if probe.count(_SENTINEL) == 1:
        start = probe.index(_SENTINEL)
        if text[start : start + len(instruction)] == instruction and text.startswith(probe[:start]):
            return FormattedInstruction(text, start, start + len(instruction), False)
    for candidate in (instruction, instruction.strip()):
        if candidate and text.count(candidate) == 1:
            start = text.index(candidate)
            return FormattedInstruction(text, start, start + len(candidate), False)
    raise PromptError(
        f"The chat template changes the instruction text {instruction!r}, so its tokens cannot be "
        "located; use a template without leading/trailing whitespace or pass another chat_template."
    )
