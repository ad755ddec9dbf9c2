"""Static matplotlib figures (PNG) for one run: baseline, logit attribution, patching grids, refusal heads,
steering (direction candidates, alpha sweeps, held-out refusal rates).

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
from matplotlib.patches import Rectangle

from refusal_lab.artifacts import atomic_target
from refusal_lab.report.common import (
    candidate_grid,
    error_offsets,
    METRIC_TITLE,
    as_array,
    finite,
    fmt_ci,
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
    """Write ``fig`` as PNG atomically (a temporary file in the same folder, then ``os.replace``, like every
    other run artifact), silencing missing-glyph warnings for exotic tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with atomic_target(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
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
    ci = fmt_ci(heads.get("sufficiency_ci95"))
    n = heads.get("n_pairs")
    extra = (f", 95% CI {ci}" if ci else "") + (f", n = {mpl_text(n)} pairs" if ci and n is not None else "")
    ax.set_title(f"Head patching at {pos}: ranked heads"
                 + (f" (selected heads jointly recover {suff:.2f}{extra})" if suff is not None else ""), fontsize=10)
    ax.set_ylabel(f"normalised metric\n{METRIC_TITLE}", fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------- steering

def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _alpha_rows(rows: Any) -> list[dict[str, Any]]:
    """Dict rows with a finite ``alpha``, sorted by it."""
    ok = [r for r in rows if isinstance(r, dict) and finite(r.get("alpha")) is not None] if isinstance(rows, list) \
        else []
    return sorted(ok, key=lambda r: float(r["alpha"]))


def _series(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if finite(r.get(key)) is None else float(r[key]) for r in rows], dtype=float)


def _yerr(points: Sequence[tuple[Any, Any]]) -> np.ndarray | None:
    """``[2, n]`` asymmetric error bars from ``(value, interval)`` points; None when no point has an interval."""
    offsets = error_offsets(points)
    if all(o is None for o in offsets):
        return None
    return np.array([o if o is not None else (0.0, 0.0) for o in offsets]).T


def _se_err(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray | None:
    e = _series(rows, key)
    return None if np.isnan(e).all() else np.nan_to_num(e, nan=0.0)


def _eoi_tick(pos: Any, eoi: Sequence[Any]) -> str:
    try:
        p = int(pos)
        if eoi and -len(eoi) <= p < len(eoi):
            return mpl_text(f"{p} {eoi[p]!r}", 24)
    except (TypeError, ValueError):
        pass
    return mpl_text(pos, 24)


def steering_direction_figure(results: dict[str, Any]) -> Figure | None:
    """Bypass score of every direction candidate (layer x eoi column); selected boxed, filtered ones crossed."""
    d = _dict(results.get("direction"))
    rows = [x for x in d.get("table") or [] if isinstance(x, dict)] if isinstance(d.get("table"), list) else []
    grid = candidate_grid(d, rows)
    if grid is None:
        return None
    layers, cols, z, cells = grid
    li, ci = {v: i for i, v in enumerate(layers)}, {v: j for j, v in enumerate(cols)}
    filtered = [(j, i) for i, j, x in cells if not x.get("kept")]
    eoi = d.get("eoi_tokens") if isinstance(d.get("eoi_tokens"), list) else []
    fig = new_figure(min(12.0, max(6.0, 1.1 * len(cols) + 3.5)), min(14.0, max(4.5, 0.24 * len(layers) + 2.4)))
    ax = fig.add_subplot()
    cmap = colormaps["viridis_r"].with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(z), cmap=cmap, aspect="auto", origin="lower", interpolation="nearest")
    if filtered:
        fx, fy = zip(*filtered)
        ax.scatter(fx, fy, marker="x", s=14, color="#555555", lw=0.7, label="filtered out")
    i, j = li.get(d.get("layer")), ci.get(d.get("position"))
    if i is not None and j is not None:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="#e74c3c", lw=2.5, label="selected"))
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([_eoi_tick(c, eoi) for c in cols], fontsize=8, rotation=20, ha="right")
    step = max(1, int(np.ceil(len(layers) / 16)))
    ax.set_yticks(range(0, len(layers), step))
    ax.set_yticklabels([str(layers[k]) for k in range(0, len(layers), step)], fontsize=8)
    ax.set_xlabel("end-of-instruction column")
    ax.set_ylabel("layer")
    base = _dict(d.get("baseline"))
    sub = ""
    if finite(d.get("bypass")) is not None and finite(base.get("harmful_val_log_odds")) is not None:
        sub = (f"\nselected: layer {mpl_text(d.get('layer'))}, column {_eoi_tick(d.get('position'), eoi)}; bypass "
               f"{finite(base.get('harmful_val_log_odds')):.2f} → {finite(d.get('bypass')):.2f}")
    ax.set_title("Direction candidates: bypass score (lower = stronger)" + sub
                 + ("\nFALLBACK: every candidate was filtered out" if d.get("fallback") else ""), fontsize=10)
    if filtered or (i is not None and j is not None):
        ax.legend(fontsize=7, loc="upper right", framealpha=0.9)
    fig.colorbar(im, ax=ax, shrink=0.9).set_label("bypass: harmful val refusal log-odds, ablated", fontsize=8)
    return fig


