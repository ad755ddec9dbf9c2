"""Prompt data and chat-formatted, position-aligned prompt construction.

- :mod:`~refusal_lab.prompts.data`: the packaged object lists, templates and instruction splits,
  validated on load;
- :mod:`~refusal_lab.prompts.chat`: one user turn through the chat template, and where the
  instruction sits in the result;
- :mod:`~refusal_lab.prompts.tokens`: tokenizing with character offsets, display strings, padding;
- :mod:`~refusal_lab.prompts.encoding`: one object prompt with every token labelled by role;
- :mod:`~refusal_lab.prompts.aligned`: :class:`ObjectPrompts`, the paired prompts aligned column
  by column, and the position specs resolved against them;
- :mod:`~refusal_lab.prompts.builder`: :func:`build_object_prompts` and
  :func:`build_instruction_prompts`, the tensors the rest of the library runs on.
"""

from refusal_lab.prompts.aligned import COLUMN_LABELS, ObjectPrompts, Position
from refusal_lab.prompts.builder import (
    DEFAULT_TEMPLATE,
    build_instruction_prompts,
    build_object_prompts,
    eoi_tokens,
)
from refusal_lab.prompts.chat import apply_chat_template
from refusal_lab.prompts.data import (
    DEFAULT_OBJECTS,
    ObjectLists,
    load_instructions,
    load_objects,
    load_templates,
    packaged_object_lists,
    validate_objects,
    validate_template,
)

__all__ = [
    "COLUMN_LABELS",
    "DEFAULT_OBJECTS",
    "DEFAULT_TEMPLATE",
    "ObjectLists",
    "ObjectPrompts",
    "Position",
    "apply_chat_template",
    "build_instruction_prompts",
    "build_object_prompts",
    "eoi_tokens",
    "load_instructions",
    "load_objects",
    "load_templates",
    "packaged_object_lists",
    "validate_objects",
    "validate_template",
]
