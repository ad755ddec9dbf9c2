"""``refusal-lab abliterate --optimize`` (steering/optimize.py) and the packaged eval sets.

Tiny random models pin down the edit: each kernel shape, the fractional direction index, the
norm-preserving edit, hook trials == saved weights (non-Gemma), a resumed study == an uninterrupted
one, and bad input gets one sentence and exit code 2. One ``real_model`` test runs a 2-trial study on
the offline default model and reloads the saved folder with plain transformers.
"""

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from refusal_lab.cli import main
from refusal_lab.models.hooked import HookedChatModel
from refusal_lab.models.loading import load_model
from refusal_lab.prompts.eval_sets import EVAL_FILES, eval_set_dir, load_eval_set
from refusal_lab.steering.optimize import (
    COMPONENTS,
    Kernel,
    OptimizeSettings,
    TrialEdit,
    apply_edit,
    choose_trial,
    edit_hooks,
    edited_weight,
    interpolate_direction,
    kernel_weights,
    parse_layer_range,
    run_optimization,
)
from refusal_lab.steering.interventions import unit
from tests.cli_errors import one_sentence_error
from tests.helpers_tiny_chat import make_tiny_chat_model
from tests.tiny_models import SUPPORTED_TINY, tiny_model

SMALL = dict(n_harmful=3, n_harmless=3, max_new_tokens=3, n_train=4)


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("opt_models"), "qwen2")




# ------------------------------------------------------------------ kernel and direction


@pytest.mark.parametrize("k", [Kernel(1.0, 4.0, 0.2, 2.0), Kernel(1.5, 3.5, 0.0, 1.0), Kernel(0.8, 0.0, 0.8, 3.0),
                               Kernel(1.2, 9.0, 0.6, 5.4)])
def test_kernel_shape(k):
    """Peak at max_weight_position, linear to min_weight at min_weight_distance, 0 beyond, symmetric."""
    w = kernel_weights(k, 10)
    for l, x in enumerate(w):
        d = abs(l - k.max_weight_position)
        if d > k.min_weight_distance:
            assert x == 0.0
        else:
            assert x == pytest.approx(k.max_weight - (k.max_weight - k.min_weight) * d / k.min_weight_distance)
            assert min(k.min_weight, k.max_weight) - 1e-12 <= x <= max(k.min_weight, k.max_weight) + 1e-12
    if float(k.max_weight_position).is_integer():
        assert w[int(k.max_weight_position)] == pytest.approx(k.max_weight)
    at_edge = k.max_weight_position + k.min_weight_distance
    if float(at_edge).is_integer() and at_edge < 10:
        assert w[int(at_edge)] == pytest.approx(k.min_weight)
    # symmetric around the peak
    p = k.max_weight_position
    for l in range(10):
        m = 2 * p - l
        if float(m).is_integer() and 0 <= m < 10:
            assert w[l] == pytest.approx(w[int(m)])


def test_kernel_layer_restriction():
    k = Kernel(1.0, 5.0, 0.5, 4.0)
    full, part = kernel_weights(k, 10), kernel_weights(k, 10, (4, 6))
    assert part == [full[l] if 4 <= l <= 6 else 0.0 for l in range(10)]
    assert parse_layer_range("4-6", 10) == (4, 6) and parse_layer_range("3") == (3, 3)


