"""The PNG renderer of figure specs (:mod:`refusal_lab.report.specs`), and ``figures/*.png`` of a run.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (Agg canvas, no pyplot), so
this module never touches the global backend and is safe to call from scripts, tests and servers.
Every PNG is written atomically, like every other run artifact.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import warnings
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from refusal_lab.artifacts import atomic_target
from refusal_lab.report.common import iter_grids
from refusal_lab.report.specs import INK, Chart, Heatmap, Lines, Panels, Series, Spec
from refusal_lab.report.specs import geometry as geometry_specs
from refusal_lab.report.specs import run as run_specs
from refusal_lab.report.specs import steering as steering_specs
from refusal_lab.run.results import Results, read_results

DPI = 120
SCALES = {"diverging": "RdBu_r", "sequential": "viridis_r"}
DASHES = {"solid": "-", "dash": "--", "dot": ":"}


def mpl_text(s: Any, limit: int | None = None) -> str:
    """A string safe for matplotlib (no mathtext, visible whitespace, cut to ``limit``)."""
    s = str(s)
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    s = s.replace("$", r"\$").replace("\n", "\\n").replace("\t", "\\t")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)


def mpl_lines(lines: Lines) -> str:
    """Lines of spec text as one matplotlib label."""
    return "\n".join(mpl_text(x) for x in lines if x)


def new_figure(w: float, h: float) -> Figure:
    """A figure on an Agg canvas with a constrained layout."""
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG atomically, silencing missing-glyph warnings for exotic tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with atomic_target(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    return path


def _ticks(ax: Axes, labels: list[Any], max_ticks: int, axis: str = "x") -> None:
    """Name integer positions with ``labels``, at most ``max_ticks`` of them (always the last)."""
    step = max(1, math.ceil(len(labels) / max_ticks))
    idx = list(range(0, len(labels), step))
    if labels and idx[-1] != len(labels) - 1 and axis == "x":
        idx.append(len(labels) - 1)
    texts = [mpl_text(labels[i], 32) for i in idx]
    if axis == "y":
        ax.set_yticks(idx, texts, fontsize=8)
        return
    long = any(len(t) > 4 for t in texts)
    ax.set_xticks(idx, texts, rotation=40 if long else 0, ha="right" if long else "center", fontsize=8)


def draw_heatmap(ax: Axes, h: Heatmap, vlim: float | None = None):
    """Draw ``h`` on ``ax``; returns the image (for a colour bar), None when it is empty."""
    a = np.asarray(h.z, dtype=float)
    if a.ndim != 2 or a.size == 0:
        ax.set_axis_off()
        ax.set_title(f"{mpl_lines(h.title)}\n(empty)", fontsize=10)
        return None
    cmap = colormaps[SCALES[h.scale]].with_extremes(bad="#dddddd")
    lim = vlim if vlim is not None else h.limit()
    span = dict(vmin=-lim, vmax=lim) if h.scale == "diverging" else {}
    extent = (-0.5, a.shape[1] - 0.5, *h.depth) if h.depth else None
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, aspect="auto", origin="lower", interpolation="nearest",
                   extent=extent, **span)
    _ticks(ax, h.cols, 40)
    if h.depth is None:
        _ticks(ax, h.rows, 16, axis="y")
    for m in h.marks:
        if m.cells and m.symbol == "x":
            ys, xs = zip(*m.cells)
            ax.scatter(xs, ys, marker="x", s=14, color=m.color, lw=0.7, label=m.name)
        for i, j in m.cells if m.symbol == "box" else []:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec=m.color, lw=2.5, label=m.name))
    if any(m.cells for m in h.marks):
        ax.legend(fontsize=7, loc="upper right", framealpha=0.9)
    if h.scale == "diverging" and a.size <= 200 and h.depth is None:
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                if np.isfinite(a[i, j]):
                    ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=5.5,
                            color="white" if abs(a[i, j]) > 0.6 * lim else "black")
    ax.set_xlabel(mpl_text(h.xlabel))
    ax.set_ylabel(mpl_text(h.ylabel))
    ax.set_title(mpl_lines(h.title), fontsize=10)
    return im


def _draw_series(ax: Axes, s: Series, offset: float, width: float) -> None:
    x = np.asarray(s.x, dtype=float) + offset
    y = np.array([np.nan if v is None else v for v in s.y], dtype=float)
    yerr = None
    if s.err is not None and any(e is not None for e in s.err):
        yerr = np.array([e if e is not None else (0.0, 0.0) for e in s.err]).T
    label = mpl_text(s.name, 60)
    if s.kind == "bar":
        bars = ax.bar(x, y, width, color=s.color, label=label, yerr=yerr, capsize=3 if yerr is not None else 0,
                      ecolor=INK)
        if s.value_labels:
            ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    elif s.kind == "points":
        ax.scatter(x, y, s=10, alpha=0.7, color=s.color)
    elif yerr is not None:
        ax.errorbar(x, y, yerr=yerr, color=s.color, ls=DASHES[s.dash], marker="o", ms=4, capsize=3, lw=1.5,
                    label=label)
    else:
        ax.plot(x, y, color=s.color, ls=DASHES[s.dash], marker="." if len(x) > 12 else "o", ms=4, lw=1.3,
                label=label)


def draw_chart(ax: Axes, c: Chart) -> None:
    """Draw ``c`` on ``ax``: bar series sharing their x side by side, rules, ticks, labels, legend."""
    bars = [s for s in c.series if s.kind == "bar"]
    grouped = len(bars) > 1 and all(s.x == bars[0].x for s in bars)
    width = 0.8 / len(bars) if grouped else 0.8
    for s in c.series:
        k = bars.index(s) if grouped and s in bars else None
        _draw_series(ax, s, 0.0 if k is None else (k - (len(bars) - 1) / 2) * width, width)
    for rule in c.rules:
        draw = ax.axhline if rule.axis == "h" else ax.axvline
        draw(rule.at, color=rule.color, ls=DASHES[rule.dash], lw=1.1 if rule.name else 0.7,
             label=mpl_text(rule.name) if rule.name else None)
    if c.xticks is not None:
        _ticks(ax, c.xticks, 30)
    if c.ylim:
        ax.set_ylim(*c.ylim)
    if c.xlim:
        ax.set_xlim(*c.xlim)
    ax.set_xlabel(mpl_text(c.xlabel))
    ax.set_ylabel(mpl_text(c.ylabel), fontsize=8)
    ax.set_title(mpl_lines(c.title), fontsize=9)
    if ax.get_legend_handles_labels()[0] and c.shows_legend(any(s.kind != "points" for s in c.series)):
        ax.legend(fontsize=7)


def _size(spec: Chart | Heatmap) -> tuple[float, float]:
    """A PNG size (inches) that fits the spec's content."""
    if isinstance(spec, Heatmap):
        nr, nc = spec.z.shape if spec.z.ndim == 2 else (1, 1)
        per_col = 0.75 if any(len(str(c)) > 4 for c in spec.cols) else 0.42
        return min(16.0, max(6.0, per_col * nc + 3.5)), min(14.0, max(4.5, 0.26 * nr + 2.4))
    if c_n := len(spec.xticks or []):
        return min(16.0, max(6.0, 0.38 * c_n + 2.0)), 4.4
    return (6.0, 5.5) if any(s.kind == "points" for s in spec.series) else (9.0, 4.4)


