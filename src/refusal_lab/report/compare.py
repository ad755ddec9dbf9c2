"""Compare several run folders (e.g. Gemma 2-2B vs 9B): depth-normalised overlays and headline numbers.

Layers are placed at ``layer / n_layers`` so models of different depth share one axis.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from refusal_lab.artifacts import write_text
from refusal_lab.report.common import (
    GRID_ORDER,
    METRIC_TITLE,
    as_array,
    finite,
    fmt_ci,
    headline,
    interval,
    layer_depth,
    load_results,
)
from refusal_lab.report.figures import (
    HARMFUL,
    HARMLESS,
    cbar_label,
    draw_heatmap,
    grid_xlabel,
    metric_label,
    mpl_text,
    new_figure,
    save,
    symmetric_limit,
)
from refusal_lab.report.html import SEQ_COLORS, Plots, esc, page, png_data_uri, ptext, table

Run = tuple[str, Path, dict[str, Any]]
CURVE_GRIDS = tuple(g for g in GRID_ORDER if g != "heads")


def _n_layers(r: dict[str, Any]) -> int:
    n = (r.get("model") or {}).get("n_layers")
    if n:
        return int(n)
    rows = ((r.get("patching") or {}).get("resid_pre") or {}).get("rows") or []
    return (max(rows) + 1) if rows else 1


def _labels(results: Sequence[dict[str, Any]], dirs: Sequence[Path]) -> list[str]:
    names = [str((r.get("model") or {}).get("name", d.name)) for r, d in zip(results, dirs)]
    return [f"{n} ({d.name})" if names.count(n) > 1 else n for n, d in zip(names, dirs)]


def _dla_depth(r: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    d = r.get("dla") or {}
    labels = d.get("labels") or []
    h, s = as_array(d.get("harmful_mean")), as_array(d.get("harmless_mean"))
    if not labels or h.shape != s.shape or h.size != len(labels):
        return None
    n = _n_layers(r)
    x = np.array([layer_depth(lab, n, i, len(labels)) for i, lab in enumerate(labels)])
    return x, h, s


def _last_column(r: dict[str, Any], grid: str) -> tuple[np.ndarray, np.ndarray] | None:
    g = (r.get("patching") or {}).get(grid)
    if not isinstance(g, dict):
        return None
    a = as_array(g.get("values"))
    if a.ndim != 2 or a.size == 0:
        return None
    rows = g.get("rows") or list(range(a.shape[0]))
    return np.asarray(rows, dtype=float) / _n_layers(r), a[:, -1]


# ------------------------------------------------------------------------------------------------ figures

def baseline_compare_figure(runs: Sequence[Run]) -> Figure:
    """Harmful and harmless baseline means per model, with the gap."""
    fig = new_figure(max(5.0, 1.6 * len(runs) + 2), 4)
    ax = fig.add_subplot()
    x = np.arange(len(runs))
    hm = [finite((r.get("baseline") or {}).get("harmful_mean")) or 0.0 for _, _, r in runs]
    sm = [finite((r.get("baseline") or {}).get("harmless_mean")) or 0.0 for _, _, r in runs]
    ax.bar(x - 0.2, hm, 0.4, color=HARMFUL, label="harmful mean")
    ax.bar(x + 0.2, sm, 0.4, color=HARMLESS, label="harmless mean")
    for i, (a, b) in enumerate(zip(hm, sm)):
        ax.annotate(f"gap {a - b:.2f}", (i, max(a, b, 0)), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([mpl_text(n, 40) for n, _, _ in runs], fontsize=8)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel(metric_label(runs[0][2]))
    ax.set_title("Baseline metric per model", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def dla_compare_figure(runs: Sequence[Run]) -> Figure | None:
    """Accumulated-residual DLA against depth: both sides (top) and harmful − harmless (bottom)."""
    data = [(n, _dla_depth(r)) for n, _, r in runs]
    if not any(d is not None for _, d in data):
        return None
    fig = new_figure(9, 6)
    top, bot = fig.subplots(2, 1, sharex=True)
    for i, (name, d) in enumerate(data):
        if d is None:
            continue
        x, h, s = d
        c = SEQ_COLORS[i % len(SEQ_COLORS)]
        top.plot(x, h, color=c, lw=1.5, label=f"{mpl_text(name)} harmful")
        top.plot(x, s, color=c, lw=1.2, ls=":", label=f"{mpl_text(name)} harmless")
        bot.plot(x, h - s, color=c, lw=1.5, label=mpl_text(name))
    top.set_title("Accumulated residual logit attribution against depth (solid harmful, dotted harmless)",
                  fontsize=10)
    top.set_ylabel(metric_label(runs[0][2]), fontsize=8)
    top.legend(fontsize=7)
    bot.set_ylabel("harmful − harmless")
    bot.set_xlabel("depth (layer / n_layers)")
    bot.axhline(0, color="grey", lw=0.6)
    bot.legend(fontsize=7)
    return fig


def last_position_figure(runs: Sequence[Run]) -> Figure | None:
    """Patching at the last position against depth, one panel per grid, one curve per model."""
    grids = [g for g in CURVE_GRIDS if any(_last_column(r, g) is not None for _, _, r in runs)]
    if not grids:
        return None
    nc = 2 if len(grids) > 1 else 1
    nr = (len(grids) + nc - 1) // nc
    fig = new_figure(5.2 * nc, 3.2 * nr)
    axes = np.atleast_1d(fig.subplots(nr, nc, sharex=True, squeeze=False)).ravel()
    for ax, g in zip(axes, grids):
        for i, (name, _, r) in enumerate(runs):
            d = _last_column(r, g)
            if d is not None:
                ax.plot(d[0], d[1], marker=".", color=SEQ_COLORS[i % len(SEQ_COLORS)], label=mpl_text(name))
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"{g}, last position", fontsize=9)
        ax.set_ylabel("normalised metric", fontsize=8)
    for ax in axes[len(grids):]:
        ax.set_axis_off()
    axes[0].legend(fontsize=7)
    for ax in axes[max(0, len(grids) - nc):len(grids)]:
        ax.set_xlabel("depth (layer / n_layers)")
    fig.suptitle(f"Patching at the last position ({METRIC_TITLE})", fontsize=10)
    return fig


def grid_compare_figure(runs: Sequence[Run], grid: str) -> Figure | None:
    """One heatmap per model for ``grid``, side by side, rows on a depth axis and one shared colour scale."""
    items = [(n, (r.get("patching") or {}).get(grid), r) for n, _, r in runs]
    items = [(n, g, r) for n, g, r in items if isinstance(g, dict) and as_array(g.get("values")).size]
    if not items:
        return None
    vlim = max(symmetric_limit(as_array(g["values"])) for _, g, _ in items)
    ncols = max(as_array(g["values"]).shape[1] for _, g, _ in items)
    fig = new_figure(min(20.0, len(items) * max(3.5, 0.45 * ncols + 1.5) + 1.5), 5.5)
    axes = np.atleast_1d(fig.subplots(1, len(items), squeeze=False)).ravel()
    im = None
    for ax, (name, g, r) in zip(axes, items):
        a = as_array(g["values"])
        rows = g.get("rows") or list(range(a.shape[0]))
        n = _n_layers(r)
        lo, hi = rows[0] / n, (rows[-1] + 1) / n
        im = draw_heatmap(ax, a, rows, g.get("cols") or list(range(a.shape[1])), f"{mpl_text(name, 48)}\n{grid}", "",
                          xlabel=grid_xlabel(grid), ylabel="depth (layer / n_layers)", vlim=vlim,
                          ylimits=(lo, hi), annotate=False)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.9).set_label(cbar_label(items[0][1].get("direction", "?")),
                                                            fontsize=8)
    return fig


def heads_compare_figure(runs: Sequence[Run]) -> Figure | None:
    """Ranked head effects per model (rank on x), with each run's threshold."""
    data = [(n, r.get("heads") or {}) for n, _, r in runs]
    if not any(h.get("ranked") for _, h in data):
        return None
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    for i, (name, h) in enumerate(data):
        vals = [finite(x.get("value")) or 0.0 for x in h.get("ranked") or []]
        c = SEQ_COLORS[i % len(SEQ_COLORS)]
        if vals:
            ax.plot(range(1, len(vals) + 1), vals, marker="o", ms=3, color=c, label=mpl_text(name))
        thr = finite(h.get("threshold"))
        if thr is not None:
            ax.axhline(thr, color=c, ls="--", lw=0.8)
    ax.set_xlabel("rank")
    ax.set_ylabel("normalised metric")
    ax.set_title("Ranked head patching effects (dashed: threshold)", fontsize=10)
    ax.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------------- html

