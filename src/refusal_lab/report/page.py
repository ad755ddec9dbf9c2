"""The HTML building blocks of the report and comparison pages: escaping, tables, cards, the page shell.

Every model- or user-derived string is escaped with :func:`html.escape` before it reaches the page;
figure data travels as JSON inside ``<script type="application/json">`` (see
:func:`refusal_lab.report.interactive.script_json`), so no value can close the script element.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from refusal_lab.report.common import fmt
from refusal_lab.report.interactive import Plots, script_json

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


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "", raw: Sequence[int] = ()) -> str:
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


def details(summary: str, body: str) -> str:
    """A collapsed block (``summary`` is escaped, ``body`` is HTML)."""
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def row(*parts: str) -> str:
    """Blocks side by side (empty ones dropped)."""
    return '<div class="row">' + "".join(f"<div>{p}</div>" for p in parts if p) + "</div>"


def numbers_bold(sentence: Any) -> str:
    """Escape a finding and set its numbers in bold."""
    parts = re.split(r"((?<![\w.])-?\d+(?:\.\d+)?%?(?!\w))", str(sentence))
    return "".join(f"<b>{esc(p)}</b>" if i % 2 else esc(p) for i, p in enumerate(parts))


def cards(items: Sequence[tuple[str, str]]) -> str:
    """Headline numbers as cards (label, value)."""
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>' for k, v in items
    ) + "</div>"


def png_data_uri(path: Path) -> str:
    """A PNG file as a ``data:`` URI (keeps pages self-contained)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def page(title: str, nav: Sequence[tuple[str, str]], body: str, plots: Plots, js: str | None) -> str:
    """The full HTML document; plotly.js (``js``) is embedded once when any figure was registered.
    ``nav`` lists ``(anchor, text)``; anchors the body lacks are left out."""
    scripts = ""
    if js is not None and plots.specs:
        scripts = (f"<script>{js}</script>\n"
                   f'<script type="application/json" id="figure-data">{script_json(plots.specs)}</script>\n'
                   "<script>(function(){var figs=JSON.parse(document.getElementById('figure-data').textContent);"
                   "var cfg={responsive:true,displaylogo:false,toImageButtonOptions:{format:'png',scale:2}};"
                   "Object.keys(figs).forEach(function(id){Plotly.newPlot(id,figs[id].data,figs[id].layout,cfg);});"
                   "})();</script>")
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav if f'id="{a}"' in body)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body><nav>{links}</nav><main>\n"
            f"{body}\n</main>\n{scripts}</body></html>\n")
