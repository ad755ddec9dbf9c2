"""The run's settings: one declarative schema (pydantic, strict types) with its validation and the
digest that guards a run folder against mixing two configurations.

Every field that changes a number is here; ``device`` and ``max_rows`` (where and in how many
rows a grid is computed) are left out of the digest because they change no value beyond rounding.
Bad input becomes one :class:`~refusal_lab.errors.ConfigError` sentence naming the key, its value
and what is expected.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from refusal_lab.errors import ConfigError
from refusal_lab.patching.engine import GRIDS
from refusal_lab.steering.selection import DirectionPolicy

DIRECTIONS = {
    "sufficiency": ("harmful", "harmless"),  # (source, receiver): harmful activations into harmless prompts
    "necessity": ("harmless", "harmful"),
}
"""Patching directions and the (source side, receiver side) of each."""

Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
Alphas = Annotated[list[Annotated[float, Field(ge=0)]], Field(min_length=1)]
Position = str | int
"""A position label (``post_obj``, ``eoi``, ``last``, ...) or a column index."""

HINTS = {
    "grids": f"a list from {', '.join(GRIDS)}", "directions": "a list from sufficiency, necessity",
    "steering_alphas": "a non-empty list of alphas >= 0", "steering_object_alphas": "a non-empty list of alphas >= 0",
    "max_layer_frac": "a number in (0, 1]", "kl_max": "a positive number",
    "judge": "'substring', 'self' or a judge model (hub id or folder)",
    "dtype": "float32, bfloat16 or float16", "mode": "single_token or align",
    "model": "a string", "device": "a string", "objects": "a string", "template": "a string",
}
"""What a bad value of each key should have been (the error sentence's end)."""
NOT_DIGESTED = ("device", "max_rows")
POLICY = DirectionPolicy()
"""The one direction-choice policy's defaults (shared with ``refusal-lab abliterate --select``)."""


class RunConfig(BaseModel):
    """Everything that determines a run's numbers (its digest guards the run folder)."""

    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True, protected_namespaces=())

    model: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = None
    objects: str | None = None
    template: str | None = None
    mode: Literal["single_token", "align"] = "single_token"
    refusal: Annotated[str, Field(min_length=1)] = "Sorry"
    compliance: Annotated[str, Field(min_length=1)] = "Sure"
    grids: list[Literal[GRIDS]] = Field(default_factory=lambda: list(GRIDS))  # type: ignore[valid-type]
    directions: Annotated[list[Literal["sufficiency", "necessity"]], Field(min_length=1)] = \
        Field(default_factory=lambda: ["sufficiency"])
    heads_position: Position = "post_obj"
    threshold: float = 0.005
    attribution: bool = True
    generate_tokens: NonNegative = 24
    max_rows: Positive = 256
    seed: int = POLICY.seed
    steering: bool = True
    steering_n_train: Positive = POLICY.n_train
    steering_n_val: Positive = POLICY.n_val
    steering_n_test: Positive = 50
    steering_alphas: Alphas = Field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 3.0])
    steering_object_alphas: Alphas = Field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    steering_object_position: Position = "last"
    steering_tokens: NonNegative = 16
    kl_max: Annotated[float, Field(gt=0)] = POLICY.kl_max
    max_layer_frac: Annotated[float, Field(gt=0, le=1)] = POLICY.max_layer_frac
    steering_exhaustive: bool = POLICY.exhaustive
    steering_top_k: Positive = POLICY.top_k
    judge: str = "substring"

    @field_validator("judge")
    @classmethod
    def _judge_named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty judge")
        return v

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "RunConfig":
        """Validated settings from a JSON object; bad input raises one :class:`ConfigError` sentence."""
        for key in data:
            if key not in cls.model_fields:
                raise ConfigError(f"Unknown key '{key}' in {where}; valid keys are {', '.join(cls.model_fields)}.")
        try:
            return cls(**data)
        except ValidationError as e:
            key = str(e.errors()[0]["loc"][0])
            raise ConfigError(f"Invalid value {data[key]!r} for '{key}' in {where}; expected "
                              f"{HINTS.get(key, 'a valid ' + key)}.") from None

    def as_dict(self) -> dict:
        """The settings as plain JSON values (``run_config.json``, ``results.json["config"]``)."""
        return self.model_dump()

    def digest(self) -> str:
        keep = {k: v for k, v in self.as_dict().items() if k not in NOT_DIGESTED}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def model_slug(name: str | None) -> str:
    """The default run folder's name for a model (``runs/<slug>``)."""
    base = (name or "Qwen2.5-Coder-0.5B-Instruct").rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)
