"""The ``refusal-lab`` command end to end on a tiny random chat model saved to a folder.

``run`` writes a complete ``results.json`` (schema checked key by key), tables and the report; a
second identical run recomputes nothing; ``--force`` recomputes; ``--necessity`` adds the reverse
direction; ``inspect --json`` prints JSON; ``compare`` writes an HTML page. The ``real_model`` test
runs ``inspect`` on the offline default model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers_tiny_chat import make_tiny_chat_model, small_steering_config
from refusal_lab.cli import main

GRIDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn_out_cumulative", "mlp_out_cumulative", "heads")
N_LAYERS, N_HEADS, D_MODEL = 3, 4, 64  # tests/tiny_models.py: TINY


def run_cli(argv: list[str]) -> int:
    return main([str(a) for a in argv])


def read_results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def without_timings(results: dict) -> dict:
    """Results without what measures the process (seconds, memory, which steps were read back)."""
    return {k: v for k, v in results.items() if k not in ("timings", "profile")}


def step_mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((folder / "steps").glob("*.json"))}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory) -> Path:
    """One complete default run (every grid, sufficiency, attribution, heads) shared by the tests."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert run_cli(["run", "--model", tiny_dir, "--out", out, "--quiet", "--config", small_config(tiny_dir)]) == 0
    return out


def small_config(tiny_dir: Path) -> Path:
    return small_steering_config(Path(tiny_dir).parent / "configs")


# -------------------------------------------------------------------------------------- run


def test_run_results_schema(run_dir, tiny_dir):
    r = read_results(run_dir)

    m = r["model"]
    assert {"name", "n_layers", "n_heads", "d_model", "dtype"} <= set(m)
    assert (m["name"], m["n_layers"], m["n_heads"], m["d_model"]) == (str(tiny_dir), N_LAYERS, N_HEADS, D_MODEL)
    assert m["dtype"] == "float32"

    # Every packaged object is one token under the tiny tokenizer: nothing dropped, 7 + 7 pairs.
    assert {"harmful", "harmless", "dropped"} <= set(r["objects"])
    assert r["objects"]["harmful"] == ["poison", "bomb", "weapon", "toxins", "hack", "drugs", "suicide"]
    assert r["objects"]["harmless"] == ["pie", "cake", "pizza", "poem", "kite", "toy", "card"]
    assert r["objects"]["dropped"] == []

    pos = r["positions"]
    assert pos and all({"index", "label", "token"} <= set(p) for p in pos)
    labels = [p["label"] for p in pos]
    assert labels[0] == "obj" and labels[-1] == "last" and "post_obj" in labels and "eoi" in labels
    assert [p["index"] for p in pos] == list(range(pos[0]["index"], pos[0]["index"] + len(pos)))

    b = r["baseline"]
    assert {"harmful", "harmless", "harmful_mean", "harmless_mean"} <= set(b)
    assert set(b["harmful"]) == set(r["objects"]["harmful"]) and set(b["harmless"]) == set(r["objects"]["harmless"])
    assert b["harmful_mean"] == pytest.approx(sum(b["harmful"].values()) / 7)
    assert b["harmless_mean"] == pytest.approx(sum(b["harmless"].values()) / 7)

    d = r["dla"]
    assert {"labels", "harmful_mean", "harmless_mean"} <= set(d)
    assert len(d["harmful_mean"]) == len(d["labels"]) == len(d["harmless_mean"])

    p = r["patching"]
    for g in GRIDS:
        e = p[g]
        assert {"rows", "cols", "values", "direction", "method"} <= set(e), g
        assert e["rows"] == list(range(N_LAYERS)), g
        n_cols = N_HEADS if g == "heads" else len(pos)
        assert len(e["cols"]) == n_cols, g
        assert len(e["values"]) == N_LAYERS and all(len(row) == n_cols for row in e["values"]), g
        assert all(isinstance(v, float) for row in e["values"] for v in row), g
        assert (e["direction"], e["method"]) == ("harmful->harmless", "exact"), g
    assert "necessity" not in p

    h = r["heads"]
    assert {"threshold", "selected", "sufficiency"} <= set(h)
    assert h["threshold"] == 0.005
    assert all(s["value"] > h["threshold"] for s in h["selected"])
    assert isinstance(r["timings"], dict) and "total" in r["timings"]


