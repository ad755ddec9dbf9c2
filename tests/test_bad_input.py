"""Bad input to the CLI: exit code 2 and one sentence on stderr naming the problem, no traceback.

Each case calls ``refusal_lab.cli.main`` in-process (``run --quiet`` silences the weight-loading
bar, so stderr holds the error line only) on tiny models saved to folders: a qwen2 chat model, the
same without a chat template, and a GPT-2 (an architecture refusal_lab has no adapter for).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refusal_lab.cli import main
from tests.helpers_tiny_chat import CHAT_TEMPLATE, make_tiny_chat_model, make_tiny_gpt2_chat_model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-input-models")
    return {"chat": make_tiny_chat_model(root),
            "base": make_tiny_chat_model(root, chat_template=None, name="tiny-qwen2-base"),
            "gpt2": make_tiny_gpt2_chat_model(root)}


def run_main(capsys, argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything fixtures printed
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    line = lines[0]
    assert rc == 2, f"exit code {rc}: {line}"
    assert line.startswith("refusal-lab: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- models


def test_missing_local_model_path(tmp_path, capsys):
    rc, _, err = run_main(capsys, ["run", "--model", tmp_path / "no-such-model", "--out", tmp_path / "out", "--quiet"])
    assert_one_line_error(rc, err, "no-such-model", "does not exist")
    assert not (tmp_path / "out").exists()


def test_missing_model_path_inspect(tmp_path, capsys):
    rc, out, err = run_main(capsys, ["inspect", "--model", tmp_path / "nope", "--json"])
    assert_one_line_error(rc, err, "does not exist")
    assert out == ""


def test_unsupported_architecture(models, tmp_path, capsys):
    rc, _, err = run_main(capsys, ["run", "--model", models["gpt2"], "--out", tmp_path / "out", "--quiet"])
    assert_one_line_error(rc, err, "'gpt2'", "does not support", "qwen2")


def test_model_without_chat_template(models, tmp_path, capsys):
    rc, _, err = run_main(capsys, ["run", "--model", models["base"], "--out", tmp_path / "out", "--quiet"])
    assert_one_line_error(rc, err, "no chat template", "--chat-template")


def test_chat_template_flag_fixes_a_base_model(models, tmp_path, capsys):
    template = write(tmp_path / "chatml.jinja", CHAT_TEMPLATE)
    rc, out, err = run_main(capsys, ["inspect", "--model", models["base"], "--chat-template", template, "--json"])
    assert rc == 0, err
    assert json.loads(out)["prompts"]["example"].startswith("<|im_start|>user\n")


def test_missing_chat_template_file(models, tmp_path, capsys):
    rc, _, err = run_main(capsys, ["run", "--model", models["base"], "--chat-template", tmp_path / "none.jinja",
                                   "--out", tmp_path / "out", "--quiet"])
    assert_one_line_error(rc, err, "none.jinja", "does not exist")


# ---------------------------------------------------------------------------- prompts, tokens

OBJECT_FILES = {
    "empty-file": ("", ["not valid JSON"]),
    "empty-lists": ({"harmful": [], "harmless": ["cake"]}, ["'harmful'", "empty list"]),
    "duplicates": ({"harmful": ["bomb", "poison", "bomb"], "harmless": ["cake", "pie", "toy"]}, ["'bomb'", "twice"]),
    "non-strings": ({"harmful": ["bomb", 3], "harmless": ["cake", "pie"]}, ["harmful[1]", "string"]),
    "not-an-object": (["bomb", "cake"], ["JSON object"]),
}


@pytest.mark.parametrize("case", sorted(OBJECT_FILES))
def test_bad_objects_file(case, models, tmp_path, capsys):
    content, needles = OBJECT_FILES[case]
    path = write(tmp_path / f"{case}.json", content)
    rc, _, err = run_main(capsys, ["run", "--model", models["chat"], "--objects", path, "--out", tmp_path / "out",
                                   "--quiet"])
    assert_one_line_error(rc, err, path.name, *needles)
    assert not (tmp_path / "out" / "run_config.json").exists(), "a failed start leaves no run behind"


def test_objects_file_does_not_exist(models, tmp_path, capsys):
    rc, _, err = run_main(capsys, ["run", "--model", models["chat"], "--objects", tmp_path / "missing.json",
                                   "--out", tmp_path / "out", "--quiet"])
    assert_one_line_error(rc, err, "missing.json", "neither an existing JSON file", "seed_gemma2_replication")


def test_template_without_object(models, tmp_path, capsys):
    rc, _, err = run_main(capsys, ["run", "--model", models["chat"], "--template", "Tell me how to make a thing.",
                                   "--out", tmp_path / "out", "--quiet"])
    assert_one_line_error(rc, err, "{object}", "0 times")


def test_refusal_string_is_not_one_token(models, tmp_path, capsys):
    rc, _, err = run_main(capsys, ["run", "--model", models["chat"], "--refusal", "Sorry buddy",
                                   "--out", tmp_path / "out", "--quiet"])
    assert_one_line_error(rc, err, "'Sorry buddy'", "2 tokens", "not one")


def test_heads_position_unknown_label(models, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run_main(capsys, ["run", "--model", models["chat"], "--heads-position", "nonexistent_label",
                                   "--out", out, "--quiet"])
    assert_one_line_error(rc, err, "'nonexistent_label'", "post_obj")
    # Checked before any step runs, and the folder is not claimed by the failed config.
    assert not (out / "steps").exists() and not (out / "run_config.json").exists()


# ------------------------------------------------------------------------------------- config


def test_config_unknown_key(models, tmp_path, capsys):
    cfg = write(tmp_path / "cfg.json", {"threshold": 0.01, "treshold": 0.02})
    rc, _, err = run_main(capsys, ["run", "--model", models["chat"], "--config", cfg, "--out", tmp_path / "out",
                                   "--quiet"])
    assert_one_line_error(rc, err, "'treshold'", "cfg.json", "threshold")


@pytest.mark.parametrize(("key", "value"), [("threshold", "high"), ("grids", "resid_pre"), ("max_rows", 1.5),
                                            ("attribution", "yes"), ("directions", [])])
def test_config_wrong_type(key, value, models, tmp_path, capsys):
    cfg = write(tmp_path / "cfg.json", {key: value})
    rc, _, err = run_main(capsys, ["run", "--model", models["chat"], "--config", cfg, "--out", tmp_path / "out",
                                   "--quiet"])
    assert_one_line_error(rc, err, f"'{key}'", "cfg.json")


@pytest.mark.parametrize(("content", "needle"), [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_config_not_a_json_object(content, needle, models, tmp_path, capsys):
    cfg = write(tmp_path / "cfg.json", content)
    rc, _, err = run_main(capsys, ["run", "--model", models["chat"], "--config", cfg, "--out", tmp_path / "out",
                                   "--quiet"])
    assert_one_line_error(rc, err, "cfg.json", needle)


def test_config_file_missing(models, tmp_path, capsys):
    rc, _, err = run_main(capsys, ["run", "--model", models["chat"], "--config", tmp_path / "nope.json",
                                   "--out", tmp_path / "out", "--quiet"])
    assert_one_line_error(rc, err, "nope.json", "does not exist")


# ------------------------------------------------------------------------------ output folder


def test_output_folder_with_another_run(models, tmp_path, capsys):
    out = tmp_path / "out"
    first = ["run", "--model", models["chat"], "--out", out, "--quiet", "--grids", "resid_pre", "--no-attribution", "--no-steering"]
    rc, _, err = run_main(capsys, first)
    assert rc == 0, err
    assert (out / "tables" / "patching_resid_pre_sufficiency.csv").is_file()
    import torch

    from refusal_lab.steering.vectors import save_vector  # as a steering run of the first config would leave

    save_vector(out / "vectors" / "objects_heads.safetensors", torch.ones(4), {"layer": 0})

    other = ["run", "--model", models["chat"], "--out", out, "--quiet", "--grids", "attn_out", "--no-attribution", "--no-steering"]
    rc, _, err = run_main(capsys, other)
    assert_one_line_error(rc, err, str(out), "another", "--force")
    assert json.loads((out / "results.json").read_text())["config"]["grids"] == ["resid_pre"], "left untouched"

    rc, _, err = run_main(capsys, other + ["--force"])
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["grids"] == ["attn_out"]
    assert "attn_out" in results["patching"] and "resid_pre" not in results["patching"]
    assert {p.stem for p in (out / "steps").glob("*.json")} == {"baseline", "dla", "patch_attn_out_sufficiency"}
    # Nothing of the overwritten run is left next to the new one.
    assert {p.name for p in (out / "tables").glob("*.csv")} == {"baseline.csv", "patching_attn_out_sufficiency.csv",
                                                                 "patching_summary.csv"}  # the new run's summary
    assert not list((out / "tensors").glob("*resid_pre*"))
    assert not list((out / "vectors").glob("*"))

    # The same config again is a resume, not a conflict.
    rc, _, err = run_main(capsys, other)
    assert rc == 0, err


# -------------------------------------------------------------------------------------- judge


@pytest.mark.parametrize(("judge", "needle"), [("./nope", "does not exist"), ("/tmp/refusal-lab-x", "does not exist"),
                                               ("not a model", "owner/name"),
                                               ("nobody/no-such-judge", "local Hugging Face cache")])
def test_bad_judge_fails_before_the_model_load(judge, needle, models, tmp_path, capsys, monkeypatch):
    """--judge is checked before the (slow) model load, not after the patching steps."""
    import refusal_lab.models.loading as loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --judge was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    rc, _, err = run_main(capsys, ["run", "--model", models["chat"], "--judge", judge, "--out", out, "--quiet"])
    assert_one_line_error(rc, err, "--judge", needle)
    assert not out.exists()
    cfg = write(tmp_path / "cfg.json", {"judge": judge})  # the same from a --config file
    rc, _, err = run_main(capsys, ["run", "--model", models["chat"], "--config", cfg, "--out", out, "--quiet"])
    assert_one_line_error(rc, err, needle)
