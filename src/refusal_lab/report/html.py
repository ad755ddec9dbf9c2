"""The self-contained HTML report of one run folder (``report.html``: plotly.js embedded once, no
network access), assembled from the sections of :mod:`.sections`, :mod:`.steering_sections` and
:mod:`.geometry_sections`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from refusal_lab.artifacts import write_text
from refusal_lab.report.geometry_sections import section_geometry
from refusal_lab.report.interactive import Plots, plotly_js
from refusal_lab.report.page import page
from refusal_lab.report.sections import (
    section_baseline, section_dla, section_heads, section_objects, section_overview, section_patching,
    section_prompts, section_run,
)
from refusal_lab.report.steering_sections import section_steering
from refusal_lab.run.results import Results, read_results

NAV = [("overview", "Overview"), ("findings", "Findings"), ("prompts", "Prompts"), ("baseline", "Baseline"),
       ("dla", "Logit attribution"), ("patching", "Patching"), ("heads", "Heads"), ("steering", "Steering"),
       ("geometry", "Geometry"), ("objects", "Objects"), ("run", "Run")]


def render_report(results: Results | Mapping[str, Any], tables_: Sequence[str] = ()) -> str:
    """The report HTML of one run's results (checked by :func:`~refusal_lab.run.results.read_results`);
    ``tables_``: CSV file names under ``tables/`` to link."""
    r = read_results(results)
    js = plotly_js()
    plots = Plots(enabled=js is not None)
    parts = [section_overview(r), section_prompts(r), section_baseline(r, plots), section_dla(r, plots),
             section_patching(r, plots), section_heads(r, plots), section_steering(r, plots),
             section_geometry(r, plots), section_objects(r), section_run(r, tables_)]
    if js is None:
        parts.insert(1, '<p class="muted">plotly is not installed: interactive figures are omitted '
                        "(install plotly, or see the PNG figures).</p>")
    return page(f"refusal-lab report — {r['model']['name']}", NAV, "\n".join(p for p in parts if p), plots, js)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Read ``run_dir/results.json`` and write the self-contained ``run_dir/report.html`` (or ``out``)."""
    run_dir = Path(run_dir)
    results = read_results(run_dir / "results.json")
    tdir = run_dir / "tables"
    tables_ = sorted(p.name for p in tdir.glob("*.csv")) if tdir.is_dir() else []
    path = Path(out) if out is not None else run_dir / "report.html"
    write_text(path, render_report(results, tables_))  # atomic: a failed write leaves the previous report whole
    return path