def test_run_writes_tables_and_report(run_dir):
    tables = {p.name for p in (run_dir / "tables").glob("*.csv")}
    assert "baseline.csv" in tables
    assert {f"patching_{g}_sufficiency.csv" for g in GRIDS} <= tables
    assert all((run_dir / "tables" / t).stat().st_size > 0 for t in tables)
    report = run_dir / "report.html"
    assert report.is_file() and "<html" in report.read_text(encoding="utf-8").lower()
    assert {p.stem for p in (run_dir / "steps").glob("*.json")} >= {"baseline", "dla", "attribution", "heads"} | {
        f"patch_{g}_sufficiency" for g in GRIDS}


def test_run_steering_sections(run_dir, tiny_dir):
    """Steering runs by default: direction, sweeps and held-out refusal rates with baselines and n."""
    from refusal_lab.stats import wilson_interval
    from refusal_lab.steering.vectors import load_vector

    r = read_results(run_dir)
    d = r["direction"]
    L = N_LAYERS
    assert 0 <= d["layer"] < L and d["position"] < 0 and d["site"] == f"blocks.{d['layer']}.hook_resid_pre"
    assert {"bypass", "induce", "kl", "baseline", "filters", "table", "n_train", "n_val"} <= set(d)
    assert len(d["table"]) == L * len(d["positions"])
    assert d["n_train"] == {"harmful": 6, "harmless": 6} and d["n_val"] == {"harmful": 4, "harmless": 4}
    chosen = [row for row in d["table"] if row["layer"] == d["layer"] and row["position"] == d["position"]]
    assert len(chosen) == 1 and chosen[0]["bypass"] == d["bypass"]
    if d["fallback"] is None:  # the lowest bypass among the kept candidates
        assert chosen[0]["kept"] and d["bypass"] == min(row["bypass"] for row in d["table"] if row["kept"])
        assert d["filters"] == {"kl_max": 0.1, "max_layer_frac": 0.8, "induce_min": 0.0, "stage": "configured"}
    else:  # the filters actually applied, not the configured ones
        relaxed = {"kl_max": 0.1, "max_layer_frac": 0.8, "induce_min": d["baseline"]["harmless_val_log_odds"],
                   "stage": "induce_relaxed"}
        assert d["filters"] in (relaxed, {"kl_max": None, "max_layer_frac": 0.8, "induce_min": None,
                                          "stage": "layer_only"})

    v, meta = load_vector(run_dir / "vectors" / "direction.safetensors")
    assert v.shape == (D_MODEL,) and meta["layer"] == d["layer"] and meta["position"] == d["position"]
    assert float(v.norm()) == pytest.approx(d["norm"], rel=1e-6)

    st = r["steering"]["instructions"]
    assert [row["alpha"] for row in st["rows"]] == [0.0, 2.0]
    assert st["chosen_alpha"] == 2.0 and st["ablation"]["n"] == 4
    wilson = lambda rate, n: list(wilson_interval(round(rate * n), n))  # noqa: E731
    assert st["ablation"]["refusal_rate_ci95"] == wilson(st["ablation"]["refusal_rate"], 4)
    for row in st["rows"]:
        for kind in ("induce", "suppress"):
            assert row[f"{kind}_n"] == 4
            assert row[f"{kind}_refusal_rate_ci95"] == wilson(row[f"{kind}_refusal_rate"], 4)
    # alpha 0 is the unsteered model: induce and suppress rows coincide with the baselines
    assert st["rows"][0]["induce_refusal_score"] == pytest.approx(d["baseline"]["harmless_val_log_odds"], abs=1e-5)
    assert st["rows"][0]["suppress_refusal_score"] == pytest.approx(d["baseline"]["harmful_val_log_odds"], abs=1e-5)
    for name in ("difference", "heads") if r["heads"]["selected"] else ("difference",):
        o = r["steering"]["objects"][name]
        assert [row["alpha"] for row in o["rows"]] == [0.0, 8.0]
        zero = o["rows"][0]  # alpha 0: the baseline means, i.e. normalised 0 (harmless) and 1 (harmful)
        assert zero["harmless_normalised"] == pytest.approx(0.0, abs=1e-4)
        assert zero["harmful_normalised"] == pytest.approx(1.0, abs=1e-4)
        assert (run_dir / "vectors" / f"objects_{name}.safetensors").is_file()
        gap = r["baseline"]["harmful_mean"] - r["baseline"]["harmless_mean"]
        for row in o["rows"]:
            for side in ("harmless", "harmful"):
                assert row[f"{side}_n"] == 7
                assert row[f"{side}_refusal_fraction_ci95"] == wilson(row[f"{side}_refusal_fraction"], 7)
                assert row[f"{side}_metric_se"] > 0
                assert row[f"{side}_normalised_se"] == pytest.approx(row[f"{side}_metric_se"] / abs(gap), rel=1e-6)

    ev = r["evaluation"]
    for key in ("harmless_refusal_rate_added", "harmful_refusal_rate_ablated", "harmful_refusal_rate_subtracted"):
        e = ev[key]
        assert e["n"] == 4 and 0 <= e["value"] <= 1 and 0 <= e["baseline"] <= 1
        assert e["value"] == e["k"] / 4 and e["baseline"] == e["baseline_k"] / 4
        assert e["ci95"] == list(wilson_interval(e["k"], 4))
        assert e["baseline_ci95"] == list(wilson_interval(e["baseline_k"], 4))
    assert ev["alpha"] == st["chosen_alpha"] and ev["split"] == "test"
    for name in ("ablation", "addition"):
        dmg = ev["damage"][name]
        assert dmg["kl_harmless"] >= 0 and dmg["ce_edited"] > 0 and dmg["n"] == 4
    assert {"direction", "steering", "evaluation"} <= set(r["timings"])
    assert any(f.startswith("Selected refusal direction") for f in r["findings"])
    assert any(f.startswith("Held-out test prompts") for f in r["findings"])


