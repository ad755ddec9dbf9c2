"""``refusal-lab run --ray``: patching grids sharded over a real local Ray cluster.

One head is started for the module with ``ray start --head --block`` on 127.0.0.1 (2 CPUs, no
dashboard, its own temp dir and process group, stopped by signalling that group: no ``ray stop``,
which would stop every Ray cluster on the machine). The CLI connects to it with
``--ray 127.0.0.1:PORT --ray-workers 2``: two actors, each in its own worker process with its own
model copy. The run folder written with Ray is compared with one written without: results.json
(but timings and the ``distributed`` record), every step file, per-step tensor and table are equal
to fp32 rounding (``tests/numeric.py``: rtol 1e-5, atol 1e-6), not bit for bit: a shard batches
other rows together than the whole grid does, and a matrix kernel may round another batch shape
differently (seen: 2.7e-7 on ``mlp_out`` on one CPU, 0 on another, even with one thread). Everything
that is not a float (keys, labels, selected heads, shapes) must be equal exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refusal_lab.cli import main
from tests.helpers_tiny_chat import make_tiny_chat_model
from tests.numeric import assert_csv_close, assert_nested_close, assert_tensors_close

SRC = Path(__file__).resolve().parents[1] / "src"
GRIDS = ("resid_pre", "attn_out_cumulative", "heads")
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_bin() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@pytest.fixture(scope="module")
def ray_head():
    """``127.0.0.1:PORT`` of a 2-CPU Ray head on loopback, stopped (its process group) afterwards."""
    pytest.importorskip("ray")
    port = free_port()  # an ephemeral port: outside the range Ray keeps for worker ports
    temp = tempfile.mkdtemp(prefix="rl_ray_", dir="/tmp")  # short: Ray's socket paths must stay short
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    # No token authentication on either side, whatever ~/.ray/auth_token holds (Ray >= 2.5x would
    # otherwise switch a head to token mode when that file exists).
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled")
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    log = open(Path(temp) / "head.log", "w+")
    cmd = [ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
           "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}", "--block"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ray runtime started" not in Path(log.name).read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head failed:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        ray.shutdown()
        # SIGTERM to `ray start` only: it drains the node (while its GCS still runs) and stops what
        # it started; signalling the whole group at once would leave it waiting 30 s for a dead GCS.
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode


@pytest.fixture
def one_thread():
    """Pin the driver to one intra-op thread, like the 1-CPU actors (see the module docstring)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("models"))


def run(model: Path, out: Path, *extra) -> int:
    return main([str(a) for a in ["run", "--model", model, "--out", out, "--grids", ",".join(GRIDS), "--quiet", *extra]])


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def step(folder: Path, name: str) -> dict:
    data = json.loads((folder / "steps" / f"{name}.json").read_text())
    data.pop("_seconds")
    data.pop("_profile", None)
    data.pop("distributed", None)
    return data


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((folder / "steps").glob("*.json"))}


def test_ray_run_equals_single_process_run(ray_head, tiny_dir, tmp_path, one_thread):
    with_ray, without = tmp_path / "ray", tmp_path / "local"
    assert run(tiny_dir, without) == 0
    t0 = time.perf_counter()
    assert run(tiny_dir, with_ray, "--ray", ray_head, "--ray-workers", 2) == 0
    ray_seconds = time.perf_counter() - t0

    a, b = results(with_ray), results(without)
    assert a["config"] == b["config"]  # --ray is not part of the run's config ...
    assert json.loads((with_ray / "run_config.json").read_text()) == json.loads((without / "run_config.json").read_text())
    assert_nested_close({k: v for k, v in a.items() if k not in ("timings", "distributed", "profile")},
                        {k: v for k, v in b.items() if k not in ("timings", "profile")})  # ... nor of its numbers (to rounding)
    assert "distributed" not in b
    for g in GRIDS:
        name = f"patch_{g}_sufficiency"
        assert_nested_close(step(with_ray, name), step(without, name))
        ta = load_file(with_ray / "tensors" / f"{name}.safetensors")["per_pair"]
        tb = load_file(without / "tensors" / f"{name}.safetensors")["per_pair"]
        assert_tensors_close(ta, tb, what=g)
        assert_csv_close(with_ray / "tables" / f"patching_{g}_sufficiency.csv",
                         without / "tables" / f"patching_{g}_sufficiency.csv")

    # Both workers computed a part of every grid, and the parts cover the grid once.
    dist = a["distributed"]
    assert set(dist) == {f"patch_{g}_sufficiency" for g in GRIDS}
    n_layers, cols = a["model"]["n_layers"], [p["index"] for p in a["positions"]]
    pids = set()
    for name, rec in dist.items():
        assert rec["backend"] == "ray" and rec["workers"] == 2 and len(rec["shards"]) == 2
        axis = "cols" if name.startswith("patch_attn_out_cumulative") else "layers"
        assert rec["shard_by"] == axis
        units = sorted(u for s in rec["shards"] for u in s[axis])
        assert units == (cols if axis == "cols" else list(range(n_layers)))
        assert all(s[axis] for s in rec["shards"])
        assert len({s["pid"] for s in rec["shards"]}) == 2  # two worker processes
        pids |= {s["pid"] for s in rec["shards"]}
    assert len(pids) == 2 and os.getpid() not in pids  # the same two actors for every grid, not the driver
    assert (with_ray / "report.html").is_file()

    # The same folder resumes without Ray: same config digest, nothing recomputed.
    before = mtimes(with_ray)
    assert run(tiny_dir, with_ray) == 0
    assert mtimes(with_ray) == before
    assert results(with_ray)["distributed"] == dist  # still says how those steps were computed
    print(f"run with Ray (2 workers, actors started): {ray_seconds:.1f} s")


