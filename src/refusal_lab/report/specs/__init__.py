"""What every figure of the report shows, independent of how it is drawn.

A figure is described once, as a spec: a :class:`Heatmap` (a matrix with row/column labels, a
colour scale, per-cell hover text and marked cells), a :class:`Chart` (bar, line or point
:class:`Series` with error bars and reference :class:`Rule` lines) or :class:`Panels` (several of
them under one title). The builders in :mod:`.run`, :mod:`.steering` and :mod:`.compare` turn
typed results into specs; :mod:`refusal_lab.report.figures` draws them as PNGs (matplotlib) and
:mod:`refusal_lab.report.interactive` as plotly figures, so data, colours, labels and titles can
no longer drift apart between the two views.

Text in a spec is plain (model-derived strings included): each renderer escapes it for its own
medium. Multi-line text (titles, colour-bar titles, hover) is a tuple of lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np

HARMFUL, HARMLESS = "#c0392b", "#2e86c1"
"""The two prompt sets, everywhere."""
NEUTRAL = "#95a5a6"
"""Unedited baselines, heads below the threshold, components that are neither attn nor mlp."""
INK = "#333333"
"""Differences, y = x lines, the chosen alpha, error bars."""
POINTS = "#34495e"
ATTN, MLP = "#8e44ad", "#16a085"
FILTERED, SELECTED = "#555555", "#e74c3c"
RUN_COLORS = ("#c0392b", "#2e86c1", "#27ae60", "#8e44ad", "#d35400", "#16a085", "#7f8c8d")
"""One colour per run in comparisons."""
METRIC_TITLE = "0 = harmless baseline, 1 = harmful baseline"

Lines = tuple[str, ...]


def run_color(i: int) -> str:
    """The comparison colour of the ``i``-th run."""
    return RUN_COLORS[i % len(RUN_COLORS)]


@dataclass
class Mark:
    """Heatmap cells drawn over the colours: crossed (``x``) or outlined (``box``)."""

    name: str
    cells: list[tuple[int, int]]  # (row, column) indices
    symbol: Literal["x", "box"]
    color: str


@dataclass
class Heatmap:
    """A matrix, rows bottom to top.

    ``scale``: ``diverging`` (red-blue, centred at 0, ± ``zlim`` or max |z|) or ``sequential``
    (viridis reversed: low values strong). ``hover``: per cell, lines (default: row, column,
    value). ``depth``: place the rows on a continuous axis from ``depth[0]`` to ``depth[1]``
    (comparisons: layer / n_layers) instead of one tick per row."""

    z: np.ndarray
    rows: list[Any]
    cols: list[Any]
    title: Lines
    colorbar: Lines
    xlabel: str
    ylabel: str = "layer"
    scale: Literal["diverging", "sequential"] = "diverging"
    zlim: float | None = None
    hover: list[list[Lines]] | None = None
    marks: list[Mark] = field(default_factory=list)
    depth: tuple[float, float] | None = None

    def limit(self) -> float:
        """The diverging scale's half range: ``zlim``, else max |z| over finite cells (never 0)."""
        if self.zlim is not None:
            return self.zlim
        return symmetric_limit(self.z)


@dataclass
class Series:
    """Points of one kind and colour. ``err``: per point ``(below, above)`` offsets or None
    (:func:`refusal_lab.report.common.error_offsets`); ``hover``: per point, lines (default:
    name, x, y); ``color`` may be one colour per point (bars)."""

    name: str
    x: list[Any]
    y: list[float | None]
    color: Union[str, list[str]]
    kind: Literal["line", "bar", "points"] = "line"
    dash: Literal["solid", "dash", "dot"] = "solid"
    err: list[tuple[float, float] | None] | None = None
    hover: list[Lines] | None = None
    value_labels: bool = False


@dataclass
class Rule:
    """A reference line: horizontal (``h``, at y) or vertical (``v``, at x); named ones get a legend entry."""

    at: float
    axis: Literal["h", "v"] = "h"
    color: str = INK
    dash: Literal["solid", "dash", "dot"] = "dash"
    name: str | None = None


@dataclass
class Chart:
    """Axes with series. ``xticks``: the x values are 0..n-1 and these name them (categories);
    bar series that share their x are drawn side by side."""

    title: Lines
    series: list[Series]
    xlabel: str = ""
    ylabel: str = ""
    rules: list[Rule] = field(default_factory=list)
    xticks: list[str] | None = None
    ylim: tuple[float, float] | None = None
    xlim: tuple[float, float] | None = None
    legend: bool | None = None  # None: each renderer's own rule (a legend for lines, bars or named rules, not points alone)

    def shows_legend(self, default: bool) -> bool:
        """:attr:`legend` where set, else the renderer's ``default``."""
        return self.legend if self.legend is not None else default


@dataclass
class Panels:
    """Several charts or heatmaps under one title, ``columns`` to a row (the PNG is one file; the
    interactive view shows the panels side by side). ``shared_scale``: heatmaps share one colour bar."""

    title: Lines
    panels: list[Union[Chart, Heatmap]]
    columns: int = 1
    shared_scale: bool = False


Spec = Union[Chart, Heatmap, Panels]


def symmetric_limit(a: Any) -> float:
    """max |a| over finite cells (never zero), for a colour scale centred at 0."""
    a = np.asarray(a, dtype=float)
    fin = np.abs(a[np.isfinite(a)])
    return float(max(fin.max() if fin.size else 1.0, 1e-9))