def test_second_identical_run_recomputes_nothing(run_dir, tiny_dir, monkeypatch):
    before = read_results(run_dir)
    mtimes = step_mtimes(run_dir)
    assert len(mtimes) == len(GRIDS) + 8  # + baseline, dla, attribution, heads, direction, steering, evaluation, geometry

    import refusal_lab.run.steps.patch as patch_step
    import refusal_lab.steering.pipeline as pipeline

    def no_patching(*a, **k):
        raise AssertionError("a finished grid was recomputed")

    def no_steering(*a, **k):
        raise AssertionError("a finished steering step was recomputed")

    monkeypatch.setattr(patch_step, "patch_grid", no_patching)
    for name in ("direction_step", "steering_step", "evaluation_step"):
        monkeypatch.setattr(pipeline, name, no_steering)
    assert run_cli(["run", "--model", tiny_dir, "--out", run_dir, "--quiet", "--config", small_config(tiny_dir)]) == 0
    assert step_mtimes(run_dir) == mtimes
    after = read_results(run_dir)
    assert without_timings(after) == without_timings(before)
    # Step timings are the recorded ones; only the total differs.
    assert {k: v for k, v in after["timings"].items() if k != "total"} == \
           {k: v for k, v in before["timings"].items() if k != "total"}
    # the profile: every stored step's cost as measured when it ran, now marked as read back
    assert set(after["profile"]) == set(before["profile"]) == {p[:-5] for p in mtimes}
    for k, p in after["profile"].items():
        assert p["resumed"] and not before["profile"][k]["resumed"]
        assert {x: v for x, v in p.items() if x != "resumed"} == \
               {x: v for x, v in before["profile"][k].items() if x != "resumed"}
        assert p["wall_s"] >= 0 and p["cpu_s"] >= 0 and p["peak_rss_gib"] >= p["rss_start_gib"] > 0


@pytest.fixture(scope="module")
def necessity_dir(tiny_dir, tmp_path_factory) -> Path:
    """A smaller run in both directions (two grids, no attribution)."""
    out = tmp_path_factory.mktemp("runs") / "necessity"
    assert run_cli(["run", "--model", tiny_dir, "--out", out, "--quiet", "--necessity",
                    "--grids", "resid_pre,heads", "--no-attribution", "--no-steering"]) == 0
    return out