def one_sentence_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("refusal-lab: error: ") and "\n" not in err and "Traceback" not in err, err
    body = err.removeprefix("refusal-lab: error: ")
    assert body.endswith(".") and ". " not in body.replace("e.g. ", ""), body
    return body


def test_missing_ray_is_one_sentence_exit_2(monkeypatch, tiny_dir, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert run(tiny_dir, tmp_path / "out", "--ray", "auto") == 2
    assert "pip install 'refusal-lab[ray]'" in one_sentence_error(capsys)
    assert not (tmp_path / "out").exists()  # failed before loading the model or creating the folder


def test_unreachable_address_is_one_sentence_exit_2(tiny_dir, tmp_path, capsys):
    pytest.importorskip("ray")
    port = free_port()  # closed again: nothing listens there
    assert run(tiny_dir, tmp_path / "out", "--ray", f"127.0.0.1:{port}") == 2
    assert f"127.0.0.1:{port}" in one_sentence_error(capsys)
    assert run(tiny_dir, tmp_path / "out", "--ray", f"ray://127.0.0.1:{port}") == 2
    assert "Cannot reach a Ray cluster" in one_sentence_error(capsys)


def test_bad_worker_count_is_one_sentence_exit_2(tiny_dir, tmp_path, capsys):
    assert run(tiny_dir, tmp_path / "out", "--ray-workers", 2) == 2
    assert "--ray-workers needs --ray" in one_sentence_error(capsys)
    pytest.importorskip("ray")
    assert run(tiny_dir, tmp_path / "out", "--ray", "auto", "--ray-workers", 0) == 2
    assert "at least 1" in one_sentence_error(capsys)


def test_split_and_merge_cover_every_cell_once():
    from refusal_lab.distributed import merge, split_spec
    from refusal_lab.patching.engine import GridSpec

    L, T = 6, 12
    for spec in (GridSpec("resid_pre", list(range(L)), [7, 8, 9, 10, 11]),
                 GridSpec("heads", list(range(L)), [8], [0, 1, 2, 3]),
                 GridSpec("mlp_out_cumulative", list(range(L)), [7, 8, 9, 10, 11])):
        axis = "cols" if spec.grid.endswith("cumulative") else "layers"
        full = torch.arange(3 * spec.shape[0] * spec.shape[1], dtype=torch.float32).reshape(3, *spec.shape)
        for n in (1, 2, 3, 50):
            shards = split_spec(spec, n, L, T)
            assert len(shards) == min(n, len(getattr(spec, axis)))
            assert sorted(u for s in shards for u in getattr(s, axis)) == getattr(spec, axis)
            other = "cols" if axis == "layers" else "layers"
            assert all(getattr(s, other) == getattr(spec, other) and s.heads == spec.heads for s in shards)
            idx = lambda s: [getattr(spec, axis).index(u) for u in getattr(s, axis)]  # noqa: E731
            parts = [full[:, idx(s)] if axis == "layers" else full[:, :, idx(s)] for s in shards]
            assert torch.equal(merge(spec, shards, parts, 3), full)
    # balanced by cone cost: layer l costs L - l, so 6 layers on 2 workers split 11 : 10
    shards = split_spec(GridSpec("resid_pre", list(range(L)), [11]), 2, L, T)
    assert sorted(sum(L - l for l in s.layers) for s in shards) == [10, 11]


def test_shard_worker_in_process(tiny_dir, one_thread):
    """The actor class without Ray: its shards are the grid's cells; other inputs are refused."""
    from refusal_lab.distributed import ShardWorker, inputs_fingerprint, merge, split_spec
    from refusal_lab.errors import RefusalLabError
    from refusal_lab.models.loading import load_model
    from refusal_lab.patching.engine import patch_grid
    from refusal_lab.run.config import RunConfig
    from refusal_lab.run.inputs import RunInputs

    cfg = RunConfig(model=str(tiny_dir), grids=["heads"])
    rep = RunInputs(load_model(str(tiny_dir), device="cpu"), cfg)
    load = {"dtype": "float32", "device": "cpu"}
    worker = ShardWorker(load, cfg.as_dict(), inputs_fingerprint(rep))
    assert worker.info()["pid"] == os.getpid()
    for grid in ("mlp_out", "heads", "attn_out_cumulative"):
        spec = rep.grid_spec(grid)
        shards = split_spec(spec, 2, rep.model.cfg.n_layers, rep.prompts.seq_len)
        parts = [worker.patch("harmful", "harmless", s)[0] for s in shards]
        full = patch_grid(rep.model, rep.receiver("harmless"), rep.source_cache("harmful"), spec, rep.metric,
                          progress=False)
        assert_tensors_close(merge(spec, shards, parts, full.shape[0]), full, what=grid)
    stranger = ShardWorker(load, cfg.as_dict(), "0" * 64)
    with pytest.raises(RefusalLabError, match="different prompts or tokens"):
        stranger.info()