def steering_sweep_figure(results: dict[str, Any]) -> Figure | None:
    """Val alpha sweep of the selected direction: refusal rate (left) and refusal score (right)."""
    ins = _dict(_dict(results.get("steering")).get("instructions"))
    rows = _alpha_rows(ins.get("rows"))
    if not rows:
        return None
    x = np.array([float(r["alpha"]) for r in rows])
    abl = _dict(ins.get("ablation"))
    chosen = finite(ins.get("chosen_alpha"))
    fig = new_figure(11, 4.2)
    axes = fig.subplots(1, 2)
    for ax, key, ylabel in ((axes[0], "refusal_rate", "refusal rate (judge)"),
                            (axes[1], "refusal_score", "mean refusal log-odds")):
        for side, color, label in (("induce", HARMLESS, "induce: harmless, +alpha"),
                                   ("suppress", HARMFUL, "suppress: harmful, −alpha")):
            y = _series(rows, f"{side}_{key}")
            err = _yerr([(r.get(f"{side}_{key}"), r.get(f"{side}_{key}_ci95")) for r in rows]) \
                if key == "refusal_rate" else None
            if err is not None:
                ax.errorbar(x, y, yerr=err, color=color, marker="o", ms=4, capsize=3, lw=1.5,
                            label=label + " (Wilson 95% CI)")
            else:
                ax.plot(x, y, color=color, marker="o", ms=4, label=label)
        a = finite(abl.get(key))
        if a is not None:
            ax.axhline(a, color=HARMFUL, ls="--", lw=1.2, label=f"ablation: harmful ({a:.2f})")
        if chosen is not None:
            ax.axvline(chosen, color="black", ls=":", lw=1.2, label=f"chosen alpha {chosen:g}")
        if key == "refusal_rate":
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("alpha")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"Alpha sweep of the selected direction on val instructions (layer "
                 f"{mpl_text(ins.get('layer', '?'))}, n = {mpl_text(ins.get('n_harmless', '?'))} harmless / "
                 f"{mpl_text(ins.get('n_harmful', '?'))} harmful)", fontsize=10)
    return fig


