"""The pinned reference run: a full ``refusal-lab run`` on a tiny random chat model whose
``results.json`` was produced by the code before the pipeline redesign (issue 11) and committed
under ``tests/reference/``. ``test_reference_results.py`` holds today's code to it.

Regenerate (only when a change of numbers is intended, and say so in the commit):
``python -m tests.reference_run``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers_tiny_chat import make_tiny_chat_model, small_steering_config

REFERENCE = Path(__file__).resolve().parent / "reference"
MODEL_TYPES = ("qwen2", "gemma2")
"""Qwen2 (the offline models' architecture) and Gemma 2 (norms after attention/MLP outputs)."""
VOLATILE = ("timings", "versions", "profile")
"""Top-level fields that differ between machines and sessions, not between code versions."""
CONFIG = {"directions": ["sufficiency", "necessity"], "steering_exhaustive": True}
"""Every grid, both directions, attribution, heads, and small steering: every step of the run."""


def run_reference(folder: Path, model_type: str) -> dict:
    """Run the CLI on the tiny ``model_type`` chat model in ``folder``; the comparable results."""
    from refusal_lab.cli import main

    folder = Path(folder)
    model = make_tiny_chat_model(folder / "models", model_type)
    config = small_steering_config(folder / "configs", **CONFIG)
    out = folder / f"run-{model_type}"
    assert main(["run", "--model", str(model), "--out", str(out), "--quiet", "--config", str(config)]) == 0
    return comparable(json.loads((out / "results.json").read_text()))


def comparable(results: dict) -> dict:
    """``results`` without machine-dependent fields and with the model folder's path replaced."""
    results = {k: v for k, v in results.items() if k not in VOLATILE}
    text = json.dumps(results)
    for path in {results["model"]["name"], results["config"]["model"]} - {None}:
        text = text.replace(json.dumps(path)[1:-1], "<model>")
    return json.loads(text)


def reference_path(model_type: str) -> Path:
    return REFERENCE / f"tiny-{model_type}.results.json"


if __name__ == "__main__":
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in MODEL_TYPES:
            reference_path(model_type).write_text(json.dumps(run_reference(Path(tmp), model_type), indent=1) + "\n")
            print("wrote", reference_path(model_type))