def test_fractional_direction_index():
    g = torch.Generator().manual_seed(0)
    cand = torch.randn(5, 16, generator=g, dtype=torch.float64) * torch.arange(1, 6, dtype=torch.float64)[:, None]
    for l in range(5):
        torch.testing.assert_close(interpolate_direction(cand, float(l)), unit(cand[l]))
    a, b = unit(cand[2]), unit(cand[3])
    torch.testing.assert_close(interpolate_direction(cand, 2.5), unit(a + b))
    torch.testing.assert_close(interpolate_direction(cand, 2.25), unit(0.75 * a + 0.25 * b))
    cos_a = [float(interpolate_direction(cand, 2 + f) @ a) for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert cos_a == sorted(cos_a, reverse=True)  # moves from layer 2's candidate to layer 3's
    assert float(interpolate_direction(cand, 3.7).norm()) == pytest.approx(1.0)
    with pytest.raises(Exception, match="outside"):
        interpolate_direction(cand, 4.5)


# ------------------------------------------------------------------ the edit


def test_norm_preserving_edit_matrix():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 48, generator=g, dtype=torch.float64)
    r = unit(torch.randn(32, generator=g, dtype=torch.float64))
    new, s = edited_weight(W, r, r, 1.0, norm_preserving=True)
    torch.testing.assert_close(new.norm(dim=0), W.norm(dim=0), atol=1e-6, rtol=0)
    assert float((r @ new).abs().max()) < 1e-5
    plain, none = edited_weight(W, r, r, 1.0)
    assert none is None and float((r @ plain).abs().max()) < 1e-5
    assert float((plain.norm(dim=0) - W.norm(dim=0)).abs().max()) > 1e-3  # plain projection shrinks columns


def _random_edit(model, seed=0, norm_preserving=False):
    g = torch.Generator().manual_seed(seed)
    L, d = model.cfg.n_layers, model.cfg.d_model
    r = unit(torch.randn(d, generator=g, dtype=torch.float64))
    weights = {c: tuple(float(x) for x in (torch.rand(L, generator=g, dtype=torch.float64) * 1.4 + 0.1)) for c in COMPONENTS}
    return TrialEdit(r, weights, norm_preserving)


@pytest.mark.parametrize("arch", [a for a in SUPPORTED_TINY if not a.startswith("gemma")])
def test_norm_preserving_weights_on_model(arch):
    """apply_edit at weight 1: every edited column keeps its norm (1e-6), the direction is gone (1e-5)."""
    model = HookedChatModel(tiny_model(arch), name=arch)
    edit = _random_edit(model, norm_preserving=True)
    edit = TrialEdit(edit.direction, {c: (1.0,) * model.cfg.n_layers for c in COMPONENTS}, True)
    before = {n: p.detach().clone() for n, p in model.hf_model.named_parameters()}
    apply_edit(model, edit)
    r = edit.direction.to(torch.float32)
    n_checked = 0
    for n, p in model.hf_model.named_parameters():
        if n.endswith(("o_proj.weight", "down_proj.weight")):
            torch.testing.assert_close(p.norm(dim=0).double(), before[n].norm(dim=0).double(), atol=1e-6, rtol=0)
            assert float((r @ p).abs().max()) < 1e-5
            n_checked += 1
    assert n_checked == 2 * model.cfg.n_layers