def render(spec: Spec) -> Figure:
    """The matplotlib figure of a spec."""
    if isinstance(spec, Panels):
        cols = max(1, spec.columns)
        rows = math.ceil(len(spec.panels) / cols)
        w, h = _size(spec.panels[0])
        fig = new_figure(min(20.0, max(9.0, cols * min(w, 6.5))), min(16.0, rows * min(h, 4.2) + 0.6))
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        lim = max(p.limit() for p in spec.panels if isinstance(p, Heatmap)) if spec.shared_scale else None
        im = None
        for ax, p in zip(axes, spec.panels):
            if isinstance(p, Heatmap):
                im = draw_heatmap(ax, p, lim) or im
            else:
                draw_chart(ax, p)
        for ax in axes[len(spec.panels):]:
            ax.set_axis_off()
        if im is not None and spec.shared_scale:
            fig.colorbar(im, ax=list(axes), shrink=0.9).set_label(mpl_lines(spec.panels[0].colorbar), fontsize=8)
        fig.suptitle(mpl_lines(spec.title), fontsize=10)
        return fig
    fig = new_figure(*_size(spec))
    ax = fig.add_subplot()
    if isinstance(spec, Heatmap):
        im = draw_heatmap(ax, spec)
        if im is not None:
            fig.colorbar(im, ax=ax, shrink=0.9).set_label(mpl_lines(spec.colorbar), fontsize=8)
    else:
        draw_chart(ax, spec)
    return fig


