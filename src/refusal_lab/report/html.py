"""One self-contained HTML report for a run folder (plotly.js embedded once, no network access).

Every model- or user-derived string is escaped with :func:`html.escape` before it reaches the page;
figure data travels as JSON inside ``<script type="application/json">`` with ``<``, ``>`` and ``&``
written as ``\\u003c`` etc., so no value can close the script element. Text shown *inside* plotly
(ticks, hover) is entity-escaped too, because plotly interprets a small subset of HTML tags.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from matplotlib import colormaps

from refusal_lab.artifacts import write_text
from refusal_lab.report.common import (
    candidate_grid,
    error_offsets,
    METRIC_TITLE,
    as_array,
    finite,
    fmt,
    fmt_ci,
    grid_title,
    headline,
    interval,
    iter_grids,
    load_results,
    sanity_of,
)

HARMFUL, HARMLESS = "#c0392b", "#2e86c1"
SEQ_COLORS = ["#c0392b", "#2e86c1", "#27ae60", "#8e44ad", "#d35400", "#16a085", "#7f8c8d"]
DIVERGING = [[i / 10, "rgb({},{},{})".format(*(int(255 * c) for c in colormaps["RdBu_r"](i / 10)[:3]))]
             for i in range(11)]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#222;
 background:#fafafa;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:16px 24px 64px}
h1{font-size:1.6em;margin:.4em 0 .2em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}
h3{margin:1.4em 0 .4em;font-size:1.05em}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:6px 24px;z-index:10;
 font-size:.9em}nav a{margin-right:12px;color:#2c3e50;text-decoration:none}nav a:hover{text-decoration:underline}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.9em;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f3f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#fff;border:1px solid #ddd;padding:8px;overflow-x:auto;white-space:pre-wrap;
 word-break:break-word;font-size:.85em}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:150px}
.card .v{font-size:1.5em;font-weight:600}.card .k{font-size:.8em;color:#666}
.plot{background:#fff;border:1px solid #ddd;margin:8px 0}
.row{display:flex;flex-wrap:wrap;gap:16px}.row>div{flex:1 1 420px;min-width:0}
.muted{color:#666;font-size:.9em}.findings li{margin:.3em 0}.findings b{color:#8e2a1f}
.harmful{color:#c0392b}.harmless{color:#2e86c1}.gen td{white-space:pre-wrap;word-break:break-word}
img.fig{max-width:100%;border:1px solid #ddd;background:#fff}
h4{margin:1.1em 0 .3em;font-size:.98em}details{margin:.4em 0 1em}summary{cursor:pointer;color:#2c3e50}
.warn{background:#fff4e5;border:1px solid #e67e22;border-left:5px solid #e67e22;padding:6px 10px;border-radius:4px}
.banner{margin:10px 0 14px;padding:10px 14px;border-radius:6px;font-size:1.02em}
.banner.warning{background:#fdecea;border:2px solid #c0392b;border-left:8px solid #c0392b;color:#6e1b12}
.banner.note{background:#fff4e5;border:1px solid #e67e22;border-left:6px solid #e67e22}
"""


def esc(x: Any) -> str:
    """HTML-escape any value for element text or a quoted attribute."""
    return html.escape(str(x), quote=True)


def ptext(x: Any) -> str:
    """Text for inside plotly (ticks, hover, titles): entities for ``& < > $``, newlines made visible."""
    s = str(x).replace("\r", "\\r").replace("\n", "\\n")
    return html.escape(s, quote=False).replace("$", "&#36;")  # a $...$ label would switch plotly to MathJax


def ptick(x: Any, limit: int = 32) -> str:
    """:func:`ptext` for an axis tick: long labels are cut (hover shows them in full)."""
    t = str(x)
    return ptext(t if len(t) <= limit else t[: limit - 1] + "…")


def left_margin(first_tick: Any, angled: bool = True) -> int:
    """Left margin (px) that keeps the first angled x tick label inside the figure (plotly hides it otherwise)."""
    n = min(32, len(str(first_tick)))
    return int(max(70, 6 * n + 10)) if angled else 70


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


