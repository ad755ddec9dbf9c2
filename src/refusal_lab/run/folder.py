"""The run folder, the store of a run's steps: a config guard (digest), one JSON record per
finished step (written atomically, reused when the run is started again), within-grid partial
checkpoints, and the artifacts beside them (tensors, vectors, tables, figures, report).

A run killed at any point resumes from its finished steps; a folder holding another config is
refused unless ``force``, which then clears the old run's every artifact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from refusal_lab.artifacts import read_json, write_json
from refusal_lab.errors import ConfigError, RefusalLabError
from refusal_lab.run.config import RunConfig
from refusal_lab.run.profile import StepCost

ARTIFACT_FOLDERS = ("steps", "tensors", "tables", "figures", "vectors")
SECONDS = "_seconds"
"""Key under which a step record keeps how long it took (private to the store: not published)."""
PROFILE = "_profile"
"""Key under which a step record keeps its cost (:class:`refusal_lab.run.profile.StepCost`)."""


class RunFolder:
    """A run folder: config guard, finished-step records, artifacts."""

    def __init__(self, root: Path, config: RunConfig, force: bool = False):
        self.root = Path(root)
        self.config = config
        self.force = force
        self.root.mkdir(parents=True, exist_ok=True)
        guard = self.root / "run_config.json"
        if guard.exists():
            old = read_json(guard)
            if old.get("digest") != config.digest():
                if not force:
                    raise ConfigError(
                        f"{self.root} holds a run of another model or config (model {old.get('config', {}).get('model')!r}); "
                        "choose another --out folder or pass --force to overwrite it."
                    )
                # Overwriting another run: drop its steps and artifacts (not only the steps), so no
                # table, tensor, vector or figure of the old config survives next to the new run's.
                for sub in ARTIFACT_FOLDERS:
                    for p in (self.root / sub).glob("*"):
                        if p.is_file():
                            p.unlink()
                for name in ("results.json", "report.html"):
                    (self.root / name).unlink(missing_ok=True)
        if force:  # recompute everything: no within-grid checkpoint is reused either
            for p in (self.root / "partial").glob("*"):
                if p.is_file():
                    p.unlink()
        write_json(guard, {"digest": config.digest(), "config": config.as_dict()})

    def step_path(self, step: str) -> Path:
        return self.root / "steps" / f"{step}.json"

    def partial_path(self, step: str) -> Path:
        """The within-step checkpoint of a long step (a patching grid), removed when the step finishes."""
        return self.root / "partial" / f"{step}.safetensors"

    def done(self, step: str) -> dict | None:
        """The record of a finished step, or None (not finished, or ``force``)."""
        p = self.step_path(step)
        return None if self.force or not p.exists() else read_json(p)

    def run_step(self, step: str, compute: Callable[[], dict]) -> dict:
        """The step's record: the stored one when it finished before, else computed, timed and stored."""
        cached = self.done(step)
        if cached is not None:
            return cached
        with StepCost() as cost:
            data = compute()
        data = dict(data, **{SECONDS: cost.wall, PROFILE: cost.record()})
        write_json(self.step_path(step), data)
        self.partial_path(step).unlink(missing_ok=True)
        return data

    def save_vector(self, name: str, vector: torch.Tensor, meta: dict) -> None:
        from refusal_lab.steering.vectors import save_vector

        save_vector(self.root / "vectors" / f"{name}.safetensors", vector, meta)

    def has_vector(self, name: str) -> bool:
        return (self.root / "vectors" / f"{name}.safetensors").is_file()

    def load_vector(self, name: str) -> torch.Tensor:
        from refusal_lab.steering.vectors import load_vector

        path = self.root / "vectors" / f"{name}.safetensors"
        if not path.is_file():
            raise RefusalLabError(f"{path} is missing although its step finished; rerun with --force.")
        return load_vector(path)[0]


def seconds(record: dict) -> float:
    """How long a stored step took."""
    return record.get(SECONDS, 0.0)


def profile(record: dict) -> dict | None:
    """A stored step's cost (wall, CPU, memory), None for records written before it was kept."""
    return record.get(PROFILE)


def public(record: dict) -> dict:
    """A step record without the store's private keys (what results.json may publish)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}
