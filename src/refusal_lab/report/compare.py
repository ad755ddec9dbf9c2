"""Compare several run folders (e.g. a 0.5B and a 1.5B model): headline numbers, held-out refusal
rates, depth-normalised overlays (interactive) and PNGs, in one self-contained ``comparison.html``.

Layers are placed at ``layer / n_layers`` so models of different depth share one axis; the
figures are the specs of :mod:`refusal_lab.report.specs.compare`, drawn by both renderers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from refusal_lab.artifacts import write_text
from refusal_lab.report.common import fmt_ci, headline
from refusal_lab.report.figures import render, save
from refusal_lab.report.interactive import Plots, plotly_js
from refusal_lab.report.page import esc, page, png_data_uri, table
from refusal_lab.report.specs import METRIC_TITLE, Spec
from refusal_lab.report.specs import compare as specs
from refusal_lab.report.specs.steering import rate_name
from refusal_lab.run.results import EVALUATION_RATES, GRID_NAMES, Results, read_results

Run = specs.Run


def _labels(runs: list[tuple[Path, Results]]) -> list[str]:
    """Model names, with the folder where two runs share a model."""
    names = [r["model"]["name"] for _, r in runs]
    return [f"{n} ({d.name})" if names.count(n) > 1 else n for n, (d, _) in zip(names, runs)]


def _headline_rows(runs: list[Run], out_dir: Path) -> list[list[Any]]:
    rows = []
    for name, d, r in runs:
        h = headline(r)
        where = None
        if h["max_resid_last"] is not None:
            lay = h["max_resid_last_layer"]
            where = f"{h['resid_grid']}, layer {lay} (depth {lay / h['n_layers']:.2f})"
        rep = d / "report.html"
        link = esc(name)
        if rep.exists():
            link = f'<a href="{esc(Path(os.path.relpath(rep, out_dir)).as_posix())}">{esc(name)}</a>'
        rows.append([link, h["n_layers"], h["n_heads"], h["harmful_mean"], h["harmless_mean"], h["gap"],
                     "separates" if h["separates"] else "does NOT separate", h["max_resid_last"], where,
                     h["n_refusal_heads"], h["sufficiency"], fmt_ci(h["sufficiency_ci95"], 3)])
    return rows


def _evaluation_table(runs: list[Run]) -> str:
    """Held-out refusal rates (value, baseline, n, Wilson intervals) and the selected layer at its depth;
    "" unless every run has an evaluation."""
    if not all("evaluation" in r for _, _, r in runs):
        return ""
    heads = ["model", "layer", "depth (layer / n_layers)", "alpha"]
    for k in EVALUATION_RATES:
        short = rate_name(k)
        heads += [f"{short}: value", f"{short}: baseline", f"{short}: n", f"{short}: 95% CI",
                  f"{short}: baseline 95% CI"]
    rows = []
    for name, _, r in runs:
        e = r["evaluation"]
        row: list[Any] = [name, e["layer"], e["layer"] / r["model"]["n_layers"], e["alpha"]]
        for k in EVALUATION_RATES:
            v = e[k]
            row += [v["value"], v["baseline"], v["n"], fmt_ci(v["ci95"]), fmt_ci(v["baseline_ci95"])]
        rows.append(row)
    return ('<h2 id="evaluation">Held-out refusal rates</h2>'
            '<p class="muted">Steering evaluation on each run\'s held-out test instructions; the direction\'s '
            "layer is shown at its depth so models of different size compare.</p>" + table(heads, rows))


def compare_runs(run_dirs: list[Path], out_dir: Path) -> Path:
    """Write depth-normalised comparison PNGs and a self-contained ``comparison.html`` into ``out_dir``
    (each run's ``results.json`` checked by :func:`~refusal_lab.run.results.read_results`)."""
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run folder")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = [(Path(d), read_results(Path(d) / "results.json")) for d in run_dirs]
    runs: list[Run] = [(name, d, r) for name, (d, r) in zip(_labels(loaded), loaded)]

    figures: list[tuple[str, str, Spec | None]] = [
        ("compare_baseline", "Baseline means and gap per model", specs.baseline_chart(runs)),
        ("compare_dla", "Logit attribution against depth", specs.dla_panels(runs)),
        ("compare_last_position", "Patching at the last position against depth", specs.last_position_panels(runs)),
        *((f"compare_{g}", f"{g}, side by side (rows at layer / n_layers)", specs.grid_panels(runs, g))
          for g in GRID_NAMES),
        ("compare_heads_ranked", "Ranked refusal heads", specs.heads_chart(runs))]
    pngs = [(caption, save(render(spec), out_dir / f"{stem}.png")) for stem, caption, spec in figures if spec]

    js = plotly_js()
    plots = Plots(enabled=js is not None)
    last = specs.last_position_panels(runs)
    body = [f"<h1 id=\"overview\">Refusal circuit comparison: {esc(', '.join(n for n, _, _ in runs))}</h1>",
            '<p class="muted">Layers are shown at depth layer / n_layers so models of different depth overlay. '
            f"Patching values: {esc(METRIC_TITLE)}.</p>",
            '<h2 id="headline">Headline numbers</h2>',
            table(["model", "layers", "heads", "harmful mean", "harmless mean", "gap", "sanity check",
                   "max resid patching, last position", "at", "heads above threshold", "joint sufficiency",
                   "sufficiency 95% CI"], _headline_rows(runs, out_dir), raw=(0,)),
            _evaluation_table(runs),
            '<h2 id="interactive">Overlays</h2>', plots.add(specs.dla_panels(runs)),
            plots.add(last) if last else "",
            '<h2 id="figures">Figures</h2>',
            *(f'<h3>{esc(c)}</h3><img class="fig" alt="{esc(c)}" src="{png_data_uri(p)}">' for c, p in pngs)]
    nav = [("overview", "Overview"), ("headline", "Headline numbers"), ("evaluation", "Held-out refusal rates"),
           ("interactive", "Overlays"), ("figures", "Figures")]
    path = out_dir / "comparison.html"
    write_text(path, page("refusal-lab comparison", nav, "\n".join(b for b in body if b), plots, js))  # atomic
    return path