class Plots:
    """Collects plotly figure specs; :meth:`add` returns the placeholder ``<div>`` for the page."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.specs: dict[str, dict[str, Any]] = {}

    def add(self, data: list[dict[str, Any]], layout: dict[str, Any], height: int = 420) -> str:
        """Register a figure and return its container (empty string when plotly is unavailable)."""
        if not self.enabled:
            return ""
        pid = f"plot{len(self.specs)}"
        base = {"height": height, "margin": {"l": 70, "r": 30, "t": 50, "b": 90}, "paper_bgcolor": "#fff",
                "plot_bgcolor": "#fff", "font": {"size": 12}, "hoverlabel": {"align": "left"}}
        layout = {**base, **layout}
        for axis in ("xaxis", "yaxis"):
            layout[axis] = {"automargin": True, **layout.get(axis, {})}
        self.specs[pid] = {"data": data, "layout": layout}
        return f'<div class="plot" id="{pid}" style="height:{height}px"></div>'


def _same_shape(x: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    a = as_array(x) if x is not None else None
    return a if a is not None and a.shape == shape else None


def heatmap(plots: Plots, values: Any, rows: Sequence[Any], cols: Sequence[Any], title: str, *,
            colorbar: str, xlabel: str, std: Any = None, ylabel: str = "layer", zlim: float | None = None,
            value_name: str = "value", se: Any = None, ci95: Any = None, n: Any = None) -> str:
    """Interactive diverging heatmap (centred at 0) with per-cell hover text.

    Hover: the value ± ``se`` (standard error over pairs) with ``n`` and the ``ci95`` interval
    (``{"low": grid, "high": grid}``) where given; else ± ``std`` (older run folders)."""
    a = as_array(values)
    if a.ndim != 2 or a.size == 0:
        return f'<p class="muted">{esc(title)}: no values.</p>'
    nr, nc = a.shape
    rows = list(rows) + list(range(len(rows), nr))
    cols = list(cols) + list(range(len(cols), nc))
    err = _same_shape(se, a.shape)
    err_name = "SE"
    if err is None:
        err, err_name = _same_shape(std, a.shape), "std"
    lo = hi = None
    if isinstance(ci95, dict):
        lo, hi = _same_shape(ci95.get("low"), a.shape), _same_shape(ci95.get("high"), a.shape)
    n_txt = f", n = {ptext(n)} pairs" if n is not None else ""

    def cell(i: int, j: int) -> str:
        t = (f"{ylabel} {ptext(rows[i])}<br>{ptext(cols[j])}<br>{value_name} "
             f"{'nan' if not np.isfinite(a[i, j]) else f'{a[i, j]:.4f}'}")
        if err is not None and np.isfinite(err[i, j]):
            t += f" ± {err[i, j]:.4f} ({err_name}{n_txt if err_name == 'SE' else ''})"
        elif n is not None:
            t += f" (n = {ptext(n)} pairs)"
        if lo is not None and hi is not None and np.isfinite(lo[i, j]) and np.isfinite(hi[i, j]):
            t += f"<br>95% CI [{lo[i, j]:.4f}, {hi[i, j]:.4f}]"
        return t

    text = [[cell(i, j) for j in range(nc)] for i in range(nr)]
    fin = np.abs(a[np.isfinite(a)])
    v = zlim if zlim is not None else float(max(fin.max() if fin.size else 1.0, 1e-9))
    trace = {"type": "heatmap", "z": a, "x": list(range(nc)), "y": list(range(nr)), "text": text,
             "hovertemplate": "%{text}<extra></extra>", "colorscale": DIVERGING, "zmin": -v, "zmax": v,
             "zmid": 0, "colorbar": {"title": {"text": colorbar, "side": "right"}, "thickness": 14}}
    step = max(1, math.ceil(nr / 24))
    long = any(len(str(c)) > 6 for c in cols)
    layout = {"title": {"text": ptext(title), "font": {"size": 14}},
              "margin": {"l": left_margin(cols[0] if cols else "", long), "r": 30, "t": 50, "b": 90},
              # angled long labels would overlap an axis title, and they name themselves anyway
              "xaxis": {"title": {"text": "" if long else ptext(xlabel)}, "tickvals": list(range(nc)),
                        "ticktext": [ptick(c) for c in cols], "tickangle": -35 if long else 0},
              "yaxis": {"title": {"text": ptext(ylabel)}, "tickvals": list(range(0, nr, step)),
                        "ticktext": [ptick(rows[i]) for i in range(0, nr, step)]}}
    height = int(min(900, max(360, 18 * nr + 190)))
    return plots.add([trace], layout, height)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "",
          raw: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped except the column indices in ``raw`` (already HTML)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for j, c in enumerate(r):
            if j in raw:
                cells.append(f"<td>{c}</td>")
            elif isinstance(c, (int, float)) and not isinstance(c, bool):
                cells.append(f'<td class="num">{esc(fmt(c))}</td>')
            else:
                cells.append(f"<td>{esc('–' if c is None else c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def numbers_bold(sentence: Any) -> str:
    """Escape a finding and set its numbers in bold."""
    parts = re.split(r"((?<![\w.])-?\d+(?:\.\d+)?%?(?!\w))", str(sentence))
    return "".join(f"<b>{esc(p)}</b>" if i % 2 else esc(p) for i, p in enumerate(parts))


def generic(obj: Any, depth: int = 0) -> str:
    """Render an arbitrary JSON value as nested tables (escaped)."""
    if isinstance(obj, dict):
        if not obj:
            return '<span class="muted">{}</span>'
        rows = [(k, generic(v, depth + 1)) for k, v in obj.items()]
        return table(["key", "value"], rows, raw=(1,))
    if isinstance(obj, list):
        if obj and all(isinstance(x, dict) for x in obj) and depth < 4:
            keys = list(dict.fromkeys(k for x in obj for k in x))
            rows = [[generic(x.get(k), depth + 1) for k in keys] for x in obj[:200]]
            more = f'<p class="muted">… {len(obj) - 200} more rows</p>' if len(obj) > 200 else ""
            return table(keys, rows, raw=tuple(range(len(keys)))) + more
        if all(not isinstance(x, (dict, list)) for x in obj):
            shown = ", ".join(fmt(x) if isinstance(x, (int, float)) else repr(x) for x in obj[:50])
            return esc(f"[{shown}{', …' if len(obj) > 50 else ''}]") + (
                f' <span class="muted">({len(obj)} items)</span>' if len(obj) > 50 else "")
        return f"<pre>{esc(json.dumps(clean(obj), ensure_ascii=False)[:4000])}</pre>"
    if isinstance(obj, float):
        return esc(f"{obj:.4g}")
    return esc("–" if obj is None else obj)


def refusal_rates(obj: Any, path: str = "") -> list[tuple[str, Any, Any, Any]]:
    """Every ``*refusal_rate*`` entry under ``obj`` as ``(path, value, baseline, n)``."""
    out: list[tuple[str, Any, Any, Any]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}" if path else str(k)
            if "refusal_rate" in str(k):
                if isinstance(v, dict):
                    out.append((p, v.get("value"), v.get("baseline"), v.get("n")))
                elif not isinstance(v, list):
                    out.append((p, v, None, None))
                else:
                    out += refusal_rates(v, p)
            else:
                out += refusal_rates(v, p)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += refusal_rates(v, f"{path}[{i}]")
    return out


def page(title: str, nav: Sequence[tuple[str, str]], body: str, plots: Plots) -> str:
    """Assemble the full HTML document, embedding plotly.js once when any figure was registered."""
    js = plotly_js() if plots.specs else None
    scripts = ""
    if js is not None:
        scripts = (f"<script>{js}</script>\n"
                   f'<script type="application/json" id="figure-data">{script_json(plots.specs)}</script>\n'
                   "<script>(function(){var figs=JSON.parse(document.getElementById('figure-data').textContent);"
                   "var cfg={responsive:true,displaylogo:false,toImageButtonOptions:{format:'png',scale:2}};"
                   "Object.keys(figs).forEach(function(id){Plotly.newPlot(id,figs[id].data,figs[id].layout,cfg);});"
                   "})();</script>")
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body><nav>{links}</nav><main>\n"
            f"{body}\n</main>\n{scripts}</body></html>\n")


def png_data_uri(path: Path) -> str:
    """A PNG file as a ``data:`` URI (keeps pages self-contained)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


# --------------------------------------------------------------------------------------------- sections

