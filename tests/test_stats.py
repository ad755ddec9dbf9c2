"""``refusal_lab.stats`` against independent computations."""

import math

import pytest
import torch
from scipy import stats as sps

from refusal_lab.stats import bootstrap_ci, mean_se, summary, wilson_interval


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (1, 1), (25, 50)])
def test_wilson_matches_closed_form_and_is_exact_at_the_ends(k, n):
    lo, hi = wilson_interval(k, n)
    p, z = k / n, sps.norm.ppf(0.975)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert lo == pytest.approx(max(0.0, centre - half), abs=1e-12) and hi == pytest.approx(min(1.0, centre + half), abs=1e-12)
    assert (lo == 0.0) == (k == 0) and (hi == 1.0) == (k == n)
    assert lo <= p <= hi


def test_wilson_of_nothing_is_nan():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_mean_se_matches_numpy_over_pairs():
    v = torch.randn(7, 3, 4, generator=torch.Generator().manual_seed(0))
    mean, se = mean_se(v)
    torch.testing.assert_close(mean, v.double().mean(0))
    torch.testing.assert_close(se, torch.tensor(sps.sem(v.double().numpy(), axis=0, ddof=1)), atol=1e-7, rtol=1e-6)
    assert torch.isnan(mean_se(v[:1])[1]).all()


def test_bootstrap_brackets_the_mean_and_is_seeded():
    v = torch.randn(20, 5, generator=torch.Generator().manual_seed(1))
    lo, hi = bootstrap_ci(v, seed=3)
    m = v.double().mean(0)
    assert (lo <= m).all() and (m <= hi).all() and (lo < hi).all()
    lo2, hi2 = bootstrap_ci(v, seed=3)
    assert torch.equal(lo, lo2) and torch.equal(hi, hi2)
    # roughly mean +- 1.96 SE for a normal sample
    se = v.double().std(0) / math.sqrt(20)
    assert ((hi - lo) / (2 * 1.96 * se)).sub(1).abs().max() < 0.35


def test_summary_shape():
    s = summary([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["se"] == pytest.approx(1 / math.sqrt(3))
    assert s["ci95"][0] <= 2.0 <= s["ci95"][1]
