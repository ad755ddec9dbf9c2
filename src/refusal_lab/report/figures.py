"""Static matplotlib figures (PNG) for one run: baseline, logit attribution, patching grids, refusal heads.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (Agg canvas, no pyplot), so
this module never touches the global backend and is safe to call from scripts, tests and servers.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from refusal_lab.report.common import (
    METRIC_TITLE,
    as_array,
    finite,
    grid_title,
    iter_grids,
)

DPI = 120
HARMFUL, HARMLESS = "#c0392b", "#2e86c1"


def mpl_text(s: Any, limit: int | None = None) -> str:
    """Make a model-derived string safe for matplotlib (no mathtext, visible whitespace, cut to ``limit``)."""
    s = str(s)
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    s = s.replace("$", r"\$").replace("\n", "\\n").replace("\t", "\\t")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)


def metric_label(results: dict[str, Any]) -> str:
    """``logit[Sorry] − logit[Sure]`` with the run's own tokens."""
    tok = results.get("tokens") or {}
    r = (tok.get("refusal") or {}).get("str", "refusal")
    c = (tok.get("compliance") or {}).get("str", "compliance")
    return f"logit[{mpl_text(r).strip()}] − logit[{mpl_text(c).strip()}]"


def new_figure(w: float, h: float) -> Figure:
    """A figure on an Agg canvas with a constrained layout."""
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG, silencing missing-glyph warnings for exotic tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def symmetric_limit(a: np.ndarray) -> float:
    """max |a| over finite cells (never zero), for a colormap centred at 0."""
    fin = np.abs(a[np.isfinite(a)])
    return float(max(fin.max() if fin.size else 1.0, 1e-9))


def draw_heatmap(ax: Axes, values: Any, rows: Sequence[Any], cols: Sequence[Any], title: str,
                 cbar_label: str, *, annotate: bool | None = None, xlabel: str = "", ylabel: str = "layer",
                 vlim: float | None = None, ylimits: tuple[float, float] | None = None):
    """Diverging heatmap (RdBu_r, centred at 0) with layers on y; returns the image for a colorbar.

    ``title`` is used verbatim (pass model-derived parts through :func:`mpl_text`).

    ``ylimits`` places the rows on a continuous axis (e.g. depth 0..1) instead of integer layers.
    """
    a = as_array(values)
    if a.ndim != 2 or a.size == 0:
        ax.set_axis_off()
        ax.set_title(f"{title}\n(empty)")
        return None
    v = vlim if vlim is not None else symmetric_limit(a)
    cmap = colormaps["RdBu_r"].copy()
    cmap = cmap.with_extremes(bad="#dddddd")
    extent = None
    if ylimits is not None:
        extent = (-0.5, a.shape[1] - 0.5, ylimits[0], ylimits[1])
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=-v, vmax=v, aspect="auto", origin="lower",
                   interpolation="nearest", extent=extent)
    ax.set_xticks(range(a.shape[1]))
    labels = [mpl_text(c, 32) for c in cols][: a.shape[1]]
    long = any(len(x) > 4 for x in labels)
    ax.set_xticklabels(labels, rotation=40 if long else 0, ha="right" if long else "center", fontsize=8)
    if ylimits is None:
        step = max(1, int(np.ceil(a.shape[0] / 16)))
        ticks = list(range(0, a.shape[0], step))
        ax.set_yticks(ticks)
        ax.set_yticklabels([mpl_text(rows[i]) if i < len(rows) else str(i) for i in ticks], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if annotate is None:
        annotate = a.size <= 200 and ylimits is None
    if annotate:
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                if np.isfinite(a[i, j]):
                    ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=5.5,
                            color="white" if abs(a[i, j]) > 0.6 * v else "black")
    return im


def grid_xlabel(name: str) -> str:
    """Axis label for a grid's columns."""
    return "head" if "head" in name else "position (object column → last)"


def cbar_label(direction: str) -> str:
    """Colorbar label for a normalised patching grid."""
    return f"normalised metric, {direction}\n{METRIC_TITLE}"


def heatmap_figure(values: Any, rows: Sequence[Any], cols: Sequence[Any], title: str, label: str,
                   xlabel: str) -> Figure:
    """One heatmap with a colorbar, sized to the grid."""
    a = as_array(values)
    nr, nc = (a.shape if a.ndim == 2 else (1, 1))
    per_col = 0.75 if any(len(str(c)) > 4 for c in cols) else 0.42
    fig = new_figure(min(16.0, max(6.0, per_col * nc + 3.5)), min(14.0, max(4.0, 0.26 * nr + 2.2)))
    ax = fig.add_subplot()
    im = draw_heatmap(ax, values, rows, cols, title, label, xlabel=xlabel)
    if im is not None:
        fig.colorbar(im, ax=ax, shrink=0.9).set_label(label, fontsize=8)
    return fig


