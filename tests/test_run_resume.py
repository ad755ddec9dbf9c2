"""A run killed with SIGKILL at several points and restarted gives the uninterrupted run's results.

Done for real: ``python -m refusal_lab.cli run`` in a subprocess, polled until a given step file
appears in ``<out>/steps/``, then ``kill -9``. The same folder is killed three times (after
``baseline``; mid-grid, after three ``patch_*`` grids; after ``heads``, i.e. while results, tables
and the report are being written), then run to completion and compared with an uninterrupted run
in another folder (which runs meanwhile, in parallel).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers_tiny_chat import make_tiny_chat_model

SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT_S = 240  # per wait; generous for a loaded 2-core machine (a healthy run takes seconds)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    # One intra-op thread: the tiny model gains nothing from more, and two processes run at once.
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def start_run(model: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "refusal_lab.cli", "run", "--model", str(model), "--out", str(out), "--quiet", "--no-steering"]
    return subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{err[-3000:]}"
    assert "results.json" in out


def kill_when(proc: subprocess.Popen, step_file: Path) -> None:
    """SIGKILL ``proc`` as soon as ``step_file`` exists (fail if the run ends first)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not step_file.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) before {step_file.name} appeared:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{step_file.name} did not appear within {TIMEOUT_S} s")
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def steps_done(out: Path) -> set[str]:
    return {p.stem for p in (out / "steps").glob("*.json")}


def comparable(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    results.pop("timings")
    results.pop("profile")  # wall and CPU seconds, memory
    return results


def test_killed_run_resumes_to_identical_results(tmp_path):
    model = make_tiny_chat_model(tmp_path)
    reference, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    ref_proc = start_run(model, reference)  # runs alongside the killed/resumed chain

    try:
        # 1. killed right after the baseline step: nothing else finished.
        kill_when(start_run(model, resumed), resumed / "steps" / "baseline.json")
        done = steps_done(resumed)
        assert "baseline" in done and "patch_mlp_out_sufficiency" not in done
        assert not (resumed / "results.json").exists()

        # 2. resumed, then killed mid-grid: after resid_pre, resid_post and attn_out.
        kill_when(start_run(model, resumed), resumed / "steps" / "patch_attn_out_sufficiency.json")
        done = steps_done(resumed)
        assert {"baseline", "dla", "patch_resid_pre_sufficiency", "patch_resid_post_sufficiency"} <= done
        assert "patch_heads_sufficiency" not in done and "heads" not in done
        assert not (resumed / "results.json").exists()

        # 3. resumed, then killed once the last step finished (while results/report are written).
        kill_when(start_run(model, resumed), resumed / "steps" / "heads.json")
        assert not (resumed / "report.html").exists()
        mtimes = {p.name: p.stat().st_mtime_ns for p in (resumed / "steps").glob("*.json")}

        # 4. resumed to completion: no finished step is recomputed.
        finish(start_run(model, resumed))
        assert {p.name: p.stat().st_mtime_ns for p in (resumed / "steps").glob("*.json")} == mtimes
    except BaseException:
        ref_proc.kill()
        ref_proc.communicate()
        raise
    finish(ref_proc)

    assert steps_done(resumed) == steps_done(reference)
    assert comparable(resumed) == comparable(reference)
    tables = sorted(p.name for p in (reference / "tables").glob("*.csv"))
    assert tables and tables == sorted(p.name for p in (resumed / "tables").glob("*.csv"))
    for name in tables:
        assert (resumed / "tables" / name).read_text() == (reference / "tables" / name).read_text(), name
    assert (resumed / "report.html").is_file()
    for p in (resumed / "steps").glob("*.json"):  # atomic writes: every step file is whole
        json.loads(p.read_text())
