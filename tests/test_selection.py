"""The direction policy: select_direction's candidate table, filters, choice, the fallback and the
all-filtered error (tiny models); the run and abliterate share DirectionPolicy's defaults."""

import math

import pytest
import torch

from refusal_lab.errors import RefusalLabError
from refusal_lab.steering.selection import DirectionPolicy, select_direction
from tests.conftest import random_batch

POS = (-3, -2, -1)


def _splits(model):
    return (random_batch(model, b=4, T=9, seed=1), random_batch(model, b=4, T=9, seed=2),
            random_batch(model, b=3, T=8, seed=3), random_batch(model, b=3, T=8, seed=4))


def _check_filters(res, L, kl_max, frac):
    for row in res.table:
        ok = row["kl"] < kl_max and row["induce"] > 0 and row["layer"] < frac * L
        assert row["kept"] == ok, row
        assert (row["reason"] == "kept") == ok


def test_table_filters_and_choice(tiny):
    refusal_ids = list(range(100))
    L = tiny.cfg.n_layers
    kl_max, frac = 5.0, 0.7
    res = select_direction(tiny, *_splits(tiny), positions=POS, refusal_ids=refusal_ids,
                           policy=DirectionPolicy(kl_max=kl_max, max_layer_frac=frac, exhaustive=True))
    assert len(res.table) == L * len(POS)
    assert {(r["layer"], r["position"]) for r in res.table} == {(l, p) for l in range(L) for p in POS}
    for r in res.table:
        assert set(r) >= {"layer", "position", "bypass", "induce", "kl", "kept", "reason"}
        assert all(math.isfinite(r[k]) for k in ("bypass", "induce", "kl"))
    _check_filters(res, L, kl_max, frac)
    assert not any(r["kept"] for r in res.table if r["layer"] >= frac * L)
    kept = [r for r in res.table if r["kept"]]
    assert res.bypass == min(r["bypass"] for r in kept)
    assert res.chosen["kept"] and res.chosen["bypass"] == res.bypass
    j = POS.index(res.position)
    assert torch.equal(res.direction, res.candidates[res.layer, j])


def test_mostly_positive_refusal_set_keeps_something(tiny):
    # P(R) ~ 100/128 for a near-uniform random model: induce > 0 holds, so candidates survive.
    res = select_direction(tiny, *_splits(tiny), positions=POS, refusal_ids=list(range(100)),
                           policy=DirectionPolicy(kl_max=float("inf"), max_layer_frac=1.0, exhaustive=True))
    _check_filters(res, tiny.cfg.n_layers, float("inf"), 1.0)
    assert any(r["kept"] for r in res.table)


def test_all_filtered_raises_clear_error(tiny):
    with pytest.raises(RefusalLabError, match=r"kl_max") as e:
        select_direction(tiny, *_splits(tiny), positions=POS, refusal_ids=list(range(100)),
                         policy=DirectionPolicy(kl_max=0.0, on_empty="raise", exhaustive=True))
    msg = str(e.value)
    n = tiny.cfg.n_layers * len(POS)
    assert f"All {n} candidate directions" in msg and "max_layer_frac" in msg
    assert not isinstance(e.value, AssertionError)


def test_all_filtered_fallback_best(tiny):
    """The policy's default fallback, on_empty="best" (the run's and abliterate's): the lowest bypass
    below the layer limit, with the reason."""
    L = tiny.cfg.n_layers
    res = select_direction(tiny, *_splits(tiny), positions=POS, refusal_ids=list(range(100)),
                           policy=DirectionPolicy(kl_max=1e-12, max_layer_frac=0.7, exhaustive=True))
    assert not any(r["kept"] for r in res.table)
    assert res.fallback and f"All {L * len(POS)} candidate directions" in res.fallback
    usable = [r for r in res.table if r["layer"] < 0.7 * L]
    assert res.bypass == min(r["bypass"] for r in usable) and res.layer < 0.7 * L


def test_policy_values_must_be_known():
    with pytest.raises(RefusalLabError, match="on_empty"):
        DirectionPolicy(on_empty="maybe")
    with pytest.raises(RefusalLabError, match="n_train and n_val must be positive"):
        DirectionPolicy(n_val=0)