def _overlay(plots: Plots, runs: Sequence[Run], title: str, series: Any, ytitle: str) -> str:
    data = []
    for i, (name, _, r) in enumerate(runs):
        d = series(r)
        if d is None:
            continue
        x, y = d
        data.append({"type": "scatter", "mode": "lines+markers", "name": ptext(name), "x": x, "y": y,
                     "line": {"color": SEQ_COLORS[i % len(SEQ_COLORS)]}, "marker": {"size": 4},
                     "hovertemplate": "%{fullData.name}<br>depth %{x:.3f}<br>%{y:.4f}<extra></extra>"})
    if not data:
        return ""
    return plots.add(data, {"title": {"text": ptext(title)}, "xaxis": {"title": {"text": "depth (layer / n_layers)"},
                                                                      "range": [0, 1.02]},
                            "yaxis": {"title": {"text": ptext(ytitle)}}}, 400)


def _headline_rows(runs: Sequence[Run], out_dir: Path) -> list[list[Any]]:
    rows = []
    for name, d, r in runs:
        h = headline(r)
        where = None
        if h["max_resid_last"] is not None:
            lay = h["max_resid_last_layer"]
            depth = finite(lay) / _n_layers(r) if finite(lay) is not None else None
            where = f"{h['resid_grid']}, layer {lay}" + (f" (depth {depth:.2f})" if depth is not None else "")
        rep = d / "report.html"
        link = esc(name)
        if rep.exists():
            link = f'<a href="{esc(Path(os.path.relpath(rep, out_dir)).as_posix())}">{esc(name)}</a>'
        sep = {True: "separates", False: "does NOT separate"}.get(h.get("separates"))
        rows.append([link, h["n_layers"], h["n_heads"], h["harmful_mean"], h["harmless_mean"], h["gap"], sep,
                     h["max_resid_last"], where, h["n_refusal_heads"], h["sufficiency"],
                     fmt_ci(h.get("sufficiency_ci95"), 3)])
    return rows