def _cards(items: Sequence[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>' for k, v in items
    ) + "</div>"


def _metric(results: dict[str, Any]) -> str:
    t = results.get("tokens") or {}
    r = (t.get("refusal") or {}).get("str", "refusal")
    c = (t.get("compliance") or {}).get("str", "compliance")
    return f"logit[{str(r).strip()}] − logit[{str(c).strip()}]"


def section_overview(r: dict[str, Any]) -> str:
    """Header, headline cards and findings."""
    m = r.get("model") or {}
    h = headline(r)
    cards = [("harmful − harmless gap", fmt(h["gap"])), ("harmful mean", fmt(h["harmful_mean"])),
             ("harmless mean", fmt(h["harmless_mean"]))]
    if h["max_resid_last"] is not None:
        cards.append((f"max {h['resid_grid']} patching at last position (layer {h['max_resid_last_layer']})",
                      fmt(h["max_resid_last"])))
    if h["n_refusal_heads"] is not None:
        cards.append(("refusal heads above threshold", str(h["n_refusal_heads"])))
    if h["sufficiency"] is not None:
        ci = fmt_ci(h.get("sufficiency_ci95"))
        cards.append(("joint sufficiency of refusal heads" + (f" (95% CI {ci})" if ci else ""),
                      fmt(h["sufficiency"])))
    spec = ", ".join(f"{k} {m[k]}" for k in ("model_type", "n_layers", "n_heads", "d_model", "d_head", "dtype",
                                              "device") if k in m)
    out = [f'<h1 id="overview">Refusal circuit report: {esc(m.get("name", "?"))}</h1>', sanity_banner(r),
           f'<p class="muted">{esc(spec)}; seed {esc(r.get("seed", "–"))}; schema version '
           f'{esc(r.get("schema_version", "?"))}. Metric: {esc(_metric(r))}; patching values are normalised so '
           f'that {esc(METRIC_TITLE)}.</p>', _cards(cards)]
    findings = r.get("findings") or []
    if findings:
        out.append('<h2 id="findings">Findings</h2><ul class="findings">'
                   + "".join(f"<li>{numbers_bold(f)}</li>" for f in findings) + "</ul>")
    return "\n".join(out)


def sanity_banner(r: dict[str, Any]) -> str:
    """The sanity gate's verdict at the top of the page: a warning banner when the metric does not separate
    harmful from harmless prompts, a note when the refusal token is far less likely than the model's own onset."""
    san = sanity_of(r)
    if san.get("separates") is False:
        return ('<div class="banner warning" id="sanity-banner" role="alert"><b>Sanity check failed.</b> '
                f'{numbers_bold(san.get("sentence", ""))} <a href="#sanity">Details</a>.</div>')
    if san.get("token_note"):
        return (f'<div class="banner note" id="sanity-note">{numbers_bold(san["token_note"])} '
                '<a href="#sanity">Details</a>.</div>')
    return ""


def sanity_table(r: dict[str, Any]) -> str:
    """The sanity gate's numbers (baseline section)."""
    san = sanity_of(r)
    if not san:
        return ""
    gap = san.get("gap") if isinstance(san.get("gap"), dict) else {}
    on = san.get("refusal_onset_fraction") if isinstance(san.get("refusal_onset_fraction"), dict) else {}
    ref = san.get("refusal_token") if isinstance(san.get("refusal_token"), dict) else {}
    top = san.get("top_refusal_onset") if isinstance(san.get("top_refusal_onset"), dict) else {}
    rows = [["paired gap harmful − harmless (" + str(san.get("metric", _metric(r))) + ")", gap.get("mean"),
             gap.get("se"), fmt_ci(gap.get("ci95"), 3), f"{gap.get('n_pairs', '?')} pairs"],
            ["harmful prompts whose top next token is a refusal onset"
             + (f" ({', '.join(repr(t) for t in on.get('onset_tokens') or [])})" if on.get("onset_tokens") else ""),
             on.get("value"), None, fmt_ci(on.get("ci95"), 3) and f"{fmt_ci(on.get('ci95'), 3)} (Wilson)",
             f"{on.get('k', '?')} of {on.get('n', '?')}"],
            [f"mean probability of the refusal token {ref.get('token')!r} on harmful prompts", ref.get("mean_prob"),
             None, None, None],
            [f"mean probability of the most likely refusal onset {top.get('token')!r}", top.get("mean_prob"),
             None, None, None]]
    verdict = san.get("separates")
    head = ('<h3 id="sanity">Sanity check</h3><p>'
            + ("<b>Separates</b>" if verdict else '<b class="harmful">Does not separate</b>' if verdict is False
               else "–")
            + f' <span class="muted">(rule: {esc(san.get("rule", "–"))})</span></p>')
    return head + table(["", "value", "SE", "95% CI", "n"], rows)


def section_prompts(r: dict[str, Any]) -> str:
    """Template, example chat-formatted prompt, metric tokens, positions."""
    p = r.get("prompts") or {}
    out = ['<h2 id="prompts">Prompts and tokens</h2>']
    if p:
        out.append(table(["template", "mode", "pairing"],
                         [[p.get("template", "–"), p.get("mode", "–"), p.get("pairing", "–")]]))
        if p.get("example") is not None:
            out.append("<h3>Example (harmful prompt 0, chat-formatted)</h3>"
                       f"<pre>{esc(p['example'])}</pre>")
    t = r.get("tokens") or {}
    if t:
        out.append("<h3>Metric tokens</h3>" + table(
            ["role", "token", "id"], [[k, repr((v or {}).get("str")), (v or {}).get("id")] for k, v in t.items()]))
    pos = r.get("positions") or []
    if pos:
        out.append("<h3>Positions used by the grids</h3>" + table(
            ["index", "label", "token"], [[q.get("index"), q.get("label"), repr(q.get("token"))] for q in pos]))
    return "\n".join(out)


def section_baseline(r: dict[str, Any], plots: Plots) -> str:
    """Per-object baseline metric, means, gap, log-odds, top next tokens."""
    b = r.get("baseline") or {}
    if not b:
        return ""
    out = ['<h2 id="baseline">Baseline</h2>', sanity_table(r)]
    hm, sm = finite(b.get("harmful_mean")), finite(b.get("harmless_mean"))
    lo = b.get("log_odds") or {}
    out.append(table(["", "harmful mean", "harmless mean", "gap"],
                     [[f"{_metric(r)} ({b.get('metric', '?')})", hm, sm,
                       hm - sm if hm is not None and sm is not None else None]]
                     + ([["log-odds", lo.get("harmful_mean"), lo.get("harmless_mean"),
                          (finite(lo.get("harmful_mean")) or 0) - (finite(lo.get("harmless_mean")) or 0)]]
                        if lo else [])))
    h, s = b.get("harmful") or {}, b.get("harmless") or {}
    if h or s:
        names = list(h) + list(s)
        data = []
        for side, d, color, off in (("harmful", h, HARMFUL, 0), ("harmless", s, HARMLESS, len(h))):
            data.append({"type": "bar", "name": side, "x": list(range(off, off + len(d))),
                         "y": [finite(v) for v in d.values()], "marker": {"color": color},
                         "customdata": [ptext(k) for k in d], "textposition": "none",
                         "hovertemplate": "%{customdata}: %{y:.3f}<extra>" + side
                         + "</extra>"})
        shapes = [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": m, "y1": m,
                   "line": {"dash": "dash", "color": c, "width": 1.5}}
                  for m, c in ((hm, HARMFUL), (sm, HARMLESS)) if m is not None]
        out.append(plots.add(data, {
            "title": {"text": ptext(f"Baseline {_metric(r)} per object (dashed: side means)")},
            "xaxis": {"tickvals": list(range(len(names))), "ticktext": [ptick(n) for n in names],
                      "tickangle": -45}, "yaxis": {"title": {"text": ptext(_metric(r))}}, "shapes": shapes,
            "bargap": 0.15, "margin": {"l": left_margin(names[0]), "r": 30, "t": 50, "b": 90}}, 420))
    top = b.get("top_next_tokens") or {}
    if top:
        cols = []
        for side in ("harmful", "harmless"):
            rows = [[repr(x[0]) if isinstance(x, (list, tuple)) and x else repr(x),
                     x[1] if isinstance(x, (list, tuple)) and len(x) > 1 else None] for x in top.get(side) or []]
            cols.append(f'<div><h3 class="{side}">Top next tokens, {side} mean</h3>'
                        + table(["token", "prob"], rows) + "</div>")
        out.append('<div class="row">' + "".join(cols) + "</div>")
    return "\n".join(out)


def section_dla(r: dict[str, Any], plots: Plots) -> str:
    """Accumulated residual logit attribution, components, per-head DLA."""
    d = r.get("dla") or {}
    if not d:
        return ""
    out = ['<h2 id="dla">Logit attribution</h2>']
    if d.get("scale"):
        out.append(f'<p class="muted">Final-norm scale: {esc(d["scale"])}</p>')

    def lines(labels: Sequence[Any], h: Any, s: Any, title: str, mode: str = "lines+markers") -> str:
        x = [ptext(x) for x in labels]
        ha, sa = as_array(h), as_array(s)
        data = [{"type": "scatter", "mode": mode, "name": "harmful mean", "x": x, "y": ha,
                 "line": {"color": HARMFUL}},
                {"type": "scatter", "mode": mode, "name": "harmless mean", "x": x, "y": sa,
                 "line": {"color": HARMLESS}}]
        if ha.shape == sa.shape and ha.size:
            data.append({"type": "scatter", "mode": "lines", "name": "harmful − harmless", "x": x, "y": ha - sa,
                         "line": {"color": "#333", "dash": "dash"}})
        return plots.add(data, {"title": {"text": ptext(title)}, "hovermode": "x unified",
                                "xaxis": {"type": "category", "tickangle": -45, "nticks": 30},
                                "yaxis": {"title": {"text": ptext(_metric(r))}, "zeroline": True}}, 440)

    if d.get("labels"):
        out.append(lines(d["labels"], d.get("harmful_mean"), d.get("harmless_mean"),
                         "Accumulated residual stream, projected on the metric direction (last position)"))
    c = d.get("components") or {}
    if c.get("labels"):
        out.append(lines(c["labels"], c.get("harmful_mean"), c.get("harmless_mean"),
                         "Direct logit attribution per component"))
    hd = d.get("heads") or {}
    ha, sa = as_array(hd.get("harmful_mean")), as_array(hd.get("harmless_mean"))
    if ha.ndim == 2 and ha.size and ha.shape == sa.shape:
        out.append(heatmap(plots, ha - sa, hd.get("rows") or [], hd.get("cols") or [],
                           "Per-head direct logit attribution, harmful − harmless",
                           colorbar="DLA difference", xlabel="head"))
    return "\n".join(out)