def test_one_set_of_defaults(capsys):
    """The run (its config and steering settings) and abliterate (its CLI) choose the direction with
    the policy's defaults, and abliterate's help states them."""
    from refusal_lab.cli import build_parser
    from refusal_lab.run.config import RunConfig
    from refusal_lab.steering.pipeline import SteeringSettings

    p = DirectionPolicy()
    assert (p.n_train, p.n_val, p.seed, p.kl_max, p.max_layer_frac, p.induce_alpha, p.on_empty) == \
        (32, 16, 0, 0.1, 0.8, 1.0, "best")
    assert SteeringSettings().direction_policy() == p
    c = RunConfig()
    assert (c.steering_n_train, c.steering_n_val, c.seed, c.kl_max, c.max_layer_frac, c.steering_exhaustive,
            c.steering_top_k) == (p.n_train, p.n_val, p.seed, p.kl_max, p.max_layer_frac, p.exhaustive, p.top_k)
    args = build_parser().parse_args(["abliterate", "--out", "x"])
    assert args.n_train is None and args.n_val is None  # None = the policy's
    with pytest.raises(SystemExit):
        build_parser().parse_args(["abliterate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"each (default {p.n_train}," in text and f"--select (default {p.n_val}," in text


def test_choose_alpha():
    from refusal_lab.steering.pipeline import choose_alpha

    rows = [{"alpha": a, "induce_refusal_rate": r} for a, r in ((0.0, 0.1), (1.0, 0.3), (2.0, 0.6), (3.0, 0.9))]
    assert choose_alpha(rows)[0] == 2.0  # smallest alpha reaching 0.5
    rows = [{"alpha": a, "induce_refusal_rate": r} for a, r in ((0.0, 0.0), (1.0, 0.2), (2.0, 0.2), (3.0, 0.1))]
    alpha, why = choose_alpha(rows)
    assert alpha == 1.0 and "highest" in why  # none reaches 0.5: the best rate, ties to the smaller alpha
    assert choose_alpha([{"alpha": 0.0, "induce_refusal_rate": 0.0}])[0] == 1.0


def test_choose_candidate_relaxes_induce_first():
    """Every candidate filtered: first keep KL and layer filters with induce > the harmless baseline,
    then only the layer filter."""
    from refusal_lab.steering.selection import choose_candidate

    def row(l, p, bypass, induce, kl):
        reasons = [s for s, bad in ((f"kl {kl}", kl >= 0.1), (f"induce {induce}", induce <= 0),
                                    (f"layer {l}", l >= 8)) if bad]
        return {"layer": l, "position": p, "bypass": bypass, "induce": induce, "kl": kl,
                "kept": not reasons, "reason": "; ".join(reasons) or "kept"}

    table = [row(3, -1, -2.0, -0.7, 0.08), row(5, -1, -3.5, -0.5, 0.50), row(4, -2, -1.0, -2.9, 0.05),
             row(9, -1, -9.0, 1.0, 0.01)]
    best, why, stage = choose_candidate(table, kl_max=0.1, layer_limit=8, harmless_baseline=-2.6)
    assert (best["layer"], best["position"]) == (3, -1) and "relaxed induce" in why and stage == "induce_relaxed"
    # nothing passes KL: only the layer filter remains -> lowest bypass below the limit
    best, why, stage = choose_candidate(table, kl_max=0.01, layer_limit=8, harmless_baseline=-2.6)
    assert (best["layer"], best["position"]) == (5, -1) and "lowest bypass below the layer limit" in why
    assert stage == "layer_only"
    with pytest.raises(RefusalLabError, match="All 4 candidate directions"):
        choose_candidate(table, kl_max=0.1, layer_limit=8, harmless_baseline=-2.6, on_empty="raise")
    kept = [dict(table[0], kept=True, reason="kept")] + table[1:]
    assert choose_candidate(kept, 0.1, 8, -2.6) == (kept[0], None, "configured")


# ------------------------------------------------------------------ the filters actually applied


def test_filters_record_the_stage_that_chose():
    """SelectionResult.filters are the filters applied: the configured ones, induce > the unsteered
    harmless log-odds after the first relaxation, the layer limit alone after the second."""
    from refusal_lab.models.hooked import HookedChatModel
    from tests.tiny_models import tiny_model
    from refusal_lab.steering.selection import STAGES, applied_filters

    tiny = HookedChatModel(tiny_model("qwen2"), name="tiny-qwen2")
    L = tiny.cfg.n_layers
    res = select_direction(tiny, *_splits(tiny), positions=POS, refusal_ids=list(range(100)),
                           policy=DirectionPolicy(kl_max=5.0, max_layer_frac=0.7))
    assert res.fallback is None and res.stage == "configured"
    assert res.filters == {"kl_max": 5.0, "max_layer_frac": 0.7, "induce_min": 0.0, "stage": "configured"}

    # one refusal token of 128: log-odds ~ -5 < 0 everywhere, so induce > 0 fails for every candidate
    res = select_direction(tiny, *_splits(tiny), positions=POS, refusal_ids=[0],
                           policy=DirectionPolicy(kl_max=1e9, max_layer_frac=1.0))
    assert res.stage == "induce_relaxed" and "relaxed induce" in res.fallback
    assert res.filters == {"kl_max": 1e9, "max_layer_frac": 1.0, "induce_min": res.baseline["harmless"],
                           "stage": "induce_relaxed"}
    assert res.induce > res.filters["induce_min"]

    res = select_direction(tiny, *_splits(tiny), positions=POS, refusal_ids=list(range(100)),
                           policy=DirectionPolicy(kl_max=1e-12, max_layer_frac=0.7))
    assert res.stage == "layer_only" and res.layer < 0.7 * L
    assert res.filters == {"kl_max": None, "max_layer_frac": 0.7, "induce_min": None, "stage": "layer_only"}
    assert [applied_filters(s, 0.1, 0.8, -3.0)["induce_min"] for s in STAGES] == [0.0, -3.0, None]
    with pytest.raises(ValueError, match="stage"):
        applied_filters("loose", 0.1, 0.8, -3.0)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    from refusal_lab.models.loading import load_model
    from tests.helpers_tiny_chat import make_tiny_chat_model

    return load_model(str(make_tiny_chat_model(tmp_path_factory.mktemp("sel"))), device="cpu", progress=False)


def test_direction_step_records_the_relaxed_filters(tiny_chat, capsys):
    """Regression: results.json said induce_min 0.0 (and the configured kl_max) when the fallback had
    dropped those filters."""
    from refusal_lab.steering.pipeline import SteeringSettings, direction_step

    saved = {}
    s = SteeringSettings(n_train=4, n_val=3, kl_max=1e-12)  # nothing passes KL: only the layer filter is left
    d = direction_step(tiny_chat, s, lambda name, v, meta: saved.update({name: meta}), progress=False)
    assert d["fallback"] and "lowest bypass below the layer limit" in d["fallback"]
    assert d["filters"] == {"kl_max": None, "max_layer_frac": 0.8, "induce_min": None, "stage": "layer_only"}
    assert saved["direction"]["layer"] == d["layer"] and capsys.readouterr().err == ""


def test_selection_progress_counts_candidates(tiny_chat, capsys):
    """progress=True: a bar on stderr over the candidates scored ("n/N", with ETA): the top_k (here
    every one below the layer limit) by the estimate."""
    from refusal_lab.prompts import build_instruction_prompts, load_instructions

    tok = tiny_chat.tokenizer
    sp = [build_instruction_prompts(tok, load_instructions(split, kind, n=2, seed=0))
          for split in ("train", "val") for kind in ("harmful", "harmless")]
    L = tiny_chat.cfg.n_layers
    # the candidates the layer filter lets through, less layer 0's (its eoi tokens are the same on both
    # sides, so the difference in means is zero there)
    n = sum(1 for l in range(1, L) if l < 0.8 * L) * len(POS)
    capsys.readouterr()
    select_direction(tiny_chat, *sp, positions=POS, progress=True)
    err = capsys.readouterr().err
    assert "direction: scoring candidates" in err and f"/{n} [" in err and "<" in err  # n of N [elapsed<ETA]
    select_direction(tiny_chat, *sp, positions=POS, progress=False)
    assert capsys.readouterr().err == ""
