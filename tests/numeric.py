"""Comparisons of floating-point results at a stated tolerance.

Results whose computation depends on batch composition, process layout or thread count (sharded vs
whole grids, Ray vs one process, resumed vs uninterrupted runs, OOM-halved batches) are equal to
fp32 rounding, not bit-identical: a matrix kernel may block another batch shape differently, and
that differs between CPUs. These helpers compare such results at ``RTOL``/``ATOL`` and everything
that is not a float (keys, strings, ints, bools, shapes) exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

RTOL = 1e-5
ATOL = 1e-6
"""fp32 rounding of the patching metric (values O(1)): agreement seen across CPUs is ~3e-7."""


def assert_tensors_close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL, atol: float = ATOL, what: str = ""):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_nested_close(a, b, rtol: float = RTOL, atol: float = ATOL, path: str = "$") -> None:
    """``a`` equals ``b`` (JSON-like trees): floats to the tolerance, everything else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (path, sorted(set(a) ^ set(b)))
        for k in a:
            assert_nested_close(a[k], b[k], rtol, atol, f"{path}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), (path, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_close(x, y, rtol, atol, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool), (path, a, b)
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), (path, a, b)
        else:
            assert abs(a - b) <= atol + rtol * abs(b), (path, a, b, abs(a - b))
    else:
        assert a == b, (path, a, b)


def assert_csv_close(a: Path, b: Path, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Two tidy CSV tables: same columns and rows, float columns to the tolerance."""
    fa, fb = pd.read_csv(a), pd.read_csv(b)
    assert list(fa.columns) == list(fb.columns) and fa.shape == fb.shape, (a.name, fa.shape, fb.shape)
    for col in fa.columns:
        if pd.api.types.is_float_dtype(fa[col]) or pd.api.types.is_float_dtype(fb[col]):
            assert_tensors_close(torch.tensor(fa[col].to_numpy(dtype="float64")),
                                 torch.tensor(fb[col].to_numpy(dtype="float64")), rtol, atol, f"{a.name}:{col}")
        else:
            assert fa[col].tolist() == fb[col].tolist(), (a.name, col)