EVAL_RATES = ("harmless_refusal_rate_added", "harmful_refusal_rate_ablated", "harmful_refusal_rate_subtracted")


def _evaluation_table(runs: Sequence[Run]) -> str:
    """Held-out refusal rates (value and baseline per run) and the selected layer at its depth; "" unless every
    run has an ``evaluation`` entry."""
    evs = [r.get("evaluation") for _, _, r in runs]
    if not evs or not all(isinstance(e, dict) and e for e in evs):
        return ""
    keys = [k for k in EVAL_RATES if any(isinstance(e.get(k), dict) for e in evs)]
    keys += sorted({k for e in evs for k, v in e.items()
                    if "refusal_rate" in str(k) and isinstance(v, dict) and k not in keys})
    with_ci = any(interval((e.get(k) or {}).get("ci95")) for e in evs for k in keys if isinstance(e.get(k), dict))
    rows = []
    for (name, _, r), e in zip(runs, evs):
        d = r.get("direction") if isinstance(r.get("direction"), dict) else {}
        layer = d.get("layer", e.get("layer"))
        depth = finite(layer) / _n_layers(r) if finite(layer) is not None else None
        row: list[Any] = [name, layer, depth, e.get("alpha")]
        for k in keys:
            v = e.get(k) if isinstance(e.get(k), dict) else {}
            row += [v.get("value"), v.get("baseline"), v.get("n")]
            if with_ci:  # Wilson intervals, where recorded
                row += [fmt_ci(v.get("ci95")), fmt_ci(v.get("baseline_ci95"))]
        rows.append(row)
    heads = ["model", "layer", "depth (layer / n_layers)", "alpha"]
    for k in keys:
        short = k.replace("_refusal_rate", "").replace("refusal_rate_", "").replace("_", " ") or k
        heads += [f"{short}: value", f"{short}: baseline", f"{short}: n"]
        if with_ci:
            heads += [f"{short}: 95% CI", f"{short}: baseline 95% CI"]
    return ('<h2 id="evaluation">Held-out refusal rates</h2>'
            '<p class="muted">Steering evaluation on each run\'s held-out test instructions; the direction\'s '
            "layer is shown at its depth so models of different size compare.</p>" + table(heads, rows))


