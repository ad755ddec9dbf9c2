"""select_direction: candidate table, filters, choice and the all-filtered error (tiny models)."""

import math

import pytest
import torch

from refusal_lab.errors import RefusalLabError
from refusal_lab.steering.selection import select_direction
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
                           kl_max=kl_max, max_layer_frac=frac)
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
                           kl_max=float("inf"), max_layer_frac=1.0)
    _check_filters(res, tiny.cfg.n_layers, float("inf"), 1.0)
    assert any(r["kept"] for r in res.table)


def test_all_filtered_raises_clear_error(tiny):
    with pytest.raises(RefusalLabError, match=r"kl_max") as e:
        select_direction(tiny, *_splits(tiny), positions=POS, refusal_ids=list(range(100)), kl_max=0.0)
    msg = str(e.value)
    n = tiny.cfg.n_layers * len(POS)
    assert f"All {n} candidate directions" in msg and "max_layer_frac" in msg
    assert not isinstance(e.value, AssertionError)