def section_patching(r: dict[str, Any], plots: Plots) -> str:
    """Every patching grid (exact, attribution, necessity) as a heatmap with hover, plus agreement."""
    pt = r.get("patching") or {}
    grids = list(iter_grids(r))
    if not grids:
        return ""
    out = ['<h2 id="patching">Activation patching</h2>',
           f'<p class="muted">Each cell is the mean normalised metric after patching that site ({esc(METRIC_TITLE)}). '
           "Hover a cell for its value ± its standard error over prompt pairs, the number of pairs and a 95% "
           "bootstrap interval over pairs (where recorded; the baselines are held fixed).</p>"]
    rows_summary = []
    heads_pos = (r.get("heads") or {}).get("position")
    for kind, name, slug, g in grids:
        a = as_array(g.get("values"))
        rows, cols = g.get("rows") or [], g.get("cols") or []
        title = grid_title(kind, name, g) + (f" at {heads_pos}" if name == "heads" and heads_pos else "")
        if a.ndim == 2 and a.size and np.isfinite(a).any():
            i, j = np.unravel_index(int(np.nanargmax(a)), a.shape)
            rows_summary.append([kind, name, g.get("direction", "?"), g.get("method", "?"),
                                 f"{a.shape[0]}×{a.shape[1]}", float(a[i, j]),
                                 f"layer {rows[i] if i < len(rows) else i}, {cols[j] if j < len(cols) else j}"])
        out.append(f'<h3 id="{esc(slug)}">{esc(title)}</h3>')
        out.append(heatmap(plots, g.get("values"), rows, cols, title, std=g.get("std"), se=g.get("se"),
                           ci95=g.get("ci95"), n=g.get("n_pairs"),
                           colorbar=f"normalised metric<br>{ptext(g.get('direction', '?'))}<br>0 = harmless baseline,"
                                    "<br>1 = harmful baseline",
                           xlabel="head" if "head" in name else "position"))
    out.insert(2, table(["kind", "grid", "direction", "method", "shape", "max", "at"], rows_summary))
    if any(g.get("interpretable") is False for *_, g in grids):
        out.insert(2, '<p class="warn" id="patching-not-interpretable"><b>Not interpretable:</b> the metric does '
                      'not separate harmful from harmless prompts on this model (see the '
                      '<a href="#sanity-banner">sanity check</a>), so these normalised values do not measure '
                      "how much of a refusal signal a site carries.</p>")
    agr = pt.get("agreement") or {}
    scatters = [scatter(plots, n, pt[n], g) for n, g in (pt.get("attribution") or {}).items()
                if isinstance(g, dict) and isinstance(pt.get(n), dict)]
    scatters = [x for x in scatters if x]
    if agr or scatters:
        out.append('<h3 id="agreement">Attribution vs exact patching</h3>')
    if agr:
        out.append(table(["grid", "Spearman", "top k", "top-k overlap"],
                         [[k, finite((v or {}).get("spearman")), (v or {}).get("top_k"),
                           finite((v or {}).get("top_k_overlap"))] for k, v in agr.items()]))
    if scatters:
        out.append('<div class="row">' + "".join(f"<div>{x}</div>" for x in scatters) + "</div>")
    return "\n".join(out)


def scatter(plots: Plots, name: str, exact: dict[str, Any], attr: dict[str, Any]) -> str:
    """Attribution against exact patching, one point per cell (hover: layer and column), with y = x."""
    a, b = as_array(exact.get("values")), as_array(attr.get("values"))
    if a.ndim != 2 or a.shape != b.shape or a.size == 0:
        return ""
    rows = list(exact.get("rows") or []) + list(range(len(exact.get("rows") or []), a.shape[0]))
    cols = list(exact.get("cols") or []) + list(range(len(exact.get("cols") or []), a.shape[1]))
    text = [f"layer {ptext(rows[i])}<br>{ptext(cols[j])}" for i in range(a.shape[0]) for j in range(a.shape[1])]
    fin = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
    lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
    data = [{"type": "scatter", "mode": "markers", "x": a.ravel(), "y": b.ravel(), "text": text,
             "marker": {"size": 5, "color": "#34495e", "opacity": 0.7},
             "hovertemplate": "%{text}<br>exact %{x:.4f}<br>attribution %{y:.4f}<extra></extra>"},
            {"type": "scatter", "mode": "lines", "x": [lo, hi], "y": [lo, hi], "hoverinfo": "skip",
             "line": {"color": "#999", "dash": "dash"}}]
    # narrow figure: title below the mode bar
    return plots.add(data, {"title": {"text": ptext(f"{name}: attribution vs exact"), "y": 1 - 40 / 380,
                                      "yanchor": "top", "font": {"size": 14}}, "showlegend": False,
                            "xaxis": {"title": {"text": "exact"}}, "yaxis": {"title": {"text": "attribution"}},
                            "margin": {"l": 60, "r": 20, "t": 70, "b": 50}}, 380)


def section_heads(r: dict[str, Any], plots: Plots) -> str:
    """Refusal heads: threshold, ranked bar chart, selected table, joint sufficiency, generations."""
    h = r.get("heads") or {}
    if not h:
        return ""
    thr = finite(h.get("threshold"))
    out = ['<h2 id="heads">Refusal heads</h2>',
           f"<p>Heads patched one at a time at position <code>{esc(h.get('position', '?'))}</code>; heads above "
           f"<b>{esc(fmt(thr))}</b> are kept as refusal heads. Patching all of them together recovers "
           f"<b>{esc(fmt(h.get('sufficiency')))}</b>{_suff_interval(h)} of the gap (joint sufficiency; "
           f"{esc(METRIC_TITLE)}).</p>"]
    ranked = h.get("ranked") or []
    if ranked:
        vals = [finite(x.get("value")) for x in ranked]
        names = [f"L{x.get('layer')}H{x.get('head')}" for x in ranked]
        shapes = ([{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": thr, "y1": thr,
                    "line": {"dash": "dash", "color": "#000"}}] if thr is not None else [])
        out.append(plots.add([{"type": "bar", "x": names, "y": vals, "hovertemplate": "%{x}: %{y:.4f}<extra></extra>",
                               "marker": {"color": [HARMFUL if thr is not None and (v or 0) > thr else "#95a5a6"
                                                    for v in vals]}}],
                             {"title": {"text": "Ranked heads (dashed: threshold)"},
                              "xaxis": {"type": "category", "tickangle": -45},
                              "yaxis": {"title": {"text": "normalised metric"}}, "shapes": shapes}, 380))
    sel = h.get("selected")
    if sel is not None:
        out.append(f"<h3>Selected heads ({len(sel)})</h3>"
                   + table(["layer", "head", "value"], [[x.get("layer"), x.get("head"), x.get("value")] for x in sel]))
    if ranked:
        out.append("<details><summary>Top ranked heads</summary>" + table(
            ["rank", "layer", "head", "value"],
            [[i + 1, x.get("layer"), x.get("head"), x.get("value")] for i, x in enumerate(ranked)]) + "</details>")
    gens = h.get("generations") or []
    if gens:
        out.append("<h3>Generations with the refusal heads patched in</h3>" + table(
            ["object", "baseline", "patched"], [[g.get("object"), g.get("baseline"), g.get("patched")] for g in gens],
            cls="gen"))
    return "\n".join(out)


def _suff_interval(h: dict[str, Any]) -> str:
    """`` ± 0.031 SE (95% CI [0.41, 0.53], n = 7 pairs)`` for the heads' joint sufficiency, when recorded."""
    if finite(h.get("sufficiency")) is None:
        return ""
    se, ci = finite(h.get("sufficiency_se")), fmt_ci(h.get("sufficiency_ci95"), 3)
    n = h.get("n_pairs")
    parts = [f"95% CI {ci}"] if ci else []
    if n is not None:
        parts.append(f"n = {n} pairs")
    out = f" ± {fmt(se)} SE" if se is not None else ""
    if parts:
        out += f" ({', '.join(parts)})"
    return esc(out)


def section_objects(r: dict[str, Any]) -> str:
    """Objects used on each side with their baseline scores, and dropped objects with reasons."""
    o = r.get("objects") or {}
    if not o:
        return ""
    b = r.get("baseline") or {}
    out = ['<h2 id="objects">Objects</h2><div class="row">']
    for side in ("harmful", "harmless"):
        scores = b.get(side) or {}
        objs = o.get(side) or []
        out.append(f'<div><h3 class="{side}">{side} ({len(objs)})</h3>'
                   + table(["object", "baseline"], [[x, finite(scores.get(x))] for x in objs]) + "</div>")
    out.append("</div>")
    dropped = o.get("dropped") or []
    out.append(f"<h3>Dropped ({len(dropped)})</h3>" + (table(
        ["object", "side", "reason"], [[d.get("object"), d.get("side"), d.get("reason")] for d in dropped])
        if dropped else '<p class="muted">None.</p>'))
    return "\n".join(out)