def compare_runs(run_dirs: list[Path], out_dir: Path) -> Path:
    """Write depth-normalised comparison PNGs and a self-contained ``comparison.html`` into ``out_dir``."""
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run folder")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dirs = [Path(d) for d in run_dirs]
    results = [load_results(d) for d in dirs]
    runs: list[Run] = list(zip(_labels(results, dirs), dirs, results))

    figs: list[tuple[str, Path]] = []

    def emit(fig: Figure | None, stem: str, caption: str) -> None:
        if fig is not None:
            figs.append((caption, save(fig, out_dir / f"{stem}.png")))

    emit(baseline_compare_figure(runs), "compare_baseline", "Baseline means and gap per model")
    emit(dla_compare_figure(runs), "compare_dla", "Logit attribution against depth")
    emit(last_position_figure(runs), "compare_last_position", "Patching at the last position against depth")
    present = [g for g in GRID_ORDER if any(isinstance((r.get("patching") or {}).get(g), dict) for _, _, r in runs)]
    for g in present:
        emit(grid_compare_figure(runs, g), f"compare_{g}", f"{g}, side by side (rows at layer / n_layers)")
    emit(heads_compare_figure(runs), "compare_heads_ranked", "Ranked refusal heads")

    plots = Plots()
    body = [f"<h1 id=\"overview\">Refusal circuit comparison: {esc(', '.join(n for n, _, _ in runs))}</h1>",
            f'<p class="muted">Layers are shown at depth layer / n_layers so models of different depth overlay. '
            f"Patching values: {esc(METRIC_TITLE)}.</p>",
            '<h2 id="headline">Headline numbers</h2>',
            table(["model", "layers", "heads", "harmful mean", "harmless mean", "gap", "sanity check",
                   "max resid patching, last position", "at", "heads above threshold", "joint sufficiency",
                   "sufficiency 95% CI"],
                  _headline_rows(runs, out_dir), raw=(0,)),
            _evaluation_table(runs),
            '<h2 id="interactive">Overlays</h2>']

    def dla_diff(r: dict[str, Any]) -> Any:
        d = _dla_depth(r)
        return None if d is None else (d[0], d[1] - d[2])

    body.append(_overlay(plots, runs, "Accumulated residual DLA, harmful − harmless", dla_diff,
                         metric_label(runs[0][2])))
    curves = [_overlay(plots, runs, f"{g} patching at the last position", lambda r, g=g: _last_column(r, g),
                       "normalised metric") for g in CURVE_GRIDS]
    body.append('<div class="row">' + "".join(f"<div>{c}</div>" for c in curves if c) + "</div>")
    body.append('<h2 id="figures">Figures</h2>')
    for caption, p in figs:
        body.append(f"<h3>{esc(caption)}</h3><img class=\"fig\" alt=\"{esc(caption)}\" src=\"{png_data_uri(p)}\">")
    nav = [("overview", "Overview"), ("headline", "Headline numbers"), ("interactive", "Overlays"),
           ("figures", "Figures")]
    if any('id="evaluation"' in b for b in body):
        nav.insert(2, ("evaluation", "Held-out refusal rates"))
    path = out_dir / "comparison.html"
    write_text(path, page("refusal-lab comparison", nav, "\n".join(b for b in body if b), plots))  # atomic
    return path