def steering_objects_figure(results: dict[str, Any]) -> Figure | None:
    """Per vector: normalised metric and refusal fraction against alpha on the object prompts."""
    objs = _dict(_dict(results.get("steering")).get("objects"))
    items = [(name, _alpha_rows(o.get("rows"))) for name, o in objs.items() if isinstance(o, dict)]
    items = [(n, rows) for n, rows in items if rows]
    if not items:
        return None
    fig = new_figure(11, 3.4 * len(items) + 0.6)
    axes = fig.subplots(len(items), 2, squeeze=False)
    for (name, rows), (left, right) in zip(items, axes):
        x = np.arange(len(rows))
        labels = [f"{float(r['alpha']):g}" for r in rows]
        for ax, key, ylabel in ((left, "normalised", f"normalised metric\n{METRIC_TITLE}"),
                                (right, "refusal_fraction", "refusal fraction (judge)")):
            for side, color, label in (("harmless", HARMLESS, "harmless objects, +alpha"),
                                       ("harmful", HARMFUL, "harmful objects, −alpha")):
                y = _series(rows, f"{side}_{key}")
                err = (_se_err(rows, f"{side}_normalised_se") if key == "normalised" else
                       _yerr([(r.get(f"{side}_{key}"), r.get(f"{side}_{key}_ci95")) for r in rows]))
                if err is not None:
                    ax.errorbar(x, y, yerr=err, color=color, marker="o", ms=4, capsize=3, lw=1.5, label=label)
                else:
                    ax.plot(x, y, color=color, marker="o", ms=4, label=label)
            if key == "normalised":
                ax.axhline(0, color=HARMLESS, ls=":", lw=0.8)
                ax.axhline(1, color=HARMFUL, ls=":", lw=0.8)
            else:
                ax.set_ylim(-0.03, 1.03)
            ax.set_xticks(x)
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_xlabel("|alpha|")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{mpl_text(name, 40)} vector (layer {mpl_text(objs[name].get('layer', '?'))})",
                         fontsize=9)
        left.legend(fontsize=7)
    fig.suptitle("Object-prompt sweeps: vectors added to harmless objects, subtracted from harmful ones",
                 fontsize=10)
    return fig


def steering_evaluation_figure(results: dict[str, Any]) -> Figure | None:
    """Held-out refusal rates: baseline vs edited, one group per measure, with n."""
    ev = _dict(results.get("evaluation"))
    rates = [(k, v) for k, v in ev.items() if "refusal_rate" in str(k) and isinstance(v, dict)
             and finite(v.get("value")) is not None]
    if not rates:
        return None
    fig = new_figure(max(5.5, 1.9 * len(rates) + 2), 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(rates))
    base = [finite(v.get("baseline")) for _, v in rates]
    val = [finite(v.get("value")) for _, v in rates]
    e1 = _yerr([(v.get("baseline"), v.get("baseline_ci95")) for _, v in rates])
    e2 = _yerr([(v.get("value"), v.get("ci95")) for _, v in rates])
    b1 = ax.bar(x - 0.2, [np.nan if b is None else b for b in base], 0.4, color="#95a5a6", label="baseline",
                yerr=e1, capsize=3 if e1 is not None else 0)
    b2 = ax.bar(x + 0.2, val, 0.4, color=[HARMLESS if "harmless" in k else HARMFUL for k, _ in rates],
                label="edited" + (" (Wilson 95% CI)" if e2 is not None else ""), yerr=e2,
                capsize=3 if e2 is not None else 0)
    for bars in (b1, b2):
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    names = [k.replace("_refusal_rate", "").replace("refusal_rate_", "").replace("_", " ") or k for k, _ in rates]
    ax.set_xticks(x)
    ax.set_xticklabels([f"{mpl_text(n, 32)}\nn = {mpl_text(v.get('n', '?'))}" for n, (_, v) in zip(names, rates)],
                       fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("refusal rate")
    a = finite(ev.get("alpha"))
    ax.set_title(f"Held-out {mpl_text(ev.get('split', 'test'))} refusal rates, baseline vs edited"
                 + (f" (layer {mpl_text(ev.get('layer'))}, alpha {a:g})" if a is not None else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
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
    for stem, make in (("steering_direction", steering_direction_figure), ("steering_sweep", steering_sweep_figure),
                       ("steering_objects", steering_objects_figure),
                       ("steering_evaluation", steering_evaluation_figure)):
        try:
            fig = make(results)
        except Exception as e:  # noqa: BLE001 -- an odd steering entry must not cost the other figures
            warnings.warn(f"{stem}.png skipped: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
            fig = None
        emit(fig, stem)
    return paths