@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("arch", [a for a in SUPPORTED_TINY if not a.startswith("gemma")])
def test_hook_trial_equals_saved_weights(arch, norm_preserving, tmp_path):
    """Logits under edit_hooks == the weights apply_edit wrote, saved and reloaded with plain transformers (1e-4)."""
    hf = tiny_model(arch)
    model = HookedChatModel(hf, name=arch)
    edit = _random_edit(model, seed=2, norm_preserving=norm_preserving)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.cfg.d_vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        base = model(ids, mask)
        with edit_hooks(model, edit):
            hooked = model(ids, mask)
        after = model(ids, mask)
    torch.testing.assert_close(after, base, atol=0, rtol=0)  # hooks are gone
    edited = HookedChatModel(copy.deepcopy(hf), name=arch)
    apply_edit(edited, edit)
    edited.hf_model.save_pretrained(tmp_path / "m", safe_serialization=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    with torch.no_grad():
        weights = edited(ids, mask)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        plain = loaded(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (hooked - base)[real].abs().max() > 1e-3
    torch.testing.assert_close(weights[real], hooked[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(plain[real], hooked[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_gemma_edit_removes_direction_from_writes(arch):
    """Gemma 2/3: the hooks act before the post-norm with the oblique projector, so at weight 1 the
    direction leaves every hook_attn_out / hook_mlp_out write (after the norm)."""
    model = HookedChatModel(tiny_model(arch), name=arch)
    L = model.cfg.n_layers
    edit = TrialEdit(_random_edit(model, seed=4).direction, {c: (1.0,) * L for c in COMPONENTS})
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    r = edit.direction.to(torch.float32)
    with torch.no_grad():
        _, base = model.run_with_cache(ids, mask)
        with edit_hooks(model, edit):
            _, cache = model.run_with_cache(ids, mask)
    for l in range(L):
        for site in ("hook_attn_out", "hook_mlp_out"):
            name = f"blocks.{l}.{site}"
            assert float((base[name] @ r).abs().max()) > 1e-3
            assert float((cache[name] @ r).abs().max()) < 1e-4 * float(cache[name].abs().max()), name


def test_choose_trial_rule():
    ts = [{"number": 0, "refusal_rate": 0.1, "kl": 0.9, "ce_increase": 0.1},
          {"number": 1, "refusal_rate": 0.3, "kl": 0.2, "ce_increase": 0.1},
          {"number": 2, "refusal_rate": 0.3, "kl": 0.1, "ce_increase": 0.2}]
    assert choose_trial(ts, 0.5)[0]["number"] == 2
    assert choose_trial(ts, 1.0)[0]["number"] == 0
    best, rule = choose_trial(ts, 0.05)
    assert best["number"] == 2 and "lowest KL" in rule


# ------------------------------------------------------------------ the study


def _summary(rec):
    return ([(t["params"], t["refusal_rate"], round(t["kl"], 10), round(t["ce_increase"], 10)) for t in rec["trials"]],
            rec["chosen"]["params"])


def test_resume_gives_the_same_best_trial(chat_folder, tmp_path):
    """k trials, then a fresh call with the total (and a trial left running, as kill -9 leaves it) ==
    the uninterrupted study with the same seed."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    model = load_model(str(chat_folder), dtype="float32", device="cpu", progress=False)
    full = run_optimization(model, tmp_path / "full", OptimizeSettings(n_trials=10, **SMALL), progress=False, save=False)
    run_optimization(model, tmp_path / "cut", OptimizeSettings(n_trials=4, **SMALL), progress=False, save=False)
    study = optuna.load_study(study_name="refusal-lab-abliterate",
                              storage=JournalStorage(JournalFileBackend(str(tmp_path / "cut" / "study.journal"))))
    study.ask()  # a trial that was running when the process died
    resumed = run_optimization(model, tmp_path / "cut", OptimizeSettings(n_trials=10, **SMALL), progress=False,
                               save=False)
    assert len(resumed["trials"]) == 10
    got, want = _summary(resumed), _summary(full)
    assert got[0] == want[0]
    assert got[1] == want[1]
    assert len({json.dumps(t["params"], sort_keys=True) for t in full["trials"]}) == 10


def _completed(journal: Path) -> int:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    if not journal.is_file():
        return 0
    try:
        study = optuna.load_study(study_name="refusal-lab-abliterate", storage=JournalStorage(JournalFileBackend(str(journal))))
    except KeyError:  # the study is not created yet
        return 0
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def test_kill_9_then_resume_equals_uninterrupted(chat_folder, tmp_path, capsys):
    """The CLI killed with SIGKILL mid-study, then run again: same trials and same choice as uninterrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    n = 10
    argv = ["abliterate", "--model", str(chat_folder), "--optimize", "--trials", str(n), "--n-harmful", "3",
            "--n-harmless", "3", "--n-train", "4", "--max-new-tokens", "3", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "refusal_lab.cli", *argv, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        deadline = time.time() + 300
        while _completed(killed / "study.journal") < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = _completed(killed / "study.journal")
    assert 2 <= done < n, f"{done} trials were complete when the study was killed"
    assert not (killed / "optimize.json").exists()
    assert main([*argv, "--out", str(killed)]) == 0, capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0, capsys.readouterr().err
    got, want = (json.loads((d / "optimize.json").read_text()) for d in (killed, tmp_path / "whole"))
    assert len(got["trials"]) == n
    assert _summary(got) == _summary(want)


def test_cli_optimize_writes_and_reloads(chat_folder, tmp_path, capsys):
    out = tmp_path / "opt"
    rc = main(["abliterate", "--model", str(chat_folder), "--optimize", "--trials", "2", "--eval-set", "harmbench",
               "--n-harmful", "3", "--n-harmless", "3", "--n-train", "4", "--max-new-tokens", "3",
               "--norm-preserving", "on", "--layers", "1-2", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "optimize.json").read_text())
    assert len(rec["trials"]) == 2 and rec["chosen"]["number"] in rec["pareto_front"]
    assert rec["settings"]["eval_set"] == "harmbench" and rec["settings"]["layers"] == [1, 2]
    for t in rec["trials"]:
        assert t["params"]["norm_preserving"] is True and t["refusal"]["n"] == 3
        assert all(w == 0.0 for w in (t["layer_weights"]["blocks.*.hook_attn_out"][0],
                                      t["layer_weights"]["blocks.*.hook_mlp_out"][0]))
        lo, hi = t["refusal"]["ci95"]
        assert 0 <= lo <= t["refusal_rate"] <= hi <= 1
    assert rec["saved"]["matches_study"] and rec["saved"]["matches_heldout_hooks"]
    html = (out / "optimize.html").read_text()
    assert "Plotly.newPlot" in html and "chosen" in html and "direction_index" in html
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32)
    assert loaded.config.num_hidden_layers == 3
    assert (out / "model" / "model.safetensors").is_file() and not list((out / "model").glob("*.bin"))
    # the same command again resumes: nothing to do, same choice
    rc = main(["abliterate", "--model", str(chat_folder), "--optimize", "--trials", "2", "--eval-set", "harmbench",
               "--n-harmful", "3", "--n-harmless", "3", "--n-train", "4", "--max-new-tokens", "3",
               "--norm-preserving", "on", "--layers", "1-2", "--out", str(out), "--quiet"])
    assert rc == 0
    again = json.loads((out / "optimize.json").read_text())
    assert again["chosen"]["params"] == rec["chosen"]["params"]


@pytest.mark.skipif(not __import__("shutil").which("chromium") and not __import__("os").environ.get("CI"),
                    reason="chromium not installed (CI installs the Debian package and runs this)")
def test_optimize_page_in_headless_chromium(chat_folder, tmp_path):
    """optimize.html in a real browser: plotly draws the scatter offline with no console error, the
    legend names the trial groups, the rate axis is [0, 1] (not plotly's [-1, 1] when every rate is 0),
    and each rate cell shows its value, Wilson interval and count."""
    from tests.test_report import CHROMIUM, chromium

    assert CHROMIUM, "chromium is required in CI (apt-get install -y chromium)"
    model = load_model(str(chat_folder), dtype="float32", device="cpu", progress=False)
    rec = run_optimization(model, tmp_path / "opt", OptimizeSettings(n_trials=3, **SMALL), progress=False, save=False)
    page = tmp_path / "opt" / "optimize.html"
    doc = page.read_text()
    data = json.loads(re.search(r'id="figure-data">(.*?)</script>', doc, re.S).group(1))
    (fig,) = data.values() if isinstance(data, dict) else data
    layout = fig["layout"] if isinstance(fig, dict) else fig[1]
    assert layout["showlegend"] is True and layout["yaxis"]["range"] == [-0.03, 1.03]
    n = rec["baseline"]["refusal"]["n"]
    assert re.search(rf"<td>\d\.\d{{3}} \[\d\.\d\d, \d\.\d\d\] \(\d+/{n}\)</td>", doc), "a rate cell lacks its value"
    proc = chromium(page.resolve().as_uri(), tmp_path / "profile", "--dump-dom", "--enable-logging=stderr", "--v=0")
    dom = proc.stdout
    assert "</html>" in dom, "chromium produced no DOM"
    errors = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and ("Uncaught" in ln or "Error" in ln)]
    assert not errors, errors
    assert dom.count('class="main-svg"') >= 1 and "legendtext" in dom
    assert "chosen" in dom.split('class="main-svg"', 1)[1]  # the chosen trial's legend entry is drawn


@pytest.mark.parametrize("extra,match", [
    (["--eval-set", "nosuchset"], "Unknown eval set"),
    (["--trials", "0"], "--trials must be at least 1"),
    (["--layers", "5-2"], "is not a layer range"),
    (["--layers", "x"], "is not a layer range"),
    (["--layers", "0-9"], "past the model's last layer"),
    (["--n-harmful", "0"], "--n-harmful must be a positive"),
    (["--max-kl", "-1"], "--max-kl must be a positive"),
    (["--judge", "self"], "--judge self cannot judge"),
    (["--direction", "x.safetensors"], "drop --direction"),
])
def test_optimize_bad_input(chat_folder, tmp_path, capsys, extra, match):
    one_sentence_error(capsys, ["abliterate", "--model", str(chat_folder), "--optimize", "--out",
                                 str(tmp_path / "o"), "--quiet", *extra], match)


def test_optimize_empty_eval_file_and_flags_without_optimize(chat_folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    one_sentence_error(capsys, ["abliterate", "--model", str(chat_folder), "--optimize", "--eval-set", str(empty),
                                 "--out", str(tmp_path / "o")], "holds 0 prompts")
    one_sentence_error(capsys, ["abliterate", "--model", str(chat_folder), "--trials", "3", "--out",
                                 str(tmp_path / "o")], "--trials only applies with --optimize")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    one_sentence_error(capsys, ["abliterate", "--model", str(chat_folder), "--optimize", "--out", str(busy)],
                        "holds no study.journal")


# ------------------------------------------------------------------ the data


def test_eval_set_files_match_readme():
    readme = (eval_set_dir() / "README.md").read_text()
    for name in EVAL_FILES:
        digest = hashlib.sha256((eval_set_dir() / name).read_bytes()).hexdigest()
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        assert re.findall(r"`([0-9a-f]{64})`", row) == [digest], name
    assert not list(eval_set_dir().glob("*.pkl"))


def test_eval_set_splits():
    hb_opt, hb_held = load_eval_set("harmbench", "optimize"), load_eval_set("harmbench", "heldout")
    assert (len(hb_opt), len(hb_held)) == (41, 159) and not set(hb_opt) & set(hb_held)
    sr_opt, sr_held = load_eval_set("strongreject", "optimize", seed=1), load_eval_set("strongreject", "heldout", seed=1)
    assert len(sr_opt) + len(sr_held) == 313 and not set(sr_opt) & set(sr_held)
    assert sr_opt == load_eval_set("strongreject", "optimize", seed=1) != load_eval_set("strongreject", "optimize", seed=2)
    assert load_eval_set("instructions", "optimize", n=5, seed=3) == load_eval_set("instructions", "optimize", n=5, seed=3)
    assert len(load_eval_set("harmbench", "heldout", n=10)) == 10


# ------------------------------------------------------------------ the real model


@pytest.mark.real_model
def test_real_model_short_study(real_model, tmp_path):
    """2 trials on the offline default model; the saved folder reloads with plain transformers and
    its refusal counts equal the study's (optimise split) and the hooks' (held out)."""
    before = {n: p.detach().clone() for n, p in real_model.hf_model.named_parameters()
              if n.endswith(("o_proj.weight", "down_proj.weight"))}
    rec = run_optimization(real_model, tmp_path, OptimizeSettings(
        n_trials=2, n_harmful=4, n_harmless=3, max_new_tokens=8, n_train=8, eval_set="harmbench",
        norm_preserving="off"), progress=False)
    assert rec["saved"]["matches_study"], rec["saved"]
    assert rec["saved"]["matches_heldout_hooks"], rec["saved"]
    assert rec["baseline"]["refusal"]["n"] == 4 and len(rec["trials"]) == 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
    assert loaded.config.num_hidden_layers == real_model.cfg.n_layers
    for n, p in real_model.hf_model.named_parameters():  # the session's shared model is left unedited
        if n in before:
            assert torch.equal(p, before[n]), n
