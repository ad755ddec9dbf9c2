"""``refusal-lab abliterate``: tiny chat models saved to folders (tests/helpers_tiny_chat.py).

The written folder loads with plain transformers and its logits equal the hook-ablated original's
(Llama/Qwen); the direction file and abliteration.json describe what was done; bad input gets one
sentence and exit code 2.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from refusal_lab.cli import main
from refusal_lab.models.hooked import HookedChatModel
from refusal_lab.models.loading import load_model
from refusal_lab.prompts import build_instruction_prompts, load_instructions
from refusal_lab.steering.interventions import ablation_hooks
from refusal_lab.steering.vectors import diff_in_means, load_vector, save_vector
from tests.cli_errors import one_sentence_error
from tests.helpers_tiny_chat import make_tiny_chat_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("abl_models")
    return {arch: make_tiny_chat_model(base, arch) for arch in ("qwen2", "llama", "gemma2")}


def _prompts(model, n=4):
    return build_instruction_prompts(model.tokenizer, load_instructions("val", "harmful", n=n, seed=1))


def _assert_equals_hook_ablation(original_folder, out, direction):
    """Logits of the saved folder (plain transformers) == hook-ablated original (1e-4)."""
    orig = load_model(str(original_folder), dtype="float32", device="cpu")
    ids, mask = _prompts(orig)
    with torch.no_grad():
        want = orig(ids, mask, fwd_hooks=ablation_hooks(orig, direction))
        base = orig(ids, mask)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        got = loaded(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (want - base)[real].abs().max() > 1e-3  # the ablation changes something
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)




def test_computed_direction_equals_hook_ablation(folders, tmp_path, capsys):
    out = tmp_path / "abl"
    rc = main(["abliterate", "--model", str(folders["qwen2"]), "--layer", "1", "--position", "last",
               "--n-train", "8", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "layer 1" in cap.out and "exact: true" in cap.out
    assert "difference in means at blocks.1.hook_resid_pre, column -1" in cap.err  # progress
    for f in ("config.json", "model.safetensors", "tokenizer.json", "refusal_direction.safetensors",
              "abliteration.json"):
        assert (out / f).is_file(), f
    info = json.loads((out / "abliteration.json").read_text())
    assert info["layer"] == 1 and info["position"] == -1 and info["exact"] is True
    assert info["model"] == str(folders["qwen2"]) and "train split: 8 harmful + 8 harmless" in info["dataset"]
    assert "difference in means" in info["method"]

    v, meta = load_vector(out / "refusal_direction.safetensors")
    assert meta["layer"] == 1 and meta["position"] == -1 and meta["site"] == "hook_resid_pre"
    orig = load_model(str(folders["qwen2"]), dtype="float32", device="cpu")
    tok = orig.tokenizer
    hf = build_instruction_prompts(tok, load_instructions("train", "harmful", n=8, seed=0))
    hl = build_instruction_prompts(tok, load_instructions("train", "harmless", n=8, seed=0))
    torch.testing.assert_close(v, diff_in_means(orig, *hf, *hl, layer=1, position=-1))
    _assert_equals_hook_ablation(folders["qwen2"], out, v)


def test_default_layer_and_position_are_printed(folders, tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["abliterate", "--model", str(folders["gemma2"]), "--n-train", "4", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "layer: 2 of 3 (default round(0.6 * n_layers)" in err  # round(1.8)
    assert "position: -1 = last end-of-instruction token" in err
    assert "rms(x)/rms(Px)" in err  # Gemma: not exact, and says why
    info = json.loads((out / "abliteration.json").read_text())
    assert info["exact"] is False and "rms(x)/rms(Px)" in info["exact_reason"] and info["layer"] == 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert loaded.config.model_type == "gemma2" and not loaded.config.tie_word_embeddings


def test_given_direction_in_a_subprocess(folders, tmp_path):
    orig = load_model(str(folders["llama"]), dtype="float32", device="cpu")
    d = torch.randn(orig.cfg.d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    path = save_vector(tmp_path / "dir.safetensors", d, {"layer": 2, "position": -1, "dataset": "made up"})
    out = tmp_path / "abl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "refusal_lab.cli", "abliterate", "--model", str(folders["llama"]),
                           "--direction", str(path), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""  # --quiet: no progress, no bars
    assert proc.stdout.strip().startswith(f"wrote {out}")
    info = json.loads((out / "abliteration.json").read_text())
    assert info["layer"] == 2 and info["dataset"] == "made up" and info["exact"] is True
    torch.testing.assert_close(load_vector(out / "refusal_direction.safetensors")[0], d)
    _assert_equals_hook_ablation(folders["llama"], out, d)


def test_bad_inputs_one_sentence_exit_2(folders, tmp_path, capsys):
    model = str(folders["qwen2"])
    one_sentence_error(capsys, ["abliterate", "--model", model, "--direction", str(tmp_path / "nope.safetensors"),
                                 "--out", str(tmp_path / "o1")], "does not exist")
    wrong = save_vector(tmp_path / "wrong.safetensors", torch.ones(32))
    one_sentence_error(capsys, ["abliterate", "--model", model, "--direction", str(wrong), "--out",
                                 str(tmp_path / "o2"), "--quiet"], "d_model is 64")
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a tensor file")
    one_sentence_error(capsys, ["abliterate", "--model", model, "--direction", str(junk), "--out",
                                 str(tmp_path / "o3")], "is not a direction file")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    one_sentence_error(capsys, ["abliterate", "--model", model, "--out", str(full)], "is not empty")
    one_sentence_error(capsys, ["abliterate", "--model", model, "--direction", str(wrong), "--layer", "1",
                                 "--out", str(tmp_path / "o4")], "--direction gives the direction itself")
    one_sentence_error(capsys, ["abliterate", "--model", model, "--position", "-7", "--out",
                                 str(tmp_path / "o5"), "--quiet"], "is not an end-of-instruction column")
    one_sentence_error(capsys, ["abliterate", "--model", model, "--layer", "9", "--out",
                                 str(tmp_path / "o6"), "--quiet"], "layers 0..2")
    # nothing was written by the failed runs
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))
    # --force writes into the non-empty folder (other files are kept)
    assert main(["abliterate", "--model", model, "--n-train", "4", "--out", str(full), "--force", "--quiet"]) == 0
    assert (full / "keep.txt").is_file() and (full / "model.safetensors").is_file()


@pytest.mark.real_model
def test_real_model_abliterated_folder_generates(tmp_path, capsys):
    """The offline model abliterated at one layer: the folder loads with plain transformers and
    greedy-generates on a harmful prompt."""
    out = tmp_path / "abl"
    assert main(["abliterate", "--layer", "14", "--n-train", "8", "--out", str(out), "--quiet"]) == 0
    info = json.loads((out / "abliteration.json").read_text())
    assert info["exact"] is True and info["layer"] == 14
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ins = load_instructions("test", "harmful", n=1, seed=0)[0]
    ids, mask = build_instruction_prompts(tok, [ins])
    with torch.no_grad():
        new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    text = tok.decode(new[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"\n{ins!r} -> {text!r}")
    assert text.strip()


def test_select_runs_the_real_selection_with_the_run_fallback(folders, tmp_path, capsys):
    """--select on a tiny random model, where every candidate fails induce > 0: the run's direction
    step policy (relax the filters, say so) applies instead of an error (regression), with --n-val
    val instructions, and abliteration.json holds the selection's layer/position."""
    from refusal_lab.steering.selection import DirectionPolicy, select_refusal_direction

    out = tmp_path / "abl"
    rc = main(["abliterate", "--model", str(folders["qwen2"]), "--select", "--n-train", "4", "--n-val", "3",
               "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    # 3 layers x 5 eoi columns, less layer 0's zero differences: the 10 the top-k mode scores
    assert "direction: scoring candidates" in cap.err and "/10 [" in cap.err
    assert "(4+4 train, 3+3 val prompts)" in cap.err and "note: All 10 candidate directions" in cap.err
    info = json.loads((out / "abliteration.json").read_text())
    assert "select_direction" in info["method"] and "selection on val: 3 + 3" in info["dataset"]
    sel = info["selection"]
    assert sel["fallback"].startswith("All 10 candidate directions were filtered out")
    assert sel["filters"]["stage"] in ("induce_relaxed", "layer_only")

    model = load_model(str(folders["qwen2"]), dtype="float32", device="cpu", progress=False)
    want = select_refusal_direction(model, DirectionPolicy(n_train=4, n_val=3), progress=False).result
    assert (info["layer"], info["position"]) == (want.layer, want.position)
    assert sel["filters"] == want.filters and sel["fallback"] == want.fallback
    assert f"selected layer {want.layer}, position {want.position}" in cap.err
    v, meta = load_vector(out / "refusal_direction.safetensors")
    torch.testing.assert_close(v, want.direction)
    assert meta["layer"] == want.layer and meta["position"] == want.position
    _assert_equals_hook_ablation(folders["qwen2"], out, v)

    capsys.readouterr()
    one_sentence_error(capsys, ["abliterate", "--model", str(folders["qwen2"]), "--select", "--layer", "1",
                                 "--out", str(tmp_path / "o")], "--select chooses the layer and position itself")
    one_sentence_error(capsys, ["abliterate", "--model", str(folders["qwen2"]), "--select", "--n-val", "0",
                                 "--out", str(tmp_path / "o")], "--n-val must be a positive number")


def test_quiet_reaches_the_model_loader(folders, tmp_path, monkeypatch):
    """--quiet passes progress=False to load_model (GGUF conversion and loading bars), else progress=True."""
    import refusal_lab.models.loading as loading

    seen = []
    real = loading.load_model

    def spy(*a, **kw):
        seen.append(kw.get("progress"))
        return real(*a, **kw)

    monkeypatch.setattr(loading, "load_model", spy)
    for i, extra in enumerate((["--quiet"], [])):
        assert main(["abliterate", "--model", str(folders["llama"]), "--n-train", "2", "--out",
                     str(tmp_path / f"o{i}"), *extra]) == 0
    assert seen == [False, True]
