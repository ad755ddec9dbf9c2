"""Figure specs of a comparison of several runs: layers at depth ``layer / n_layers`` so models of
different depth share one axis, one colour per run (see :mod:`refusal_lab.report.specs`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refusal_lab.report.common import as_array, layer_depth, metric_label
from refusal_lab.report.specs import (
    HARMFUL, HARMLESS, METRIC_TITLE, Chart, Panels, Rule, Series, run_color, symmetric_limit,
)
from refusal_lab.report.specs.run import ZERO, grid_heatmap
from refusal_lab.run.results import GRID_NAMES, Results

Run = tuple[str, Path, Results]
"""A run's label, folder and results."""
DEPTH = "depth (layer / n_layers)"
CURVE_GRIDS = tuple(g for g in GRID_NAMES if g != "heads")


def dla_depth(r: Results) -> tuple[list[float], np.ndarray, np.ndarray]:
    """The accumulated-residual DLA labels at their depth, and both sides' means."""
    d, n = r["dla"], r["model"]["n_layers"]
    labels = d["labels"]
    x = [layer_depth(lab, n, i, len(labels)) for i, lab in enumerate(labels)]
    return x, as_array(d["harmful_mean"]), as_array(d["harmless_mean"])


def last_column(r: Results, grid: str) -> tuple[list[float], list[float]] | None:
    """A grid's last position against depth, None when the run has no such grid."""
    g = r["patching"].get(grid)
    if g is None:
        return None
    n = r["model"]["n_layers"]
    return [row / n for row in g["rows"]], list(as_array(g["values"])[:, -1])


def baseline_chart(runs: list[Run]) -> Chart:
    """Harmful and harmless baseline means per run, the gap in the labels."""
    x = list(range(len(runs)))
    hm = [r["baseline"]["harmful_mean"] for _, _, r in runs]
    sm = [r["baseline"]["harmless_mean"] for _, _, r in runs]
    return Chart(("Baseline metric per model",),
                 [Series("harmful mean", x, hm, HARMFUL, kind="bar", value_labels=True),
                  Series("harmless mean", x, sm, HARMLESS, kind="bar", value_labels=True)],
                 ylabel=metric_label(runs[0][2]), rules=[ZERO],
                 xticks=[f"{name} (gap {a - b:.2f})" for (name, _, _), a, b in zip(runs, hm, sm)])


def dla_panels(runs: list[Run]) -> Panels:
    """Accumulated-residual DLA against depth: both sides (solid harmful, dotted harmless), and harmful − harmless."""
    sides, diffs = [], []
    for i, (name, _, r) in enumerate(runs):
        x, h, s = dla_depth(r)
        sides += [Series(f"{name} harmful", x, list(h), run_color(i)),
                  Series(f"{name} harmless", x, list(s), run_color(i), dash="dot")]
        diffs.append(Series(name, x, list(h - s), run_color(i)))
    return Panels(("Logit attribution against depth",), [
        Chart(("Accumulated residual DLA against depth (solid harmful, dotted harmless)",), sides, xlabel=DEPTH,
              ylabel=metric_label(runs[0][2]), xlim=(0.0, 1.02)),
        Chart(("Accumulated residual DLA, harmful − harmless",), diffs, xlabel=DEPTH, ylabel="harmful − harmless",
              rules=[ZERO], xlim=(0.0, 1.02))])


def last_position_panels(runs: list[Run]) -> Panels | None:
    """Patching at the last position against depth, one panel per grid, one curve per run."""
    charts = []
    for g in CURVE_GRIDS:
        series = [Series(name, *c, run_color(i)) for i, (name, _, r) in enumerate(runs)
                  if (c := last_column(r, g)) is not None]
        if series:
            charts.append(Chart((f"{g} patching at the last position",), series, xlabel=DEPTH,
                                ylabel="normalised metric", rules=[ZERO], xlim=(0.0, 1.02)))
    if not charts:
        return None
    return Panels((f"Patching at the last position ({METRIC_TITLE})",), charts, columns=2 if len(charts) > 1 else 1)


def grid_panels(runs: list[Run], grid: str) -> Panels | None:
    """One heatmap per run for ``grid``, rows at their depth, one colour scale for all."""
    items = [(name, r) for name, _, r in runs if grid in r["patching"]]
    if not items:
        return None
    maps = [grid_heatmap("exact", grid, r["patching"][grid], r) for _, r in items]
    zlim = max(symmetric_limit(m.z) for m in maps)
    for m, (name, r) in zip(maps, items):
        n, rows = r["model"]["n_layers"], m.rows
        m.title, m.zlim, m.ylabel, m.hover = (name, grid), zlim, DEPTH, None
        m.depth = (rows[0] / n, (rows[-1] + 1) / n)
    return Panels((f"{grid}, side by side (rows at layer / n_layers)",), list(maps), columns=len(maps),
                  shared_scale=True)


def heads_chart(runs: list[Run]) -> Chart | None:
    """Ranked head patching effects per run (rank on x), each run's threshold dashed in its colour."""
    with_heads = [(i, name, r["heads"]) for i, (name, _, r) in enumerate(runs) if "heads" in r]
    if not with_heads:
        return None
    return Chart(("Ranked head patching effects (dashed: threshold)",),
                 [Series(name, list(range(1, len(h["ranked"]) + 1)), [x["value"] for x in h["ranked"]], run_color(i))
                  for i, name, h in with_heads],
                 xlabel="rank", ylabel="normalised metric",
                 rules=[Rule(h["threshold"], color=run_color(i)) for i, _, h in with_heads])

