"""Figure specs of the replication part of a run: baseline, logit attribution, patching grids,
attribution vs exact, refusal heads (see :mod:`refusal_lab.report.specs` for what a spec is)."""

from __future__ import annotations

import numpy as np

from refusal_lab.report.common import as_array, finite, fmt, fmt_ci, grid_title, metric_label
from refusal_lab.report.specs import (
    ATTN, HARMFUL, HARMLESS, INK, METRIC_TITLE, MLP, NEUTRAL, POINTS, Chart, Heatmap, Lines, Panels, Rule, Series,
)
from refusal_lab.run.results import AttributionGrid, Grid, PlainAgreement, Results

ZERO = Rule(0.0, color="#888888", dash="solid")


def baseline_chart(r: Results) -> Chart:
    """The metric per object, both sides, with each side's mean dashed."""
    b = r["baseline"]
    metric = metric_label(r)
    h, s = b["harmful"], b["harmless"]
    hm, sm = b["harmful_mean"], b["harmless_mean"]
    series = [Series(side, list(range(off, off + len(d))), list(d.values()), color, kind="bar",
                     hover=[(f"{side}: {k}", f"{metric} {fmt(v)}") for k, v in d.items()])
              for side, d, color, off in (("harmful", h, HARMFUL, 0), ("harmless", s, HARMLESS, len(h)))]
    return Chart((f"Baseline {metric} per object (gap {hm - sm:.2f}; dashed: side means)",), series,
                 ylabel=metric, xticks=list(h) + list(s),
                 rules=[ZERO, Rule(hm, color=HARMFUL, name=f"harmful mean {hm:.2f}"),
                        Rule(sm, color=HARMLESS, name=f"harmless mean {sm:.2f}")])


def _sides(labels: list[str], h: list, s: list, diff: bool) -> list[Series]:
    """Harmful and harmless means over ``labels`` (and their difference, dashed)."""
    x = list(range(len(labels)))
    out = [Series("harmful mean", x, h, HARMFUL), Series("harmless mean", x, s, HARMLESS)]
    if diff:
        out.append(Series("harmful − harmless", x, list(as_array(h) - as_array(s)), INK, dash="dash"))
    return out


def dla_resid_chart(r: Results) -> Chart:
    """The accumulated residual stream projected on the metric direction, per layer, both sides."""
    d = r["dla"]
    return Chart(("Logit attribution of the accumulated residual stream (last position)",),
                 _sides(d["labels"], d["harmful_mean"], d["harmless_mean"], diff=True), ylabel=metric_label(r),
                 xticks=d["labels"], rules=[ZERO])


def dla_components_panels(r: Results) -> Panels:
    """Direct logit attribution per component: both sides, and their difference coloured attn / mlp."""
    c = r["dla"]["components"]
    labels = c["labels"]
    diff = list(as_array(c["harmful_mean"]) - as_array(c["harmless_mean"]))
    colors = [ATTN if "attn" in lab else MLP if "mlp" in lab else NEUTRAL for lab in labels]
    return Panels((f"Direct logit attribution per component ({metric_label(r)})",), [
        Chart(("Direct logit attribution per component",),
              _sides(labels, c["harmful_mean"], c["harmless_mean"], diff=False), ylabel="DLA", xticks=labels,
              rules=[ZERO]),
        Chart(("harmful − harmless per component (purple attn, green mlp)",),
              [Series("harmful − harmless", list(range(len(labels))), diff, colors, kind="bar")],
              ylabel="harmful − harmless", xticks=labels, rules=[ZERO])])


def dla_heads_heatmap(r: Results) -> Heatmap:
    """Per-head direct logit attribution, harmful − harmless."""
    hd = r["dla"]["heads"]
    return Heatmap(as_array(hd["harmful_mean"]) - as_array(hd["harmless_mean"]), hd["rows"], hd["cols"],
                   ("Per-head direct logit attribution, harmful − harmless",), ("DLA difference", metric_label(r)),
                   xlabel="head")