def test_necessity_adds_reverse_direction(necessity_dir):
    p = read_results(necessity_dir)["patching"]
    assert set(p["necessity"]) == {"resid_pre", "heads"}
    for g in ("resid_pre", "heads"):
        suff, nec = p[g], p["necessity"][g]
        assert nec["direction"] == "harmless->harmful" and suff["direction"] == "harmful->harmless"
        assert nec["method"] == "exact"
        assert (nec["rows"], nec["cols"]) == (suff["rows"], suff["cols"])
        assert [len(r) for r in nec["values"]] == [len(r) for r in suff["values"]]
    # resid_pre at layer 0 on the last position: the receiver's own last token is replaced by the
    # source's, which is the same chat-template token, so nothing changes -> 1 (unchanged) in the
    # necessity direction and 0 (harmless baseline) in the sufficiency direction.
    assert p["necessity"]["resid_pre"]["values"][0][-1] == pytest.approx(1.0, abs=1e-4)
    assert p["resid_pre"]["values"][0][-1] == pytest.approx(0.0, abs=1e-4)
    assert {s.stem for s in (necessity_dir / "steps").glob("*.json")} == {
        "baseline", "dla", "heads", "patch_resid_pre_sufficiency", "patch_heads_sufficiency",
        "patch_resid_pre_necessity", "patch_heads_necessity"}
    assert "attribution" not in p
    assert {p.name for p in (necessity_dir / "tables").glob("patching_*.csv")} == {
        f"patching_{g}_{d}.csv" for g in ("resid_pre", "heads") for d in ("sufficiency", "necessity")} | {
        "patching_summary.csv"}  # mean, SE and interval of every cell


