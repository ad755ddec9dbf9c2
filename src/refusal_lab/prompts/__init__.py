"""Prompt data and chat-formatted, position-aligned prompt construction."""

from refusal_lab.prompts.builder import (
    COLUMN_LABELS,
    DEFAULT_TEMPLATE,
    ObjectPrompts,
    Position,
    apply_chat_template,
    build_instruction_prompts,
    build_object_prompts,
    eoi_tokens,
)
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