def grid_heatmap(kind: str, name: str, g: Grid, r: Results) -> Heatmap:
    """A normalised patching grid; hover: value ± SE over pairs, n and the bootstrap interval."""
    z, se = as_array(g["values"]), as_array(g["se"])
    lo, hi = as_array(g["ci95"]["low"]), as_array(g["ci95"]["high"])
    n = g["n_pairs"]

    def cell(i: int, j: int) -> Lines:
        v = "nan" if not np.isfinite(z[i, j]) else f"{z[i, j]:.4f}"
        lines = [f"layer {g['rows'][i]}", str(g["cols"][j]),
                 f"value {v} ± {se[i, j]:.4f} (SE, n = {n} pairs)" if np.isfinite(se[i, j])
                 else f"value {v} (n = {n} pairs)"]
        if np.isfinite(lo[i, j]) and np.isfinite(hi[i, j]):
            lines.append(f"95% CI [{lo[i, j]:.4f}, {hi[i, j]:.4f}]")
        return tuple(lines)

    return Heatmap(z, g["rows"], g["cols"], (grid_title(kind, name, g, r),),
                   ("normalised metric", g["direction"], "0 = harmless baseline,", "1 = harmful baseline"),
                   xlabel="head" if name == "heads" else "position (object column → last)",
                   hover=[[cell(i, j) for j in range(z.shape[1])] for i in range(z.shape[0])])


def scatter_chart(name: str, exact: Grid, attr: AttributionGrid, agreement: PlainAgreement | None) -> Chart:
    """Attribution against exact patching, one point per cell, with the y = x line."""
    a, b = as_array(exact["values"]), as_array(attr["values"])
    rows, cols = exact["rows"], exact["cols"]
    hover = [(f"layer {rows[i]}", str(cols[j]), f"exact {a[i, j]:.4f}", f"attribution {b[i, j]:.4f}")
             for i in range(a.shape[0]) for j in range(a.shape[1])]
    fin = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
    lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
    sub = ""
    if agreement is not None:
        rho = finite(agreement["spearman"])
        sub = (f"Spearman {'–' if rho is None else f'{rho:.2f}'}, top-{agreement['top_k']} overlap "
               f"{fmt(agreement['top_k_overlap'], 2)}")
    return Chart((f"{name}: attribution ({attr['variant']}) vs exact", sub),
                 [Series("cells", list(a.ravel()), list(b.ravel()), POINTS, kind="points", hover=hover),
                  Series("y = x", [lo, hi], [lo, hi], "#999999", dash="dash")],
                 xlabel="exact patching (normalised)", ylabel="attribution patching (normalised)")


def attribution_scatters(r: Results) -> dict[str, Chart]:
    """:func:`scatter_chart` of every attribution grid that has its exact grid, by grid name."""
    p = r["patching"]
    return {name: scatter_chart(name, p[name], g, p.get("agreement", {}).get(name))
            for name, g in p.get("attribution", {}).items() if name in p}


def heads_ranked_chart(r: Results) -> Chart:
    """The top heads by patching effect at the heads position, with the selection threshold."""
    h = r["heads"]
    thr = h["threshold"]
    vals = [x["value"] for x in h["ranked"]]
    names = [f"L{x['layer']}H{x['head']}" for x in h["ranked"]]
    sub = ""
    if finite(h["sufficiency"]) is not None:
        ci = fmt_ci(h["sufficiency_ci95"])
        sub = (f" (selected heads jointly recover {h['sufficiency']:.2f}"
               + (f", 95% CI {ci}, n = {h['n_pairs']} pairs" if ci else "") + ")")
    return Chart((f"Head patching at {h['position']}: ranked heads{sub}", "(dashed: threshold)"),
                 [Series("head", list(range(len(vals))), vals,
                         [HARMFUL if (finite(v) or 0.0) > thr else NEUTRAL for v in vals], kind="bar",
                         hover=[(n, f"value {fmt(v, 4)}") for n, v in zip(names, vals)])],
                 ylabel=f"normalised metric ({METRIC_TITLE})", xticks=names,
                 rules=[Rule(thr, color="#000000", name=f"threshold {thr:g}")])
