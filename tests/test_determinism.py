"""Two identical ``refusal-lab run`` invocations into different folders give identical numbers.

Everything in ``results.json`` except ``timings`` must match exactly (the run folder is not part of
the results), and ``results.json`` records the ``seed`` and the library ``versions``.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch
import transformers

import refusal_lab
from refusal_lab.cli import main
from tests.helpers_tiny_chat import make_tiny_chat_model, small_steering_config

FAST = ["--grids", "resid_pre,heads", "--no-attribution", "--quiet"]


def _run(model: Path, out: Path, *extra: str) -> dict:
    assert main(["run", "--model", str(model), "--out", str(out), *FAST, *extra]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    model = make_tiny_chat_model(tmp_path_factory.mktemp("models"))
    root = tmp_path_factory.mktemp("runs")
    cfg = small_steering_config(root / "cfg")  # the steering steps (generation included) are deterministic too
    return _run(model, root / "a", "--config", str(cfg)), _run(model, root / "b", "--config", str(cfg))


def test_two_runs_give_identical_results(two_runs):
    a, b = two_runs
    assert "timings" in a and "timings" in b
    a = {k: v for k, v in a.items() if k not in ("timings", "profile")}  # seconds and memory
    b = {k: v for k, v in b.items() if k not in ("timings", "profile")}
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], f"results.json[{key!r}] differs between two identical runs"
    assert set(a["patching"]) >= {"resid_pre"} and "attribution" not in a["patching"]


def test_results_record_seed_and_versions(two_runs):
    r = two_runs[0]
    assert r["seed"] == 0 and r["config"]["seed"] == 0
    v = r["versions"]
    assert v["torch"] == torch.__version__
    assert v["transformers"] == transformers.__version__
    assert v["python"] == platform.python_version()
    assert v["refusal_lab"] == refusal_lab.__version__
