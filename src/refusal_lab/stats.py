"""Uncertainty of the numbers a run reports: spread over prompt pairs and binomial intervals.

* :func:`mean_se` — mean and standard error (ddof = 1) over the first axis (prompt pairs);
* :func:`bootstrap_ci` — percentile bootstrap interval of the mean over the first axis (seeded,
  so a run's intervals are reproducible);
* :func:`wilson_interval` — Wilson score interval of a rate ``k / n`` (refusal rates), which stays
  inside [0, 1] and is sensible at ``k = 0`` or ``k = n`` where the normal interval is not;
* :func:`summary` — ``{mean, se, ci95, n}`` of a 1-D sample, the shape results.json uses for a scalar.

Normalised patching values are affine in the raw metric with the two baselines held fixed, so their
standard error is the raw per-pair standard error divided by ``|harmful - harmless|``; the baselines'
own uncertainty is reported separately (``baseline`` entry), not propagated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["bootstrap_ci", "mean_se", "summary", "wilson_interval", "Z95"]

Z95 = 1.959963984540054
"""The two-sided 95 % normal quantile."""


def mean_se(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of the mean over axis 0 (``values``: ``[n, ...]``, float64 inside).

    With ``n = 1`` the standard error is NaN (one pair says nothing about the spread).
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    n = v.shape[0]
    mean = v.mean(0)
    if n < 2:
        return mean, torch.full_like(mean, float("nan"))
    return mean, v.std(0, unbiased=True) / math.sqrt(n)


def bootstrap_ci(values: torch.Tensor, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap interval of the mean over axis 0: ``(low, high)``, each ``values.shape[1:]``.

    Pairs are resampled with replacement (the same resample for every cell, so cells stay comparable).
    With ``n = 1`` both bounds equal the single value.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    n = v.shape[0]
    if n < 2:
        return v[0].clone(), v[0].clone()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    flat = v.reshape(n, -1)
    means = flat[idx].mean(1)  # [n_boot, cells]
    a = (1 - level) / 2
    q = torch.quantile(means, torch.tensor([a, 1 - a], dtype=torch.float64), dim=0)
    return q[0].reshape(v.shape[1:]), q[1].reshape(v.shape[1:])


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the rate ``k / n`` (``(nan, nan)`` for ``n = 0``)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact bounds at the ends (no 1e-17 rounding residue)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def summary(values: Sequence[float] | torch.Tensor, seed: int = 0) -> dict:
    """``{"mean", "se", "ci95": [low, high], "n"}`` of a 1-D sample (bootstrap interval of the mean)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    mean, se = mean_se(v)
    lo, hi = bootstrap_ci(v, seed=seed)
    return {"mean": float(mean), "se": float(se), "ci95": [float(lo), float(hi)], "n": int(v.numel())}