def baseline_figure(results: dict[str, Any]) -> Figure | None:
    """Per-object metric for both sides, with each side's mean as a dashed line."""
    base = results.get("baseline") or {}
    h, s = base.get("harmful") or {}, base.get("harmless") or {}
    if not h and not s:
        return None
    names = [mpl_text(k, 32) for k in h] + [mpl_text(k, 32) for k in s]
    vals = [finite(v) or 0.0 for v in h.values()] + [finite(v) or 0.0 for v in s.values()]
    colors = [HARMFUL] * len(h) + [HARMLESS] * len(s)
    fig = new_figure(min(16.0, max(6.0, 0.38 * len(names) + 2)), 4.2)
    ax = fig.add_subplot()
    ax.bar(range(len(vals)), vals, color=colors)
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.axhline(0, color="black", lw=0.6)
    for side, color in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        m = finite(base.get(f"{side}_mean"))
        if m is not None:
            ax.axhline(m, color=color, ls="--", lw=1.2, label=f"{side} mean {m:.2f}")
    hm, sm = finite(base.get("harmful_mean")), finite(base.get("harmless_mean"))
    gap = f" (gap {hm - sm:.2f})" if hm is not None and sm is not None else ""
    ax.set_title(f"Baseline {metric_label(results)} per object{gap}", fontsize=10)
    ax.set_ylabel(metric_label(results))
    ax.legend(fontsize=8)
    return fig


def _label_ticks(ax: Axes, labels: Sequence[Any], max_ticks: int = 20) -> None:
    step = max(1, int(np.ceil(len(labels) / max_ticks)))
    idx = list(range(0, len(labels), step))
    if labels and idx[-1] != len(labels) - 1:
        idx.append(len(labels) - 1)
    ax.set_xticks(idx)
    ax.set_xticklabels([mpl_text(labels[i], 32) for i in idx], rotation=60, ha="right", fontsize=7)


