"""The interactive (plotly) renderer of figure specs (:mod:`refusal_lab.report.specs`) for the HTML pages.

:class:`Plots` collects the plotly figures of one page and hands out their placeholder ``<div>``;
the page embeds them as JSON once (:func:`script_json`) with plotly.js from the installed
``plotly`` package, so a page needs no network. Text shown *inside* plotly (ticks, legend, hover,
titles) is entity-escaped (:func:`ptext`), because plotly interprets a small subset of HTML tags.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

import numpy as np
from matplotlib import colormaps

from refusal_lab.report.common import fmt
from refusal_lab.report.specs import INK, Chart, Heatmap, Lines, Rule, Series, Spec

DIVERGING = [[i / 10, "rgb({},{},{})".format(*(int(255 * c) for c in colormaps["RdBu_r"](i / 10)[:3]))]
             for i in range(11)]
DASHES = {"solid": "solid", "dash": "dash", "dot": "dot"}
SYMBOLS = {"x": {"symbol": "x-thin", "size": 7}, "box": {"symbol": "square-open", "size": 16}}


def ptext(x: Any) -> str:
    """Text for inside plotly: entities for ``& < > $``, newlines made visible."""
    s = str(x).replace("\r", "\\r").replace("\n", "\\n")
    return html.escape(s, quote=False).replace("$", "&#36;")  # a $...$ label would switch plotly to MathJax


def plines(lines: Lines) -> str:
    """Lines of spec text as one plotly label."""
    return "<br>".join(ptext(x) for x in lines if x)


def ptick(x: Any, limit: int = 32) -> str:
    """:func:`ptext` for an axis tick: long labels are cut (hover shows them in full)."""
    t = str(x)
    return ptext(t if len(t) <= limit else t[: limit - 1] + "…")


def clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, np.generic):
        return clean(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def script_json(obj: Any) -> str:
    """JSON that is safe to place inside a ``<script>`` element (no ``</script>``, no ``<!--``)."""
    s = json.dumps(clean(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (s.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def plotly_js() -> str | None:
    """The plotly.js bundle from the installed ``plotly`` package, or None when it is missing."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        return None
    return get_plotlyjs()


def _title(lines: Lines, height: int) -> tuple[dict[str, Any], int]:
    """A title below plotly's mode bar, and the top margin it needs."""
    n = len([x for x in lines if x])
    return {"text": plines(lines), "font": {"size": 13}, "y": 1 - 42 / height, "yanchor": "top"}, 52 + 20 * n


def _ticks(labels: list[Any], most: int) -> dict[str, Any]:
    step = max(1, math.ceil(len(labels) / most))
    idx = list(range(0, len(labels), step))
    return {"tickvals": idx, "ticktext": [ptick(labels[i]) for i in idx]}


def heatmap_figure(h: Heatmap, zlim: float | None = None) -> tuple[list[dict], dict, int]:
    """Plotly data, layout and height of a heatmap (hover per cell, marks as marker traces)."""
    a = np.asarray(h.z, dtype=float)
    nr, nc = a.shape
    hover = h.hover or [[(f"{h.ylabel} {h.rows[i]}", str(h.cols[j]), f"value {fmt(a[i, j], 4)}") for j in range(nc)]
                        for i in range(nr)]
    text = [[plines(c) for c in row] for row in hover]
    trace: dict[str, Any] = {"type": "heatmap", "z": a, "x": list(range(nc)), "y": list(range(nr)), "text": text,
                             "hovertemplate": "%{text}<extra></extra>",
                             "colorbar": {"title": {"text": plines(h.colorbar), "side": "right"}, "thickness": 14}}
    if h.scale == "diverging":
        v = zlim if zlim is not None else h.limit()
        trace.update(colorscale=DIVERGING, zmin=-v, zmax=v, zmid=0)
    else:
        trace.update(colorscale="Viridis", reversescale=True)
    data = [trace]
    for m in h.marks:
        data.append({"type": "scatter", "mode": "markers", "name": ptext(m.name), "x": [j for _, j in m.cells],
                     "y": [i for i, _ in m.cells], "text": [text[i][j] for i, j in m.cells],
                     "hovertemplate": f"{ptext(m.name)}<br>%{{text}}<extra></extra>",
                     "marker": {**SYMBOLS[m.symbol], "color": m.color, "line": {"width": 3 if m.symbol == "box" else 1,
                                                                                 "color": m.color}}})
    height = int(min(900, max(380, 18 * nr + 200)))
    title, top = _title(h.title, height)
    long = any(len(str(c)) > 6 for c in h.cols)
    layout = {"title": title, "margin": {"l": 70, "r": 30, "t": top, "b": 90},
              # angled long labels would overlap an axis title, and they name themselves anyway
              "xaxis": {"title": {"text": "" if long else ptext(h.xlabel)}, **_ticks(h.cols, 60),
                        "tickangle": -35 if long else 0, "zeroline": False},
              "yaxis": {"title": {"text": ptext(h.ylabel)}, **_ticks(h.rows, 24), "zeroline": False},
              "legend": {"orientation": "h", "y": -0.18}}
    return data, layout, height