def section_run(r: dict[str, Any], tables_: Sequence[str]) -> str:
    """Config, versions, timings and the CSV tables next to results.json."""
    out = ['<h2 id="run">Run</h2><div class="row">']
    v = r.get("versions") or {}
    out.append("<div><h3>Versions</h3>" + table(["package", "version"], list(v.items())) + "</div>")
    t = r.get("timings") or {}
    if t:
        total = sum(finite(x) or 0.0 for x in t.values())
        out.append("<div><h3>Timings (s)</h3>" + table(["step", "seconds"], list(t.items()) + [["total", total]])
                   + "</div>")
    out.append("</div>")
    m = r.get("model") or {}
    if m:
        out.append("<h3>Model</h3>" + table(["field", "value"], list(m.items())))
    out.append("<h3>Config</h3><pre>" + esc(json.dumps(clean(r.get("config") or {}), indent=2,
                                                     ensure_ascii=False)) + "</pre>")
    if tables_:
        out.append("<h3>Tables</h3><ul>" + "".join(
            f'<li><a href="tables/{esc(n)}">{esc(n)}</a></li>' for n in tables_) + "</ul>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- steering

STEERING_KEYS = ("direction", "steering", "evaluation")
DIRECTION_KNOWN = {"layer", "position", "position_token", "site", "norm", "bypass", "induce", "kl", "baseline",
                   "filters", "fallback", "n_train", "n_val", "positions", "eoi_tokens", "table", "note"}
EVAL_META = ("split", "judge", "max_new_tokens", "layer", "alpha")


def _is_rate(v: Any) -> bool:
    return isinstance(v, dict) and "value" in v


def _rows_of(obj: Any) -> list[dict[str, Any]]:
    """``obj`` as a list of dict rows (anything else dropped)."""
    return [x for x in obj if isinstance(x, dict)] if isinstance(obj, list) else []


def _leftover(d: dict[str, Any], known: Iterable[str], title: str) -> str:
    """Keys of ``d`` that no dedicated view showed, rendered generically."""
    rest = {k: v for k, v in d.items() if k not in set(known)}
    return f"<h4>{esc(title)}</h4>" + generic(rest) if rest else ""


def _guarded(plots: Plots, fn: Any, obj: Any, *args: Any) -> str:
    """``fn(obj, ...)``, or the generic view of ``obj`` when ``fn`` fails on an unexpected shape.

    Figures registered by a failed call are dropped again, so no spec points at a missing ``<div>``.
    """
    before = set(plots.specs)
    try:
        return fn(obj, *args)
    except Exception as e:  # noqa: BLE001 -- an odd results.json must never break the report
        for k in set(plots.specs) - before:
            del plots.specs[k]
        return (f'<p class="muted">Could not draw this part ({esc(type(e).__name__)}: {esc(e)}); '
                "raw values:</p>" + generic(obj))


def _eoi_label(pos: Any, eoi: Sequence[Any]) -> str:
    """``-4 '\\n'``: an end-of-instruction column with its token when known."""
    try:
        p = int(pos)
        if eoi and -len(eoi) <= p < 0:
            return f"{p} {eoi[p]!r}"
        if eoi and 0 <= p < len(eoi):
            return f"{p} {eoi[p]!r}"
    except (TypeError, ValueError):
        pass
    return str(pos)


def _vs(a: Any, b: Any) -> str:
    return f"{fmt(b)} → {fmt(a)}"


def steering_direction(d: dict[str, Any], plots: Plots) -> str:
    """The selected direction in words, the fallback warning and the candidates' bypass heatmap."""
    out = ['<h3 id="steering-direction">Selected refusal direction</h3>']
    eoi = d.get("eoi_tokens") if isinstance(d.get("eoi_tokens"), list) else []
    base = d.get("baseline") if isinstance(d.get("baseline"), dict) else {}
    pos = d.get("position")
    tok = d.get("position_token")
    col = f"eoi column <b>{esc(pos)}</b>" + (f" (token <code>{esc(repr(tok))}</code>)" if tok is not None else "")
    site = f" at <code>{esc(d['site'])}</code>" if d.get("site") else ""
    text = [f"Layer <b>{esc(d.get('layer', '?'))}</b>, {col}{site}"
            + (f", norm {esc(fmt(d['norm']))}" if d.get("norm") is not None else "") + "."]
    if d.get("bypass") is not None or d.get("induce") is not None:
        text.append(
            "On the val instructions, ablating it moves the harmful refusal log-odds "
            f"<b>{esc(_vs(d.get('bypass'), base.get('harmful_val_log_odds')))}</b> (bypass, lower is better); adding it "
            f"moves the harmless ones <b>{esc(_vs(d.get('induce'), base.get('harmless_val_log_odds')))}</b> (induce); "
            f"KL on harmless prompts <b>{esc(fmt(d.get('kl')))}</b>.")
    nt, nv = d.get("n_train"), d.get("n_val")
    if isinstance(nt, dict) or isinstance(nv, dict):
        parts = [f"{name}: {', '.join(f'{esc(v)} {esc(k)}' for k, v in n.items())}"
                 for name, n in (("train", nt), ("val", nv)) if isinstance(n, dict)]
        text.append("Instructions " + "; ".join(parts) + ".")
    f = d.get("filters")
    if isinstance(f, dict) and f:
        text.append("Filters: " + ", ".join(f"{esc(k)} {esc(fmt(v))}" for k, v in f.items()) + ".")
    out.append("<p>" + " ".join(text) + "</p>")
    if d.get("fallback"):
        out.append(f'<p class="warn"><b>Fallback:</b> {esc(d["fallback"])}</p>')
    if d.get("note"):
        out.append(f'<p class="muted">{esc(d["note"])}</p>')
    rows = _rows_of(d.get("table"))
    if rows:
        out.append(direction_heatmap(plots, d, rows, eoi))
        kept = sum(1 for x in rows if x.get("kept"))
        ranked = sorted(rows, key=lambda x: (not x.get("kept"), finite(x.get("bypass")) is None,
                                             finite(x.get("bypass")) or 0.0))
        out.append(f"<details><summary>All {len(rows)} candidates ({kept} kept), best bypass first</summary>"
                   + table(["layer", "eoi column", "norm", "bypass", "induce", "KL", "kept", "reason"],
                           [[x.get("layer"), _eoi_label(x.get("position"), eoi), x.get("norm"), x.get("bypass"),
                             x.get("induce"), x.get("kl"), "yes" if x.get("kept") else "no", x.get("reason")]
                            for x in ranked]) + "</details>")
    out.append(_leftover(d, DIRECTION_KNOWN, "Other direction fields"))
    return "\n".join(out)


def direction_heatmap(plots: Plots, d: dict[str, Any], rows: list[dict[str, Any]], eoi: Sequence[Any]) -> str:
    """Bypass score per (layer, eoi column); hover: induce, KL, kept/reason; chosen cell boxed, filtered ones x."""
    grid = candidate_grid(d, rows)
    if grid is None:
        return ""
    layers, cols, z, cells = grid
    li, ci = {v: i for i, v in enumerate(layers)}, {v: j for j, v in enumerate(cols)}
    text = [["" for _ in cols] for _ in layers]
    fx, fy, ftext = [], [], []
    for i, j, x in cells:
        text[i][j] = (f"layer {ptext(x.get('layer'))}, column {ptext(_eoi_label(x.get('position'), eoi))}<br>"
                      f"bypass {ptext(fmt(x.get('bypass')))}<br>induce {ptext(fmt(x.get('induce')))}<br>"
                      f"KL {ptext(fmt(x.get('kl')))}<br>norm {ptext(fmt(x.get('norm')))}<br>"
                      f"{'kept' if x.get('kept') else 'filtered: ' + ptext(x.get('reason', '?'))}")
        if not x.get("kept"):
            fx.append(j)
            fy.append(i)
            ftext.append(text[i][j])
    labels = [_eoi_label(c, eoi) for c in cols]
    data: list[dict[str, Any]] = [
        {"type": "heatmap", "z": z, "x": list(range(len(cols))), "y": list(range(len(layers))), "text": text,
         "hovertemplate": "%{text}<extra></extra>", "colorscale": "Viridis", "reversescale": True,
         "colorbar": {"title": {"text": "bypass<br>(harmful val<br>refusal log-odds,<br>ablated)", "side": "right"},
                      "thickness": 14}},
        {"type": "scatter", "mode": "markers", "x": fx, "y": fy, "text": ftext, "name": "filtered out",
         "hovertemplate": "%{text}<extra></extra>", "marker": {"symbol": "x-thin", "size": 7,
                                                               "line": {"width": 1, "color": "#555"}}}]
    ch = (li.get(d.get("layer")), ci.get(d.get("position")))
    if None not in ch:
        data.append({"type": "scatter", "mode": "markers", "x": [ch[1]], "y": [ch[0]], "name": "selected",
                     "text": [text[ch[0]][ch[1]]], "hovertemplate": "selected<br>%{text}<extra></extra>",
                     "marker": {"symbol": "square-open", "size": 16, "color": "#e74c3c", "line": {"width": 3}}})
    step = max(1, math.ceil(len(layers) / 24))
    height = int(min(900, max(400, 16 * len(layers) + 240)))
    layout = {"title": _title("Direction candidates: bypass score per layer and end-of-instruction column<br>"
                              "(lower = stronger; x = filtered out, red box = selected)", height),
              "margin": {"l": 70, "r": 30, "t": 90, "b": 90},
              "xaxis": {"title": {"text": "end-of-instruction column"}, "tickvals": list(range(len(cols))),
                        "ticktext": [ptick(c) for c in labels]},
              "yaxis": {"title": {"text": "layer"}, "tickvals": list(range(0, len(layers), step)),
                        "ticktext": [ptick(layers[i]) for i in range(0, len(layers), step)]},
              "legend": {"orientation": "h", "y": -0.18}}
    return plots.add(data, layout, height)


def _title(text: str, height: int) -> dict[str, Any]:
    """A title placed below plotly's mode bar (narrow figures would overlap it)."""
    return {"text": text, "font": {"size": 13}, "y": 1 - 40 / height, "yanchor": "top"}


def _alpha(x: Any) -> str:
    v = finite(x)
    return f"{v:g}" if v is not None else str(x)


def _line(name: str, x: Sequence[Any], y: Sequence[Any], color: str, dash: str = "solid",
          hover: str = "%{y:.3f}") -> dict[str, Any]:
    return {"type": "scatter", "mode": "lines+markers", "name": ptext(name), "x": list(x), "y": list(y),
            "line": {"color": color, "dash": dash}, "marker": {"size": 6},
            "hovertemplate": f"{ptext(name)}<br>alpha %{{x}}<br>{hover}<extra></extra>"}


def _hline(y: Any, color: str, dash: str = "dash") -> dict[str, Any]:
    return {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": y, "y1": y,
            "line": {"dash": dash, "color": color, "width": 1.5}}


def steering_sweep(ins: dict[str, Any], plots: Plots) -> str:
    """The val alpha sweep of the selected direction: refusal rate and refusal score against alpha."""
    rows = sorted((x for x in _rows_of(ins.get("rows")) if finite(x.get("alpha")) is not None),
                  key=lambda x: float(x["alpha"]))
    out = ['<h3 id="steering-sweep">Alpha sweep on val instructions</h3>']
    a = ins.get("chosen_alpha")
    desc = [f"Vector: {esc(ins.get('vector', '?'))} at layer {esc(ins.get('layer', '?'))}, positions "
            f"{esc(ins.get('positions', '?'))}, split {esc(ins.get('split', '?'))} "
            f"({esc(ins.get('n_harmless', '?'))} harmless, {esc(ins.get('n_harmful', '?'))} harmful instructions). "
            "Induce: +alpha on harmless prompts; suppress: −alpha on harmful prompts; ablation: the direction "
            "projected out of every residual write on harmful prompts."]
    if a is not None:
        desc.append(f"Chosen alpha <b>{esc(_alpha(a))}</b>"
                    + (f" ({esc(ins['chosen_alpha_reason'])})" if ins.get("chosen_alpha_reason") else "") + ".")
    out.append("<p>" + " ".join(desc) + "</p>")
    abl = ins.get("ablation") if isinstance(ins.get("ablation"), dict) else {}
    ca = finite(a)
    if rows:
        x = [float(r["alpha"]) for r in rows]
        vline = ([{"type": "line", "yref": "paper", "x0": ca, "x1": ca, "y0": 0, "y1": 1,
                   "line": {"dash": "dot", "color": "#333", "width": 1.5}}] if ca is not None else [])
        figs = []
        for what, key, yt, ab in (("refusal rate", "refusal_rate", "refusal rate (judge)", "refusal_rate"),
                                  ("refusal score", "refusal_score", "mean refusal log-odds", "refusal_score")):
            data = [_line(f"induce (harmless, +alpha) {what}", x, [finite(r.get(f"induce_{key}")) for r in rows],
                          HARMLESS),
                    _line(f"suppress (harmful, −alpha) {what}", x, [finite(r.get(f"suppress_{key}")) for r in rows],
                          HARMFUL)]
            if key == "refusal_rate":  # Wilson intervals as error bars, where recorded
                for trace, side in zip(data, ("induce", "suppress")):
                    err = _error_bars([(r.get(f"{side}_refusal_rate"), r.get(f"{side}_refusal_rate_ci95"))
                                       for r in rows])
                    if err:
                        trace["error_y"] = err
                        trace["customdata"] = [ptext(_rate_ci(r.get(f"{side}_refusal_rate_ci95"), None,
                                                              r.get(f"{side}_n")) or "") for r in rows]
                        trace["hovertemplate"] = trace["hovertemplate"].replace(
                            "<extra>", "<br>95% CI %{customdata}<extra>")
            shapes = list(vline)
            av = finite(abl.get(ab))
            if av is not None:
                shapes.append(_hline(av, HARMFUL))
                data.append({"type": "scatter", "mode": "lines", "x": [x[0], x[-1]], "y": [av, av],
                             "name": f"ablation (harmful) {what}", "line": {"color": HARMFUL, "dash": "dash"},
                             "hovertemplate": "ablation: %{y:.3f}<extra></extra>"})
            yaxis = {"title": {"text": yt}}
            if key == "refusal_rate":
                yaxis["range"] = [-0.03, 1.03]
            figs.append(plots.add(data, {
                "title": _title(f"Val {what} vs alpha<br>(dashed: ablation, dotted: chosen alpha)", 420),
                "margin": {"l": 70, "r": 30, "t": 90, "b": 90},
                "xaxis": {"title": {"text": "alpha"}}, "yaxis": yaxis, "shapes": shapes,
                "legend": {"orientation": "h", "y": -0.25}}, 420))
        out.append('<div class="row">' + "".join(f"<div>{f}</div>" for f in figs if f) + "</div>")
        with_ci = any(interval(r.get(f"{side}_refusal_rate_ci95")) for r in rows for side in ("induce", "suppress")) \
            or interval(abl.get("refusal_rate_ci95")) is not None
        ci_cols = ["induce 95% CI (Wilson)", "suppress 95% CI (Wilson)"] if with_ci else []
        out.append(table(["alpha", "induce refusal rate", "suppress refusal rate", "induce refusal score",
                          "suppress refusal score", "n harmless", "n harmful"] + ci_cols,
                         [[r.get("alpha"), r.get("induce_refusal_rate"), r.get("suppress_refusal_rate"),
                           r.get("induce_refusal_score"), r.get("suppress_refusal_score"),
                           r.get("induce_n", r.get("n_harmless")), r.get("suppress_n", r.get("n_harmful"))]
                          + ([_rate_ci(r.get("induce_refusal_rate_ci95")), _rate_ci(r.get("suppress_refusal_rate_ci95"))]
                             if with_ci else []) for r in rows]
                         + ([["ablation", None, abl.get("refusal_rate"), None, abl.get("refusal_score"), None,
                              abl.get("n")] + ([None, _rate_ci(abl.get("refusal_rate_ci95"))] if with_ci else [])]
                            if abl else [])))
    samples = _rows_of(ins.get("samples"))
    if samples:
        out.append(f"<details><summary>Sample completions on val ({len(samples)})</summary>" + table(
            ["setting", "alpha", "instruction", "completion", "refused"],
            [[s.get("setting"), s.get("alpha"), s.get("instruction"), s.get("completion"), s.get("refused")]
             for s in samples], cls="gen") + "</details>")
    out.append(_leftover(ins, {"vector", "layer", "positions", "split", "n_harmless", "n_harmful", "rows",
                               "ablation", "samples", "chosen_alpha", "chosen_alpha_reason"},
                         "Other sweep fields"))
    return "\n".join(out)


def steering_objects(objs: dict[str, Any], plots: Plots) -> str:
    """Per vector: normalised metric and refusal fraction against alpha on the replication's object prompts."""
    out = ['<h3 id="steering-objects">Object-prompt sweeps</h3>',
           '<p class="muted">The replication\'s vectors on its own object prompts: added to harmless objects '
           "(+alpha) and subtracted from harmful ones (−alpha). Normalised metric: "
           f"{esc(METRIC_TITLE)}.</p>"]
    for name, o in objs.items():
        if not isinstance(o, dict):
            out.append(f"<h4>{esc(name)}</h4>" + generic(o))
            continue
        rows = sorted((x for x in _rows_of(o.get("rows")) if finite(x.get("alpha")) is not None),
                      key=lambda x: float(x["alpha"]))
        out.append(f"<h4>{esc(name)} vector</h4><p>{esc(o.get('description', ''))}"
                   f"{'; ' if o.get('description') else ''}layer {esc(o.get('layer', '?'))}, norm "
                   f"{esc(fmt(o.get('norm')))}.</p>")
        if rows:
            x = [_alpha(r["alpha"]) for r in rows]
            figs = []
            for key, yt, shapes in (("normalised", "normalised metric", [_hline(0, HARMLESS, "dot"),
                                                                         _hline(1, HARMFUL, "dot")]),
                                    ("refusal_fraction", "refusal fraction (judge)", [])):
                data = [_line("harmless objects, +alpha", x, [finite(r.get(f"harmless_{key}")) for r in rows],
                              HARMLESS),
                        _line("harmful objects, −alpha", x, [finite(r.get(f"harmful_{key}")) for r in rows],
                              HARMFUL)]
                if all(v is None for t in data for v in t["y"]):
                    continue
                for trace, side in zip(data, ("harmless", "harmful")):  # ± SE / Wilson intervals where recorded
                    if key == "normalised":
                        err = _se_bars(trace["y"], [r.get(f"{side}_normalised_se") for r in rows])
                        extra = [f"± {fmt(r.get(f'{side}_normalised_se'))} SE, n = {r.get(f'{side}_n', '?')}"
                                 for r in rows]
                    else:
                        err = _error_bars([(r.get(f"{side}_refusal_fraction"), r.get(f"{side}_refusal_fraction_ci95"))
                                           for r in rows])
                        extra = [f"95% CI {_rate_ci(r.get(f'{side}_refusal_fraction_ci95'), None, r.get(f'{side}_n'))}"
                                 " (Wilson)" for r in rows]
                    if err:
                        trace["error_y"] = err
                        trace["customdata"] = [ptext(e) for e in extra]
                        trace["hovertemplate"] = trace["hovertemplate"].replace("<extra>", "<br>%{customdata}<extra>")
                yaxis = {"title": {"text": yt}}
                if key == "refusal_fraction":
                    yaxis["range"] = [-0.03, 1.03]
                figs.append(plots.add(data, {
                    "title": _title(ptext(f"{name} vector: {yt} vs alpha"), 380),
                    "margin": {"l": 70, "r": 30, "t": 80, "b": 90},
                    "xaxis": {"title": {"text": "alpha (|alpha|; sign by side)"}, "type": "category"},
                    "yaxis": yaxis, "shapes": shapes, "legend": {"orientation": "h", "y": -0.25}}, 380))
            out.append('<div class="row">' + "".join(f"<div>{f}</div>" for f in figs if f) + "</div>")
            unc = any(f"{side}_{k}" in r for r in rows for side in ("harmless", "harmful")
                      for k in ("refusal_fraction_ci95", "n", "metric_se", "normalised_se"))
            unc_cols = (["harmless normalised SE", "harmless refusal 95% CI (Wilson)", "harmless n",
                         "harmful normalised SE", "harmful refusal 95% CI (Wilson)", "harmful n",
                         "harmless metric SE", "harmful metric SE"] if unc else [])
            out.append(table(["alpha", "harmless normalised", "harmless refusal fraction", "harmful normalised",
                              "harmful refusal fraction", "harmless metric", "harmful metric"] + unc_cols,
                             [[r.get("alpha"), r.get("harmless_normalised"), r.get("harmless_refusal_fraction"),
                               r.get("harmful_normalised"), r.get("harmful_refusal_fraction"),
                               r.get("harmless_metric"), r.get("harmful_metric")]
                              + ([r.get("harmless_normalised_se"), _rate_ci(r.get("harmless_refusal_fraction_ci95")),
                                  r.get("harmless_n"), r.get("harmful_normalised_se"),
                                  _rate_ci(r.get("harmful_refusal_fraction_ci95")), r.get("harmful_n"),
                                  r.get("harmless_metric_se"), r.get("harmful_metric_se")] if unc else [])
                              for r in rows]))
        samples = _rows_of(o.get("samples"))
        if samples:
            out.append(f"<details><summary>Sample completions, {esc(name)} vector ({len(samples)})</summary>"
                       + table(["side", "alpha", "object", "completion", "refused"],
                               [[s.get("side"), s.get("alpha"), s.get("object"), s.get("completion"),
                                 s.get("refused")] for s in samples], cls="gen") + "</details>")
        out.append(_leftover(o, {"description", "layer", "norm", "rows", "samples"}, f"Other {name} fields"))
    return "\n".join(out)


def steering_evaluation(ev: dict[str, Any], plots: Plots) -> str:
    """Held-out refusal rates (table + grouped bars), damage (KL, CE) and sample generations."""
    out = ['<h3 id="steering-evaluation">Held-out evaluation</h3>']
    meta = [f"{k.replace('_', ' ')} {_alpha(ev[k]) if isinstance(ev[k], (int, float)) else ev[k]}"
            for k in EVAL_META if ev.get(k) is not None]
    if meta:
        out.append(f"<p>{esc('; '.join(meta))}. Layer and alpha were chosen on train/val; these prompts were "
                   "never used for a choice.</p>")
    rates = [(k, v) for k, v in ev.items() if "refusal_rate" in str(k) and _is_rate(v)]
    if rates:
        with_ci = any(interval(v.get("ci95")) or interval(v.get("baseline_ci95")) for _, v in rates)
        out.append(table(["measure", "value", "baseline", "change", "n", "refusal score", "baseline refusal score",
                          "intervention"] + (["95% CI (Wilson)", "baseline 95% CI (Wilson)"] if with_ci else []),
                         [[k, v.get("value"), v.get("baseline"),
                           (finite(v.get("value")) - finite(v.get("baseline"))
                            if finite(v.get("value")) is not None and finite(v.get("baseline")) is not None
                            else None), v.get("n"), v.get("refusal_score"), v.get("baseline_refusal_score"),
                           v.get("intervention")]
                          + ([_rate_ci(v.get("ci95"), v.get("k"), v.get("n")),
                              _rate_ci(v.get("baseline_ci95"), v.get("baseline_k"), v.get("n"))] if with_ci else [])
                          for k, v in rates]))
        names = [k.replace("_refusal_rate", "").replace("refusal_rate_", "").replace("_", " ") or k
                 for k, _ in rates]
        hover = [f"{ptext(k)}<br>n {ptext(v.get('n', '?'))}<br>{ptext(v.get('intervention', ''))}" for k, v in rates]

        def ci_text(key: str, kkey: str) -> list[str]:
            return ["<br>" + ptext(f"95% CI {_rate_ci(v.get(key), v.get(kkey), v.get('n'))} (Wilson)")
                    if interval(v.get(key)) else "" for _, v in rates]

        data = [{"type": "bar", "name": "baseline", "x": [ptext(n) for n in names], "text": hover,
                 "customdata": ci_text("baseline_ci95", "baseline_k"),
                 "y": [finite(v.get("baseline")) for _, v in rates], "marker": {"color": "#95a5a6"},
                 "hovertemplate": "%{text}<br>baseline %{y:.3f}%{customdata}<extra></extra>",
                 "textposition": "none"},
                {"type": "bar", "name": "edited", "x": [ptext(n) for n in names], "text": hover,
                 "customdata": ci_text("ci95", "k"),
                 "y": [finite(v.get("value")) for _, v in rates],
                 "marker": {"color": [HARMLESS if "harmless" in k else HARMFUL for k, _ in rates]},
                 "hovertemplate": "%{text}<br>edited %{y:.3f}%{customdata}<extra></extra>",
                 "texttemplate": "%{y:.2f}", "textposition": "outside"}]
        data[0].update(texttemplate="%{y:.2f}", textposition="outside")
        for trace, (vkey, ckey) in zip(data, (("baseline", "baseline_ci95"), ("value", "ci95"))):
            err = _error_bars([(v.get(vkey), v.get(ckey)) for _, v in rates])
            if err:
                trace["error_y"] = err
        out.append(plots.add(data, {"title": {"text": "Held-out refusal rate: baseline vs edited",
                                              "font": {"size": 13}}, "barmode": "group",
                                    "yaxis": {"title": {"text": "refusal rate"}, "range": [0, 1.05]}}, 380))
    dmg = ev.get("damage")
    if isinstance(dmg, dict) and dmg:
        rows = []
        for k, v in dmg.items():
            if isinstance(v, dict):
                cb, ce = finite(v.get("ce_baseline")), finite(v.get("ce_edited"))
                rows.append([k, v.get("kl_harmless"), v.get("ce_baseline"), v.get("ce_edited"),
                             ce - cb if ce is not None and cb is not None else None, v.get("n_tokens"), v.get("n")])
            else:
                rows.append([k, v, None, None, None, None, None])
        out.append("<h4>Damage on harmless prompts</h4>" + table(
            ["edit", "KL(base ‖ edited)", "CE baseline", "CE edited", "Δ CE", "tokens", "prompts"], rows))
    samples = _rows_of(ev.get("samples"))
    if samples:
        out.append(f"<h4>Sample generations ({len(samples)})</h4>" + table(
            ["setting", "instruction", "completion", "refused"],
            [[s.get("setting"), s.get("instruction", s.get("prompt")), s.get("completion"), s.get("refused")]
             for s in samples], cls="gen"))
    if isinstance(ev.get("substrings"), list):
        out.append("<details><summary>Refusal substrings of the judge</summary>"
                   + generic(ev["substrings"]) + "</details>")
    known = set(EVAL_META) | {k for k, _ in rates}
    known |= {"damage"} if isinstance(dmg, dict) and dmg else set()
    known |= {"samples"} if samples else set()
    known |= {"substrings"} if isinstance(ev.get("substrings"), list) else set()
    out.append(_leftover(ev, known, "Other evaluation fields"))
    return "\n".join(out)


def _rate_ci(ci: Any, k: Any = None, n: Any = None) -> str | None:
    """``[0.41, 0.63] (26/50)``: a Wilson interval with its count, None without an interval."""
    c = fmt_ci(ci)
    if c is None:
        return None
    if k is not None and n is not None:
        c += f" ({k}/{n})"
    elif n is not None:
        c += f" (n = {n})"
    return c


def _error_bars(points: Sequence[tuple[Any, Any]]) -> dict[str, Any] | None:
    """A plotly asymmetric ``error_y`` from ``(value, interval)`` points (None when no point has an interval)."""
    offsets = error_offsets(points)
    if all(o is None for o in offsets):
        return None
    return {"type": "data", "symmetric": False, "array": [None if o is None else o[1] for o in offsets],
            "arrayminus": [None if o is None else o[0] for o in offsets], "thickness": 1.2, "width": 4, "color": "#333"}


def _se_bars(values: Sequence[Any], ses: Sequence[Any]) -> dict[str, Any] | None:
    """A plotly symmetric ``error_y`` of ± SE (None when no SE is recorded)."""
    arr = [finite(e) if finite(v) is not None else None for v, e in zip(values, ses)]
    if all(a is None for a in arr):
        return None
    return {"type": "data", "array": arr, "thickness": 1.2, "width": 4}


def section_steering(r: dict[str, Any], plots: Plots) -> str:
    """Direction, steering sweeps and held-out evaluation; unknown keys and shapes render generically."""
    keys = [k for k in STEERING_KEYS if r.get(k)]
    if not keys:
        return ""
    out = ['<h2 id="steering">Steering, direction and evaluation</h2>']
    d, st, ev = (r.get(k) for k in STEERING_KEYS)
    if isinstance(d, dict) and d:
        out.append(_guarded(plots, steering_direction, d, plots))
    elif d:
        out.append("<h3>direction</h3>" + generic(d))
    if isinstance(st, dict) and st:
        ins, objs = st.get("instructions"), st.get("objects")
        if isinstance(ins, dict) and ins:
            out.append(_guarded(plots, steering_sweep, ins, plots))
        if isinstance(objs, dict) and objs:
            out.append(_guarded(plots, steering_objects, objs, plots))
        rest = {k: v for k, v in st.items() if not (k in ("instructions", "objects") and isinstance(v, dict))}
        if rest:
            rates = refusal_rates(rest)
            out.append("<h3>Other steering fields</h3>"
                       + (table(["measure", "value", "baseline", "n"], [(f"steering.{p}", v, b, n)
                                                                       for p, v, b, n in rates]) if rates else "")
                       + generic(rest))
    elif st:
        out.append("<h3>steering</h3>" + generic(st))
    if isinstance(ev, dict) and ev:
        out.append(_guarded(plots, steering_evaluation, ev, plots))
    elif ev:
        out.append("<h3>evaluation</h3>" + generic(ev))
    return "\n".join(x for x in out if x)


def render_report(results: dict[str, Any], tables_: Sequence[str] = ()) -> str:
    """The report HTML for one results dict (``tables_``: CSV file names under ``tables/`` to list)."""
    plots = Plots(enabled=plotly_js() is not None)
    parts = [section_overview(results), section_prompts(results), section_baseline(results, plots),
             section_dla(results, plots), section_patching(results, plots), section_heads(results, plots),
             section_steering(results, plots), section_objects(results), section_run(results, tables_)]
    if not plots.enabled:
        parts.insert(1, '<p class="muted">plotly is not installed: interactive figures are omitted '
                        "(install plotly, or see the PNG figures).</p>")
    nav = [("overview", "Overview"), ("findings", "Findings"), ("prompts", "Prompts"), ("baseline", "Baseline"),
           ("dla", "Logit attribution"), ("patching", "Patching"), ("heads", "Heads"), ("steering", "Steering"),
           ("objects", "Objects"), ("run", "Run")]
    body = "\n".join(p for p in parts if p)
    nav = [(a, t) for a, t in nav if f'id="{a}"' in body]
    name = (results.get("model") or {}).get("name", "run")
    return page(f"refusal-lab report — {name}", nav, body, plots)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Read ``run_dir/results.json`` and write the self-contained ``run_dir/report.html`` (or ``out``)."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    tdir = run_dir / "tables"
    tables_ = sorted(p.name for p in tdir.glob("*.csv")) if tdir.is_dir() else []
    path = Path(out) if out is not None else run_dir / "report.html"
    write_text(path, render_report(results, tables_))  # atomic: a failed write leaves the previous report whole
    return path
