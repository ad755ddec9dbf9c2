"""Number formatting and headline numbers shared by the figure specs, the HTML report and comparisons.

Everything here reads typed results (:class:`refusal_lab.run.results.Results`); numbers a run
may store as null (NaN) go through :func:`finite` / :func:`as_array`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator

import numpy as np

from refusal_lab.run.results import GRID_NAMES, Grid, Results


def as_array(values: Any) -> np.ndarray:
    """A float array from (nested) JSON lists; null becomes NaN."""
    return np.array([[np.nan if v is None else v for v in row] if isinstance(row, list) else
                     (np.nan if row is None else row) for row in values], dtype=float)


def finite(x: Any) -> float | None:
    """``x`` as a float if it is a finite number, else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def fmt(x: Any, digits: int = 3) -> str:
    """A number, compactly (``–`` for missing; other values as text)."""
    if x is None:
        return "–"
    if isinstance(x, (bool, int, np.integer)):
        return str(x)
    v = finite(x)
    if v is None:
        return str(x)
    return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"


def interval(ci: Any) -> tuple[float, float] | None:
    """``(low, high)`` of an interval ``[low, high]`` when both ends are finite; else None."""
    if ci is None:
        return None
    lo, hi = finite(ci[0]), finite(ci[1])
    return (lo, hi) if lo is not None and hi is not None else None


def fmt_ci(ci: Any, digits: int = 2) -> str | None:
    """``[0.12, 0.34]`` for an interval (see :func:`interval`), None when there is none."""
    iv = interval(ci)
    return None if iv is None else f"[{iv[0]:.{digits}f}, {iv[1]:.{digits}f}]"


def rate_ci(ci: Any, k: Any = None, n: Any = None) -> str | None:
    """``[0.41, 0.63] (26/50)``: a Wilson interval with its count (or ``(n = 50)``), None without one."""
    c = fmt_ci(ci)
    if c is None:
        return None
    return c + (f" ({k}/{n})" if k is not None and n is not None else f" (n = {n})" if n is not None else "")


def error_offsets(points: Any) -> list[tuple[float, float] | None]:
    """Asymmetric error-bar offsets ``(below, above)`` (each >= 0) of ``(value, interval)`` points;
    None where a point has no finite value or interval."""
    out: list[tuple[float, float] | None] = []
    for v, ci in points:
        iv, x = interval(ci), finite(v)
        out.append(None if iv is None or x is None else (max(0.0, x - iv[0]), max(0.0, iv[1] - x)))
    return out


def se_offsets(ses: Any) -> list[tuple[float, float] | None]:
    """Symmetric error-bar offsets ``(se, se)`` of standard errors; None where one is not finite."""
    return [None if finite(e) is None else (float(e), float(e)) for e in ses]


def metric_label(r: Results) -> str:
    """``logit[Sorry] − logit[Sure]`` with the run's own tokens."""
    t = r["tokens"]
    return f"logit[{t['refusal']['str'].strip()}] − logit[{t['compliance']['str'].strip()}]"


def iter_grids(r: Results) -> Iterator[tuple[str, str, str, Grid]]:
    """``(kind, name, slug, grid)`` of every patching grid in report order; kind is exact/attribution/necessity."""
    p = r["patching"]
    for name in GRID_NAMES:
        if name in p:
            yield "exact", name, f"patching_{name}", p[name]
    for kind in ("attribution", "necessity"):
        sub = p.get(kind, {})
        for name in GRID_NAMES:
            if name in sub:
                yield kind, name, f"{kind}_{name}", sub[name]


def grid_title(kind: str, name: str, grid: Grid, r: Results) -> str:
    """``resid_pre — exact patching, harmful->harmless`` (the head grid: ``at <position>``)."""
    what = "necessity " if kind == "necessity" else ""
    at = f" at {r['heads']['position']}" if name == "heads" and "heads" in r else ""
    return f"{name} — {what}{grid['method']} patching, {grid['direction']}{at}"


def layer_depth(label: str, n_layers: int, index: int, count: int) -> float:
    """Fractional depth (0..1) of a DLA label like ``L3 pre``, ``L3 mlp``, ``embed``, ``final``."""
    m = re.match(r"\s*L(\d+)\s*(\w*)", label)
    if m:
        off = {"pre": 0.0, "attn": 0.0, "mid": 0.5, "mlp": 0.5, "post": 1.0}.get(m.group(2), 0.0)
        return (int(m.group(1)) + off) / n_layers
    if label.lower().startswith("embed"):
        return 0.0
    if label.lower().startswith("final"):
        return 1.0
    return index / max(1, count - 1)


def headline(r: Results) -> dict[str, Any]:
    """Headline numbers of one run (results read by :func:`~refusal_lab.run.results.read_results`): gap,
    sanity verdict, max last-position residual patching, refusal heads and their joint sufficiency
    (None where the run has no such section)."""
    m, b = r["model"], r["baseline"]
    out: dict[str, Any] = {
        "model": m["name"], "n_layers": m["n_layers"], "n_heads": m["n_heads"],
        "harmful_mean": b["harmful_mean"], "harmless_mean": b["harmless_mean"],
        "gap": b["harmful_mean"] - b["harmless_mean"], "separates": r["sanity"]["separates"],
        "resid_grid": None, "max_resid_last": None, "max_resid_last_layer": None,
        "n_refusal_heads": None, "sufficiency": None, "sufficiency_ci95": None,
    }
    for name in ("resid_pre", "resid_post"):
        g = r["patching"].get(name)
        if g is not None:
            col = as_array(g["values"])[:, -1]
            if np.isfinite(col).any():
                i = int(np.nanargmax(col))
                out.update(resid_grid=name, max_resid_last=float(col[i]), max_resid_last_layer=g["rows"][i])
                break
    if "heads" in r:
        h = r["heads"]
        out.update(n_refusal_heads=len(h["selected"]), sufficiency=finite(h["sufficiency"]),
                   sufficiency_ci95=interval(h["sufficiency_ci95"]))
    return out