def test_force_recomputes_every_step(necessity_dir, tiny_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(necessity_dir, copy)
    mtimes = step_mtimes(copy)
    argv = ["run", "--model", tiny_dir, "--out", copy, "--quiet", "--necessity", "--grids", "resid_pre,heads",
            "--no-attribution", "--no-steering"]
    assert run_cli(argv + ["--force"]) == 0
    new = step_mtimes(copy)
    assert set(new) == set(mtimes)
    assert all(new[k] != mtimes[k] for k in mtimes), "every step is rewritten"
    # Recomputing is deterministic.
    assert without_timings(read_results(copy)) == without_timings(read_results(necessity_dir))


def _stop_after_load(argv) -> None:
    """Run ``argv`` with the load_model spy, which stops the command (exit 2) once it has been called."""
    assert run_cli(argv) == 2


@pytest.fixture()
def load_spy(monkeypatch):
    """Replace load_model by a spy recording (spec, kwargs) and stopping the command."""
    import refusal_lab.models.loading as loading

    calls = []

    from refusal_lab.errors import RefusalLabError

    def spy(spec=None, **kw):
        calls.append({"model": spec, **kw})
        raise RefusalLabError("Stopped after load_model (test spy).")

    monkeypatch.setattr(loading, "load_model", spy)
    return calls


def test_config_file_device_dtype_and_model_reach_the_loader(tiny_dir, tmp_path, load_spy):
    """Regression: `device` in a --config file was ignored for the main model (only model and dtype
    were written back); flags still override the file."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": str(tiny_dir), "device": "cuda:7", "dtype": "float16"}))
    _stop_after_load(["run", "--config", cfg, "--out", tmp_path / "o", "--quiet"])
    assert {k: load_spy[-1][k] for k in ("model", "device", "dtype", "progress")} == {
        "model": str(tiny_dir), "device": "cuda:7", "dtype": "float16", "progress": False}
    _stop_after_load(["run", "--config", cfg, "--device", "cpu", "--dtype", "bfloat16", "--out", tmp_path / "o"])
    assert {k: load_spy[-1][k] for k in ("model", "device", "dtype", "progress")} == {
        "model": str(tiny_dir), "device": "cpu", "dtype": "bfloat16", "progress": True}


def test_quiet_turns_off_the_loaders_progress(tiny_dir, load_spy):
    """--quiet reaches load_model as progress=False (GGUF conversion and weight-loading bars)."""
    for argv in (["inspect", "--model", tiny_dir], ["run", "--model", tiny_dir, "--quiet"]):
        _stop_after_load(argv)
    assert [c["progress"] for c in load_spy] == [True, False]


def test_strict_stops_a_model_that_does_not_separate(tiny_dir, tmp_path, capsys):
    """--strict on a tiny random model (its harmful and harmless objects score alike): exit 2 and one
    sentence on stderr, no traceback, nothing computed past the baseline."""
    out = tmp_path / "strict"
    capsys.readouterr()
    rc = run_cli(["run", "--model", tiny_dir, "--out", out, "--quiet", "--strict", "--no-steering"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("refusal-lab: error: ") and "does not separate harmful from harmless" in err
    assert "--strict" in err and not list((out / "steps").glob("patch_*.json"))


# ---------------------------------------------------------------------------------- inspect


def test_inspect_json(tiny_dir, capsys):
    capsys.readouterr()
    assert run_cli(["inspect", "--model", tiny_dir, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    m = info["model"]
    assert (m["n_layers"], m["n_heads"], m["d_model"]) == (N_LAYERS, N_HEADS, D_MODEL)
    assert m["model_type"] == "qwen2"
    cols = info["prompts"]["columns"]
    assert [c["index"] for c in cols] == list(range(info["prompts"]["seq_len"]))
    labels = [c["label"] for c in cols]
    assert labels[info["prompts"]["obj_index"]] == "obj" and labels[-1] == "last"
    assert {"prefix", "pre_obj", "post_obj", "eoi"} <= set(labels)
    assert info["tokens"]["refusal"]["str"] == "Sorry" and info["tokens"]["compliance"]["str"] == "Sure"
    for side, n in (("harmful", 7), ("harmless", 7)):
        rows = info["objects"][side]["prompts"]
        assert len(rows) == n
        assert all(isinstance(r["score"], float) and r["object"] for r in rows)
        assert info["objects"][side]["mean_score"] == pytest.approx(sum(r["score"] for r in rows) / n, abs=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_inspect_other_architectures(model_type, tmp_path, capsys):
    """The helper's folder loads for other architectures too, keeping every object."""
    folder = make_tiny_chat_model(tmp_path, model_type)
    capsys.readouterr()
    assert run_cli(["inspect", "--model", folder, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["model_type"] == model_type
    assert info["dropped"] == [] and len(info["objects"]["harmful"]["prompts"]) == 7


def test_inspect_text(tiny_dir, capsys):
    capsys.readouterr()
    assert run_cli(["inspect", "--model", tiny_dir]) == 0
    out = capsys.readouterr().out
    assert "3 layers" in out and "harmful" in out and "bomb" in out


# ---------------------------------------------------------------------------------- compare


def test_compare_two_runs(run_dir, necessity_dir, tmp_path):
    out = tmp_path / "comparison"
    assert run_cli(["compare", run_dir, necessity_dir, "--out", out]) == 0
    pages = list(out.glob("*.html"))
    assert len(pages) == 1 and pages[0].stat().st_size > 0
    assert "<html" in pages[0].read_text(encoding="utf-8").lower()


def test_compare_needs_results(run_dir, tmp_path, capsys):
    capsys.readouterr()
    assert run_cli(["compare", run_dir, tmp_path / "empty", "--out", tmp_path / "cmp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no results.json" in err[0]


# ------------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_inspect_default_model(capsys):
    """The offline Qwen2.5-Coder-0.5B-Instruct (no --model) refuses harmful objects more."""
    capsys.readouterr()
    assert run_cli(["inspect", "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    m = info["model"]
    assert (m["n_layers"], m["n_heads"], m["d_model"]) == (24, 14, 896)
    labels = [c["label"] for c in info["prompts"]["columns"]]
    assert "obj" in labels and labels[-1] == "last"
    harmful, harmless = info["objects"]["harmful"], info["objects"]["harmless"]
    assert len(harmful["prompts"]) >= 5 and len(harmless["prompts"]) >= 5
    assert harmful["mean_score"] > harmless["mean_score"]