def _trace(s: Series, xticks: list[str] | None) -> dict[str, Any]:
    labels = [xticks[int(x)] for x in s.x] if xticks else [fmt(x) for x in s.x]
    hover = s.hover or [(s.name, lab, fmt(y, 4)) for lab, y in zip(labels, s.y)]
    t: dict[str, Any] = {"name": ptext(s.name), "x": list(s.x), "y": list(s.y), "text": [plines(h) for h in hover],
                         "hovertemplate": "%{text}<extra></extra>"}
    if s.kind == "bar":
        t.update(type="bar", marker={"color": s.color}, textposition="outside" if s.value_labels else "none")
        if s.value_labels:
            t["texttemplate"] = "%{y:.2f}"
    elif s.kind == "points":
        t.update(type="scatter", mode="markers", marker={"size": 5, "color": s.color, "opacity": 0.7})
    else:
        t.update(type="scatter", mode="lines+markers", line={"color": s.color, "dash": DASHES[s.dash]},
                 marker={"size": 5})
    if s.err is not None and any(e is not None for e in s.err):
        t["error_y"] = {"type": "data", "symmetric": False, "array": [None if e is None else e[1] for e in s.err],
                        "arrayminus": [None if e is None else e[0] for e in s.err], "thickness": 1.2, "width": 4,
                        "color": INK}
    return t


def _rule(r: Rule, xs: list[float]) -> dict[str, Any]:
    """A rule: a named horizontal one as a legend trace along the data, any other as a shape
    (vertical ones are named in the chart's title)."""
    line = {"dash": DASHES[r.dash], "color": r.color, "width": 1.5 if r.name else 1}
    if r.name and xs and r.axis == "h":
        return {"type": "scatter", "mode": "lines", "name": ptext(r.name), "x": [min(xs), max(xs)], "y": [r.at, r.at],
                "line": line, "hovertemplate": f"{ptext(r.name)}<extra></extra>"}
    if r.axis == "h":
        return {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": r.at, "y1": r.at, "line": line}
    return {"type": "line", "yref": "paper", "x0": r.at, "x1": r.at, "y0": 0, "y1": 1, "line": line}


def chart_figure(c: Chart, height: int = 420) -> tuple[list[dict], dict, int]:
    """Plotly data, layout and height of a chart."""
    data = [_trace(s, c.xticks) for s in c.series]
    xs = [float(x) for s in c.series for x in s.x]
    rules = [_rule(r, xs) for r in c.rules]
    data += [x for x in rules if "mode" in x]
    shapes = [x for x in rules if "mode" not in x]
    bars = [s for s in c.series if s.kind == "bar"]
    title, top = _title(c.title, height)
    xaxis: dict[str, Any] = {"title": {"text": ptext(c.xlabel)}}
    if c.xticks is not None:
        xaxis.update(_ticks(c.xticks, 30), tickangle=-45 if any(len(t) > 6 for t in c.xticks) else 0)
    if c.xlim:
        xaxis["range"] = list(c.xlim)
    xaxis["zeroline"] = False  # zero lines are rules where a chart wants one
    yaxis: dict[str, Any] = {"title": {"text": ptext(c.ylabel)}, "zeroline": False}
    if c.ylim:
        yaxis["range"] = list(c.ylim)
    legend = sum(s.kind != "points" for s in c.series) + sum(bool(r.name) for r in c.rules) > 1
    layout = {"title": title, "margin": {"l": 70, "r": 30, "t": top, "b": 90}, "xaxis": xaxis, "yaxis": yaxis,
              "shapes": shapes, "legend": {"orientation": "h", "y": -0.25},
              "barmode": "group" if len(bars) > 1 and all(s.x == bars[0].x for s in bars) else "overlay",
              "showlegend": c.shows_legend(legend)}
    return data, layout, height


class Plots:
    """The plotly figures of one page; :meth:`add` registers a spec and returns its ``<div>``(s)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.specs: dict[str, dict[str, Any]] = {}

    def _div(self, data: list[dict], layout: dict, height: int) -> str:
        pid = f"plot{len(self.specs)}"
        base = {"height": height, "paper_bgcolor": "#fff", "plot_bgcolor": "#fff", "font": {"size": 12},
                "hoverlabel": {"align": "left"}}
        layout = {**base, **layout}
        for axis in ("xaxis", "yaxis"):
            layout[axis] = {"automargin": True, **layout.get(axis, {})}
        self.specs[pid] = {"data": data, "layout": layout}
        return f'<div class="plot" id="{pid}" style="height:{height}px"></div>'

    def add(self, spec: Spec) -> str:
        """The page's container(s) of ``spec``: one ``<div>``, or a row of them for :class:`Panels`
        (empty when plotly is unavailable)."""
        if not self.enabled:
            return ""
        if isinstance(spec, Heatmap):
            return self._div(*heatmap_figure(spec))
        if isinstance(spec, Chart):
            return self._div(*chart_figure(spec))
        lim = max(p.limit() for p in spec.panels if isinstance(p, Heatmap)) if spec.shared_scale else None
        divs = [self._div(*(heatmap_figure(p, lim) if isinstance(p, Heatmap) else chart_figure(p, 400)))
                for p in spec.panels]
        return '<div class="row">' + "".join(f"<div>{d}</div>" for d in divs) + "</div>"
