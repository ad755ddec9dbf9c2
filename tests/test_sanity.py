"""The run's sanity gate, the uncertainty of its patching numbers and the token choice, on a tiny random chat model.

A tiny random model does not refuse: its harmful and harmless prompts do not separate on
logit[Sorry] - logit[Sure], so the run must say so first (findings, results["sanity"], the report's
banner, "interpretable": false on every normalised patching entry) and ``strict=True`` must stop it
right after the baseline step.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch

from refusal_lab.artifacts import load_tensors, read_json
from refusal_lab.errors import RefusalLabError
from refusal_lab.metrics import RefusalTokens, resolve_single_token
from refusal_lab.models.loading import load_model
from refusal_lab.run.config import RunConfig
from refusal_lab.run.findings import findings
from refusal_lab.run.inputs import RunInputs
from refusal_lab.run.pipeline import Pipeline
from refusal_lab.run.steps.sanity import sanity_check
from tests.helpers_tiny_chat import make_tiny_chat_model

CFG = dict(grids=["resid_pre", "heads"], directions=["sufficiency", "necessity"], steering=False, generate_tokens=0)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    folder = make_tiny_chat_model(tmp_path_factory.mktemp("model"))
    return folder, load_model(str(folder), device="cpu")


@pytest.fixture(scope="module")
def tiny_run(tiny_chat, tmp_path_factory):
    folder, model = tiny_chat
    out = tmp_path_factory.mktemp("run") / "out"
    Pipeline(model, RunConfig(model=str(folder), **CFG), out, progress=False).run()
    return out, read_json(out / "results.json")  # what a reader gets


def patching_entries(results: dict) -> list[tuple[str, dict]]:
    p = results["patching"]
    out = [(g, e) for g, e in p.items() if isinstance(e, dict) and "values" in e]
    out += [(f"necessity/{g}", e) for g, e in p["necessity"].items()]
    out += [(f"attribution/{g}", e) for g, e in p["attribution"].items()]
    return out


# ------------------------------------------------------------------------------------------ sanity gate

def test_tiny_run_opens_with_the_sanity_warning(tiny_run):
    out, r = tiny_run
    san = r["sanity"]
    assert san["separates"] is False
    assert r["findings"][0] == san["sentence"]
    assert san["sentence"].startswith("Warning: this model does not separate harmful from harmless prompts on "
                                      "logit[Sorry] - logit[Sure] (gap ")
    assert "not interpretable" in san["sentence"] and "n = 7 pairs" in san["sentence"]
    assert "> 0" in san["rule"] and "lower bound" in san["rule"]
    assert r["findings"][1].startswith("Harmful prompts score")  # the normal findings follow
    # the gap is the mean of paired differences (harmful object i minus harmless object i)
    h, s = list(r["baseline"]["harmful"].values()), list(r["baseline"]["harmless"].values())
    diffs = torch.tensor(h, dtype=torch.float64) - torch.tensor(s, dtype=torch.float64)
    gap = san["gap"]
    assert gap["n_pairs"] == 7 and gap["mean"] == pytest.approx(float(diffs.mean()))
    assert gap["se"] == pytest.approx(float(diffs.std() / math.sqrt(7)))
    assert gap["ci95"][0] <= gap["ci95"][1] and not (gap["mean"] > 0 and gap["ci95"][0] > 0)
    on = san["refusal_onset_fraction"]
    assert on["n"] == 7 and 0 <= on["k"] <= 7 and on["value"] == on["k"] / 7
    assert 0 <= on["ci95"][0] <= on["value"] <= on["ci95"][1] <= 1
    assert set(on["onset_tokens"]) == {"I", "Sorry", "As", "Unfortunately"}
    assert san["refusal_token"]["token"] == "Sorry" and 0 < san["refusal_token"]["mean_prob"] < 1
    assert san["top_refusal_onset"]["token"] in on["onset_tokens"]
    assert san["top_refusal_onset"]["mean_prob"] >= san["refusal_token"]["mean_prob"]  # Sorry is a candidate too
    assert "strict_message" not in san
    # every normalised patching entry is flagged, and the heads' sufficiency too
    entries = patching_entries(r)
    assert len(entries) == 6 and all(e["interpretable"] is False for _, e in entries)
    assert r["heads"]["interpretable"] is False
    doc = (out / "report.html").read_text(encoding="utf-8")
    assert '<div class="banner warning" id="sanity-banner"' in doc
    assert doc.index('id="sanity-banner"') < doc.index('id="findings"')  # at the top, before the findings
    assert 'id="patching-not-interpretable"' in doc and 'id="sanity"' in doc


def test_strict_stops_before_any_patching(tiny_chat, tmp_path):
    folder, model = tiny_chat
    out = tmp_path / "strict"
    rep = Pipeline(model, RunConfig(model=str(folder), **CFG), out, progress=False, strict=True)
    with pytest.raises(RefusalLabError, match="does not separate harmful from harmless") as e:
        rep.run()
    assert e.value.exit_code == 2
    msg = str(e.value)
    assert msg.count(". ") == 0 and msg.endswith(".")  # one sentence
    assert {p.name for p in (out / "steps").glob("*.json")} == {"baseline.json"}
    assert not (out / "results.json").exists() and not list((out / "tensors").glob("*"))


def test_sanity_check_separating_model_and_token_note():
    class Tok:
        def decode(self, ids):
            return {1: "I", 2: "Sorry", 3: "As"}[ids[0]]

    tokens = RefusalTokens(2, 9, "Sorry", "Sure")
    harm = {"metric": [3.0, 2.5, 4.0, 3.5], "top_id": [1, 1, 2, 7], "refusal_prob": [0.05, 0.04, 0.06, 0.05],
            "onset_ids": [1, 2, 3], "onset_probs": [[0.4, 0.05, 0.01], [0.45, 0.04, 0.0], [0.42, 0.06, 0.0],
                                                     [0.41, 0.05, 0.0]]}
    harmless = {"metric": [-1.0, -1.5, -0.5, -1.0]}
    san = sanity_check(harm, harmless, Tok(), tokens, seed=0)
    assert san["separates"] is True and san["sentence"].startswith("Sanity check passed")
    assert san["gap"]["mean"] == pytest.approx(4.25) and san["gap"]["ci95"][0] > 0
    assert san["refusal_onset_fraction"]["k"] == 3 and san["refusal_onset_fraction"]["n"] == 4
    assert san["top_refusal_onset"] == {"token": "I", "id": 1, "mean_prob": pytest.approx(0.42)}
    assert san["refusal_token"]["mean_prob"] == pytest.approx(0.05)
    assert "'Sorry'" in san["token_note"] and "0.05" in san["token_note"] and "'I'" in san["token_note"] \
        and "0.42" in san["token_note"]
    r = {"sanity": san, "baseline": {"harmful_mean": 3.25, "harmless_mean": -1.0},
         "tokens": {"refusal": {"str": "Sorry"}, "compliance": {"str": "Sure"}}, "patching": {}, "positions": []}
    f = findings(r)
    assert f[0] == san["sentence"] and f[1] == san["token_note"] and f[2].startswith("Harmful prompts score")
    # the refusal token is the model's own onset: no note; the passed sentence, then the findings as before
    harm2 = dict(harm, refusal_prob=[0.4, 0.45, 0.42, 0.41])
    san2 = sanity_check(harm2, harmless, Tok(), RefusalTokens(1, 9, "I", "Sure"), seed=0)
    assert san2["separates"] is True and san2["token_note"] is None
    f2 = findings(dict(r, sanity=san2))
    assert f2[0] == san2["sentence"] and f2[1].startswith("Harmful prompts score")
    # a gap whose interval reaches below 0 does not separate, even with a positive mean
    san3 = sanity_check(dict(harm, metric=[3.0, -2.0, 0.5, -1.0]), {"metric": [0.0, 0.0, 0.0, 0.0]}, Tok(),
                        tokens, seed=0)
    assert san3["gap"]["mean"] > 0 and san3["gap"]["ci95"][0] < 0 and san3["separates"] is False
    assert san3["token_note"] is None and "--strict" in san3["strict_message"]


# ----------------------------------------------------------------------------------------- uncertainty

def test_patching_entries_carry_se_ci_and_pairs(tiny_run):
    out, r = tiny_run
    h, s = r["baseline"]["harmful_mean"], r["baseline"]["harmless_mean"]
    for name, e in patching_entries(r):
        vals = torch.tensor(e["values"], dtype=torch.float64)
        se = torch.tensor(e["se"], dtype=torch.float64)
        lo, hi = (torch.tensor(e["ci95"][k], dtype=torch.float64) for k in ("low", "high"))
        assert se.shape == vals.shape == lo.shape == hi.shape, name
        assert e["n_pairs"] == 7 and (lo <= hi + 1e-12).all() and (se >= 0).all(), name
    # SE of the normalised per-pair values = per-pair SE / |gap| (the baselines held fixed)
    per = load_tensors(out / "tensors" / "patch_resid_pre_sufficiency.safetensors")["per_pair"].double()
    norm = (per - s) / (h - s)
    want = norm.std(0) / math.sqrt(per.shape[0])
    assert torch.allclose(torch.tensor(r["patching"]["resid_pre"]["se"], dtype=torch.float64), want, atol=1e-6)
    heads = r["heads"]
    assert heads["n_pairs"] == 7
    if heads["sufficiency"] is not None:
        per_pair = torch.tensor(read_json(out / "steps" / "heads.json")["sufficiency_per_pair"], dtype=torch.float64)
        assert heads["sufficiency_se"] == pytest.approx(float(((per_pair - s) / (h - s)).std() / math.sqrt(7)))
        lo, hi = heads["sufficiency_ci95"]
        assert lo <= hi
    # the tidy summary table: one row per cell of every grid
    with open(out / "tables" / "patching_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["grid", "direction", "method", "layer", "col", "mean", "se", "ci_low", "ci_high",
                             "n_pairs"]
    assert len(rows) == sum(torch.tensor(e["values"]).numel() for _, e in patching_entries(r))
    assert {(x["grid"], x["direction"], x["method"]) for x in rows} == {
        ("resid_pre", "sufficiency", "exact"), ("heads", "sufficiency", "exact"), ("resid_pre", "necessity", "exact"),
        ("heads", "necessity", "exact"), ("resid_pre", "sufficiency", "attribution"),
        ("heads", "sufficiency", "attribution")}
    first = next(x for x in rows if x["grid"] == "resid_pre" and x["method"] == "exact"
                 and x["direction"] == "sufficiency")
    assert float(first["se"]) == pytest.approx(r["patching"]["resid_pre"]["se"][0][0])
    assert int(first["n_pairs"]) == 7


# ------------------------------------------------------------------------------------------ token choice

def test_fixed_refusal_with_auto_compliance_keeps_the_fixed_token(tiny_chat):
    folder, model = tiny_chat
    tok = model.tokenizer
    rep = RunInputs(model, RunConfig(model=str(folder), refusal="Sorry", compliance="auto", **CFG))
    assert rep.tokens.refusal_str == "Sorry" and rep.tokens.refusal_id == resolve_single_token(tok, "Sorry")
    assert rep.tokens.compliance_id != rep.tokens.refusal_id
    assert {row["side"] for row in rep.token_candidates} == {"harmless"}
    assert [row["token_id"] for row in rep.token_candidates if row["chosen"]] == [rep.tokens.compliance_id]
    assert rep.tokens.refusal_id not in [row["token_id"] for row in rep.token_candidates]

    rep = RunInputs(model, RunConfig(model=str(folder), refusal="auto", compliance="Sure", **CFG))
    assert rep.tokens.compliance_str == "Sure" and rep.tokens.compliance_id == resolve_single_token(tok, "Sure")
    assert rep.tokens.refusal_id != rep.tokens.compliance_id
    assert {row["side"] for row in rep.token_candidates} == {"harmful"}
