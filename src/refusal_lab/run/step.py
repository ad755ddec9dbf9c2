"""What a step is: a named function from the run's inputs and the earlier steps' records to its
own record (a JSON-able dict, stored as ``steps/<name>.json``), and the sections of results.json
that it publishes from the records.

Steps never call each other; a step reads what it needs from ``ctx.records`` (earlier steps, by
name) and ``ctx.inputs``. The driver (:mod:`refusal_lab.run.pipeline`) runs them in list order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from refusal_lab.models.hooked import HookedChatModel
from refusal_lab.run.config import RunConfig
from refusal_lab.run.folder import RunFolder
from refusal_lab.run.inputs import RunInputs


@dataclass
class RunContext:
    """Everything a step may read: inputs, finished records, the folder for artifacts, run options."""

    inputs: RunInputs
    folder: RunFolder
    records: dict[str, dict] = field(default_factory=dict)
    progress: bool = True
    executor: object | None = None
    """Computes the patching grids elsewhere (e.g. :class:`refusal_lab.distributed.RayExecutor`)."""
    strict: bool = False
    """Stop after the baseline when the metric does not separate harmful from harmless prompts."""

    @property
    def cfg(self) -> RunConfig:
        return self.inputs.cfg

    @property
    def model(self) -> HookedChatModel:
        return self.inputs.model


def always(cfg: RunConfig) -> bool:
    return True


@dataclass(frozen=True)
class Step:
    """One step of the run."""

    name: str
    compute: Callable[[RunContext], dict]
    """Inputs + earlier records -> this step's record."""
    publish: Callable[[RunContext], dict] | None = None
    """Finished records -> this step's sections of results.json (merged into the results tree)."""
    enabled: Callable[[RunConfig], bool] = always
    """Whether the config asks for this step."""
    stored: bool = True
    """False for a cheap derived step recomputed on every run (never read from the folder)."""