def dla_resid_figure(results: dict[str, Any]) -> Figure | None:
    """Accumulated residual stream projected on the metric direction, per layer, both sides."""
    dla = results.get("dla") or {}
    labels = dla.get("labels") or []
    if not labels:
        return None
    h, s = as_array(dla.get("harmful_mean")), as_array(dla.get("harmless_mean"))
    fig = new_figure(9, 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    if h.size:
        ax.plot(x, h, color=HARMFUL, marker=".", label="harmful mean")
    if s.size:
        ax.plot(x, s, color=HARMLESS, marker=".", label="harmless mean")
    if h.size and h.shape == s.shape:
        ax.plot(x, h - s, color="black", ls="--", lw=1, label="harmful − harmless")
    ax.axhline(0, color="grey", lw=0.6)
    _label_ticks(ax, labels)
    ax.set_ylabel(metric_label(results))
    ax.set_title("Logit attribution of the accumulated residual stream (last position)", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def dla_components_figure(results: dict[str, Any]) -> Figure | None:
    """Direct logit attribution per component (embed, attn, mlp): both sides and their difference."""
    comp = (results.get("dla") or {}).get("components") or {}
    labels = comp.get("labels") or []
    if not labels:
        return None
    h, s = as_array(comp.get("harmful_mean")), as_array(comp.get("harmless_mean"))
    fig = new_figure(10, 5.5)
    top, bot = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(labels))
    if h.size:
        top.plot(x, h, color=HARMFUL, marker=".", lw=1, label="harmful mean")
    if s.size:
        top.plot(x, s, color=HARMLESS, marker=".", lw=1, label="harmless mean")
    top.axhline(0, color="grey", lw=0.6)
    top.set_ylabel("DLA")
    top.legend(fontsize=8)
    top.set_title(f"Direct logit attribution per component ({metric_label(results)})", fontsize=10)
    if h.size and h.shape == s.shape:
        colors = ["#8e44ad" if "attn" in str(lab) else "#16a085" if "mlp" in str(lab) else "grey"
                  for lab in labels]
        bot.bar(x, h - s, color=colors)
    bot.axhline(0, color="grey", lw=0.6)
    bot.set_ylabel("harmful − harmless\n(purple attn, green mlp)", fontsize=8)
    _label_ticks(bot, labels, 30)
    return fig


def dla_heads_figure(results: dict[str, Any]) -> Figure | None:
    """Per-head direct logit attribution, harmful − harmless."""
    hd = (results.get("dla") or {}).get("heads") or {}
    h, s = as_array(hd.get("harmful_mean")), as_array(hd.get("harmless_mean"))
    if h.ndim != 2 or h.size == 0 or h.shape != s.shape:
        return None
    rows, cols = hd.get("rows") or list(range(h.shape[0])), hd.get("cols") or list(range(h.shape[1]))
    return heatmap_figure(h - s, rows, cols, "Per-head direct logit attribution, harmful − harmless",
                          f"DLA difference ({metric_label(results)})", "head")


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation of two flat arrays (finite pairs only)."""
    m = np.isfinite(a) & np.isfinite(b)
    if m.sum() < 3:
        return None
    ra, rb = (np.argsort(np.argsort(x[m])).astype(float) for x in (a, b))
    c = np.corrcoef(ra, rb)[0, 1]
    return float(c) if np.isfinite(c) else None


def scatter_figure(name: str, exact: dict[str, Any], attr: dict[str, Any],
                   agreement: dict[str, Any] | None) -> Figure | None:
    """Attribution patching against exact patching, one point per cell, with the y = x line."""
    a, b = as_array(exact.get("values")), as_array(attr.get("values"))
    if a.shape != b.shape or a.size == 0:
        return None
    a, b = a.ravel(), b.ravel()
    fig = new_figure(5, 5)
    ax = fig.add_subplot()
    ax.scatter(a, b, s=10, alpha=0.7, color="#34495e")
    fin = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
    lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
    ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1)
    rho = finite((agreement or {}).get("spearman"))
    rho = rho if rho is not None else spearman(a, b)
    extra = ""
    if agreement and agreement.get("top_k") is not None:
        extra = f", top-{agreement['top_k']} overlap {finite(agreement.get('top_k_overlap')) or 0:.2f}"
    ax.set_title(f"{mpl_text(name)}: attribution vs exact\nSpearman "
                 f"{'–' if rho is None else f'{rho:.2f}'}{extra}", fontsize=10)
    ax.set_xlabel("exact patching (normalised)")
    ax.set_ylabel("attribution patching (normalised)")
    return fig


def heads_ranked_figure(results: dict[str, Any]) -> Figure | None:
    """Top heads by patching effect at the post-object position, with the selection threshold."""
    heads = results.get("heads") or {}
    ranked = heads.get("ranked") or []
    if not ranked:
        return None
    thr = finite(heads.get("threshold"))
    vals = [finite(r.get("value")) or 0.0 for r in ranked]
    names = [f"L{r.get('layer')}H{r.get('head')}" for r in ranked]
    fig = new_figure(max(6.0, 0.4 * len(ranked) + 2), 4)
    ax = fig.add_subplot()
    ax.bar(range(len(vals)), vals,
           color=[HARMFUL if thr is not None and v > thr else "#95a5a6" for v in vals])
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    if thr is not None:
        ax.axhline(thr, color="black", ls="--", lw=1, label=f"threshold {thr:g}")
        ax.legend(fontsize=8)
    suff = finite(heads.get("sufficiency"))
    pos = mpl_text(heads.get("position", "?"))
    ax.set_title(f"Head patching at {pos}: ranked heads"
                 + (f" (selected heads jointly recover {suff:.2f})" if suff is not None else ""), fontsize=10)
    ax.set_ylabel(f"normalised metric\n{METRIC_TITLE}", fontsize=8)
    return fig


def write_figures(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write every figure the results support as PNGs into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def emit(fig: Figure | None, stem: str) -> None:
        if fig is not None:
            paths.append(save(fig, out_dir / f"{stem}.png"))

    emit(baseline_figure(results), "baseline")
    emit(dla_resid_figure(results), "dla_resid")
    emit(dla_components_figure(results), "dla_components")
    emit(dla_heads_figure(results), "dla_heads")
    patching = results.get("patching") or {}
    heads_pos = (results.get("heads") or {}).get("position")
    for kind, name, slug, grid in iter_grids(results):
        a = as_array(grid.get("values"))
        rows = grid.get("rows") or list(range(a.shape[0] if a.ndim == 2 else 0))
        cols = grid.get("cols") or list(range(a.shape[1] if a.ndim == 2 else 0))
        title = grid_title(kind, name, grid) + (f" at {heads_pos}" if name == "heads" and heads_pos else "")
        emit(heatmap_figure(grid.get("values"), rows, cols, mpl_text(title),
                            cbar_label(grid.get("direction", "?")), grid_xlabel(name)), slug)
        if kind == "attribution" and isinstance(patching.get(name), dict):
            emit(scatter_figure(name, patching[name], grid, (patching.get("agreement") or {}).get(name)),
                 f"scatter_{name}")
    emit(heads_ranked_figure(results), "heads_ranked")
    return paths