def run_specs_by_file(r: Results) -> list[tuple[str, Spec]]:
    """Every figure of a run as ``(file stem, spec)``: what ``figures/`` holds, in report order."""
    out: list[tuple[str, Spec]] = [
        ("baseline", run_specs.baseline_chart(r)), ("dla_resid", run_specs.dla_resid_chart(r)),
        ("dla_components", run_specs.dla_components_panels(r)), ("dla_heads", run_specs.dla_heads_heatmap(r))]
    scatters = run_specs.attribution_scatters(r)
    for kind, name, slug, grid in iter_grids(r):
        out.append((slug, run_specs.grid_heatmap(kind, name, grid, r)))
        if kind == "attribution" and name in scatters:
            out.append((f"scatter_{name}", scatters[name]))
    if "heads" in r and r["heads"]["ranked"]:
        out.append(("heads_ranked", run_specs.heads_ranked_chart(r)))
    if "direction" in r:
        out.append(("steering_direction", steering_specs.direction_heatmap(r["direction"])))
    if "steering" in r:
        out.append(("steering_sweep", steering_specs.sweep_panels(r["steering"]["instructions"])))
        if r["steering"]["objects"]:
            out.append(("steering_objects", steering_specs.objects_panels(r)))
    if "evaluation" in r:
        out.append(("steering_evaluation", steering_specs.evaluation_chart(r["evaluation"])))
    if "geometry" in r:
        out += geometry_specs.geometry_specs(r["geometry"])
    return out


_PENDING: list[tuple[Path, Spec]] = []
"""The figures a forked worker of :func:`write_figures` renders (inherited from the parent, not pickled)."""


def _render_pending(i: int) -> Path:
    path, spec = _PENDING[i]
    return save(render(spec), path)


def write_figures(results: Results | Mapping[str, Any] | Path | str, out_dir: Path,
                  processes: int | None = None) -> list[Path]:
    """Write every figure of a run (its results, a dict, a run folder or a ``results.json`` path,
    checked by :func:`~refusal_lab.run.results.read_results`) as PNGs into ``out_dir``; their paths.

    Drawing is CPU-bound Python (matplotlib's text layout most of it), so the figures are drawn by
    ``processes`` forked workers (default: one per CPU core, at most 4; 1 draws them here), where
    the platform forks; each PNG is still written atomically and an error in any is raised here."""
    r = read_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(out_dir / f"{stem}.png", spec) for stem, spec in run_specs_by_file(r)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(cores, 4) if processes is None else max(1, int(processes))
    if n == 1 or len(todo) < 8 or "fork" not in multiprocessing.get_all_start_methods():
        return [save(render(spec), path) for path, spec in todo]
    _PENDING[:] = todo
    try:
        with ProcessPoolExecutor(min(n, len(todo)), mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_render_pending, range(len(todo))))
    finally:
        _PENDING.clear()
