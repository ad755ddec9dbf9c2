"""The benchmark scripts run end to end in their CI modes (no timing assertions):
``bench_gpu.py`` falls back to a tiny Gemma 2 config without CUDA, and ``bench_patching.py --tiny``
compares every grid of the cone engine with TransformerLens and nnsight on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback is what CI runs; on a GPU run it by hand")
def test_bench_gpu_cpu_fallback(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run(["benchmarks/bench_gpu.py", "--configs", "2b", "--threads", "1", "--gen-tokens", "4",
                 "--json", str(out)])
    assert "falling back to the tiny Gemma 2 config" in proc.stdout
    data = json.loads(out.read_text())
    (r,) = data["results"]
    assert r["config"] == "tiny" and r["device"] == "cpu"
    steps = [s["step"] for s in r["steps"]]
    for g in ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn_out_cumulative", "mlp_out_cumulative", "heads"):
        assert f"patch_{g}" in steps
    assert any(s.startswith("attribution") for s in steps) and any(s.startswith("heads") for s in steps)
    assert "| **total** |" in proc.stdout


def test_bench_patching_tiny_all_grids(tmp_path):
    pytest.importorskip("transformer_lens")
    out = tmp_path / "patch.json"
    proc = _run(["benchmarks/bench_patching.py", "--tiny", "--grid", "all", "--repeats", "1", "--threads", "1",
                 "--json", str(out)])
    data = json.loads(out.read_text())
    grids = {r["grid"] for r in data["results"]}
    assert grids == {"resid_pre", "resid_post", "attn_out", "mlp_out", "attn_out_cumulative", "mlp_out_cumulative",
                     "heads"}
    methods = {r["method"].split(" ")[0] for r in data["results"]}
    assert {"ours", "TransformerLens"} <= methods
    assert all(r["max_diff"] <= 1e-4 for r in data["results"]), proc.stdout  # same numbers as ours
