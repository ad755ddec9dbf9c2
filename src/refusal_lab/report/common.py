"""Helpers shared by the figures, the HTML report and the comparison: reading results and headline numbers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

GRID_ORDER = ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn_out_cumulative", "mlp_out_cumulative", "heads")
CONTAINERS = ("attribution", "agreement", "necessity")
METRIC_TITLE = "0 = harmless baseline, 1 = harmful baseline"


def load_results(run_dir: Path | str) -> dict[str, Any]:
    """Read ``run_dir/results.json`` (or the file itself when given a path to a JSON file)."""
    p = Path(run_dir)
    if p.is_dir():
        p = p / "results.json"
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def as_array(values: Any) -> np.ndarray:
    """A float array from (nested) JSON lists; ``None``/null becomes NaN."""
    if isinstance(values, np.ndarray):
        return values.astype(float)
    if not values:
        return np.zeros((0, 0))
    if isinstance(values[0], list):
        return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _ordered(d: dict[str, Any]) -> list[str]:
    keys = [k for k in d if k not in CONTAINERS and isinstance(d[k], dict) and "values" in d[k]]
    return sorted(keys, key=lambda k: (GRID_ORDER.index(k) if k in GRID_ORDER else len(GRID_ORDER), k))


def iter_grids(results: dict[str, Any]) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """Yield ``(kind, name, slug, grid)`` for every patching grid: kind is exact/attribution/necessity."""
    patching = results.get("patching") or {}
    for name in _ordered(patching):
        yield "exact", name, f"patching_{name}", patching[name]
    for kind in ("attribution", "necessity"):
        sub = patching.get(kind) or {}
        for name in _ordered(sub):
            yield kind, name, f"{kind}_{name}", sub[name]


def grid_title(kind: str, name: str, grid: dict[str, Any]) -> str:
    """A human title such as ``resid_pre — exact patching, harmful->harmless``."""
    method = grid.get("method") or ("attribution" if kind == "attribution" else "exact")
    what = "necessity " if kind == "necessity" else ""
    return f"{name} — {what}{method} patching, {grid.get('direction', '?')}"


def layer_depth(label: str, n_layers: int, index: int, count: int) -> float:
    """Fractional depth (0..1) of a DLA/component label like ``L3 pre``, ``L3 mlp``, ``embed``, ``final``."""
    m = re.match(r"\s*L(\d+)\s*(\w*)", str(label))
    if m and n_layers:
        off = {"pre": 0.0, "attn": 0.0, "mid": 0.5, "mlp": 0.5, "post": 1.0}.get(m.group(2), 0.0)
        return (int(m.group(1)) + off) / n_layers
    lab = str(label).lower()
    if lab.startswith("embed"):
        return 0.0
    if lab.startswith("final"):
        return 1.0
    return index / max(1, count - 1)


def finite(x: Any) -> float | None:
    """``x`` as a float if it is a finite number, else None."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt(x: Any, digits: int = 3) -> str:
    """Format a number compactly (``–`` for missing)."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    v = finite(x)
    if v is None:
        return str(x)
    return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"


def interval(ci: Any) -> tuple[float, float] | None:
    """``(low, high)`` of a scalar interval, given as ``[low, high]`` or ``{"low": .., "high": ..}``; else None."""
    if isinstance(ci, dict):
        ci = [ci.get("low"), ci.get("high")]
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        lo, hi = finite(ci[0]), finite(ci[1])
        if lo is not None and hi is not None:
            return lo, hi
    return None


def fmt_ci(ci: Any, digits: int = 2) -> str | None:
    """``[0.12, 0.34]`` for an interval (see :func:`interval`), None when there is none."""
    iv = interval(ci)
    return None if iv is None else f"[{iv[0]:.{digits}f}, {iv[1]:.{digits}f}]"


def error_offsets(points: Any) -> list[tuple[float, float] | None]:
    """Asymmetric error-bar offsets ``(below, above)`` (each >= 0) of ``(value, interval)`` points;
    None where a point has no finite value or interval. Both renderers (PNG, plotly) draw these."""
    out: list[tuple[float, float] | None] = []
    for v, ci in points:
        iv, x = interval(ci), finite(v)
        out.append(None if iv is None or x is None else (max(0.0, x - iv[0]), max(0.0, iv[1] - x)))
    return out


def sanity_of(results: dict[str, Any]) -> dict[str, Any]:
    """The run's ``sanity`` entry (empty for runs recorded before the sanity gate)."""
    s = results.get("sanity")
    return s if isinstance(s, dict) else {}


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers of one run: gap, max last-position residual patching, refusal heads, sufficiency."""
    model = results.get("model") or {}
    base = results.get("baseline") or {}
    hm, sm = finite(base.get("harmful_mean")), finite(base.get("harmless_mean"))
    out: dict[str, Any] = {
        "model": model.get("name", "?"), "n_layers": model.get("n_layers"), "n_heads": model.get("n_heads"),
        "harmful_mean": hm, "harmless_mean": sm, "gap": hm - sm if hm is not None and sm is not None else None,
        "resid_grid": None, "max_resid_last": None, "max_resid_last_layer": None,
        "n_refusal_heads": None, "sufficiency": None, "sufficiency_ci95": None, "separates": None,
    }
    san = sanity_of(results)
    if isinstance(san.get("separates"), bool):
        out["separates"] = san["separates"]
    patching = results.get("patching") or {}
    for name in ("resid_pre", "resid_post"):
        g = patching.get(name)
        if isinstance(g, dict) and g.get("values"):
            col = as_array(g["values"])[:, -1]
            if np.isfinite(col).any():
                i = int(np.nanargmax(col))
                rows = g.get("rows") or list(range(len(col)))
                out.update(resid_grid=name, max_resid_last=float(col[i]), max_resid_last_layer=rows[i])
                break
    heads = results.get("heads") or {}
    if heads:
        thr = finite(heads.get("threshold"))
        sel = heads.get("selected")
        if sel is None and thr is not None:
            sel = [r for r in heads.get("ranked") or [] if (finite(r.get("value")) or 0) > thr]
        out["n_refusal_heads"] = len(sel) if sel is not None else None
        out["sufficiency"] = finite(heads.get("sufficiency"))
        out["sufficiency_ci95"] = interval(heads.get("sufficiency_ci95"))
    return out


def candidate_grid(d: dict[str, Any], rows: list[dict[str, Any]]):
    """The direction candidates' bypass scores as a grid: ``(layers, cols, z [L, P], cells)`` where
    ``cells`` lists ``(i, j, row)`` for every table row on the grid; None when there is no grid."""
    layers = sorted({x.get("layer") for x in rows if isinstance(x.get("layer"), int)})
    cols = [c for c in d.get("positions") or [] if isinstance(c, int)] if isinstance(d.get("positions"), list) else []
    cols = cols or sorted({x.get("position") for x in rows if isinstance(x.get("position"), int)})
    if not layers or not cols:
        return None
    li, ci = {v: i for i, v in enumerate(layers)}, {v: j for j, v in enumerate(cols)}
    z = np.full((len(layers), len(cols)), np.nan)
    cells = []
    for x in rows:
        i, j = li.get(x.get("layer")), ci.get(x.get("position"))
        if i is None or j is None:
            continue
        b = finite(x.get("bypass"))
        z[i, j] = np.nan if b is None else b
        cells.append((i, j, x))
    return layers, cols, z, cells
