"""Figure specs of the geometry step: the separation curve along r̂, the candidates' cosine matrix
and the vectors' cosines, the k-dimensional check and heads → direction (see
:mod:`refusal_lab.report.specs`)."""

from __future__ import annotations

from refusal_lab.report.common import as_array, error_offsets, fmt, fmt_ci, se_offsets
from refusal_lab.report.specs import (
    HARMFUL, HARMLESS, INK, NEUTRAL, SELECTED, Chart, Heatmap, Lines, Mark, Panels, Rule, Series,
)
from refusal_lab.run.results import Geometry, GeometryHeads

ZERO = Rule(0.0, color="#888888", dash="solid")


def separation_panels(g: Geometry) -> Panels:
    """Per layer: each side's mean projection on r̂ ± 1 sd, and the harmful − harmless gap with its
    bootstrap 95 % interval; the direction's layer dotted."""
    s, layer = g["separation"], g["direction"]["layer"]
    x = s["layers"]
    sides = []
    for side, color in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        m, sd, n = s[f"{side}_mean"], s[f"{side}_sd"], s[f"n_{side}"]
        sides.append(Series(f"{side} (n = {n}), mean ± sd", x, m, color, err=se_offsets(sd),
                            hover=[(f"{side}, layer {l}", f"mean {fmt(a)}", f"sd {fmt(b)}", f"n {n}")
                                   for l, a, b in zip(x, m, sd)]))
    at = Rule(layer, axis="v", dash="dot", name=f"direction's layer {layer}")
    gap = Series("harmful − harmless (95% CI, bootstrap)", x, s["gap"], INK, err=error_offsets(zip(s["gap"], s["gap_ci95"])),
                 hover=[(f"layer {l}", f"gap {fmt(v)} ± {fmt(e)} SE", f"95% CI {fmt_ci(c) or '–'}")
                        for l, v, e, c in zip(x, s["gap"], s["gap_se"], s["gap_ci95"])])
    where = f"{s['site']} at column {s['column']}, {s['split']} instructions"
    return Panels((f"Separation along the refusal direction r̂ ({where})",),
                  [Chart(("Projection on r̂ per layer", "(mean ± 1 sd per side)"), sides, xlabel="layer",
                         ylabel="resid_pre · r̂", rules=[ZERO, at]),
                   Chart(("Harmful − harmless gap per layer", "(95% bootstrap CI)"), [gap], xlabel="layer",
                         ylabel="gap of resid_pre · r̂", rules=[ZERO, at])], columns=2)


def candidate_cosines_heatmap(g: Geometry) -> Heatmap:
    """Cosines between the per-layer candidate directions at the direction's column (L × L); the
    chosen layer's cell boxed; hover: both layers, cosine and the candidates' norms."""
    c, layer = g["cosines"], g["direction"]["layer"]
    z = as_array(c["candidates"])
    norms = c["candidate_norms"]
    hover: list[list[Lines]] = [[(f"layers {a} and {b}", f"cosine {fmt(z[i, j])}", f"norms {fmt(norms[i])}, "
                                  f"{fmt(norms[j])}") for j, b in enumerate(c["layers"])]
                                for i, a in enumerate(c["layers"])]
    li = c["layers"].index(layer)
    return Heatmap(z, c["layers"], c["layers"],
                   ("Cosine similarity of the candidate directions across layers",
                    f"(difference in means at eoi column {c['column']}; box = the chosen layer {layer}; grey = zero candidate)"),
                   ("cosine",), xlabel="layer", ylabel="layer", zlim=1.0, hover=hover,
                   marks=[Mark("chosen layer", [(li, li)], "box", SELECTED)])


def vector_cosines_heatmap(g: Geometry) -> Heatmap:
    """Cosines between the run's vectors: r̂, the object-prompt difference and the heads' vector (when
    the steering step saved them), and the first principal direction of the subspace check."""
    c = g["cosines"]
    z = as_array(c["vector_matrix"])
    names = c["vectors"]
    hover = [[(f"{a} vs {b}", f"cosine {fmt(z[i, j])}") for j, b in enumerate(names)] for i, a in enumerate(names)]
    return Heatmap(z, names, names, ("Cosine similarity of the run's vectors",), ("cosine",), xlabel="", ylabel="",
                   zlim=1.0, hover=hover)


def subspace_chart(g: Geometry) -> Chart:
    """Mean refusal log-odds of the harmful val prompts with the top-k principal subspace ablated
    (± SE), beside the unedited prompts and r̂'s ablation."""
    sub = g["subspace"]
    rows = sub["rows"]
    x = list(range(len(rows)))
    y = [r["mean"] for r in rows]
    hover = [(f"k = {r['k']}", f"log-odds {fmt(r['mean'])} ± {fmt(r['se'])} SE, n = {r['n']}",
              f"cosine of direction {r['k']} with r̂ {fmt(r['cos_direction'])}",
              f"explained {fmt(sub['explained'][r['k'] - 1])}") for r in rows]
    base, d = sub["baseline"], sub["direction"]
    rules = [Rule(base["mean"], color=NEUTRAL, name=f"unedited {fmt(base['mean'], 2)} ± {fmt(base['se'], 2)}"),
             Rule(d["mean"], color=HARMFUL, name=f"r̂ ablated {fmt(d['mean'], 2)} ± {fmt(d['se'], 2)}")]
    return Chart((f"k-dimensional check: top-k principal subspace ablated (layer {sub['layer']}, column "
                  f"{sub['column']})", f"({sub['split']} harmful instructions, n = {d['n']}; mean ± SE; lower = "
                  "more refusal removed)"),
                 [Series("subspace ablated", x, y, INK, kind="bar", err=se_offsets([r["se"] for r in rows]),
                         hover=hover, value_labels=True)],
                 ylabel="mean refusal log-odds", xticks=[f"k = {r['k']}" for r in rows], rules=rules)


def heads_panels(h: GeometryHeads) -> Panels:
    """Heads → direction: the readout's shift by the heads' patch, by the whole-residual patch and the
    full gap (95 % bootstrap intervals); each selected head's write along r̂ at the last column."""
    keys = (("heads_shift", "refusal heads patched"), ("resid_shift", f"whole {h['resid_patch_site']} patched"),
            ("gap", "harmful − harmless"))
    vals = [h[k] for k, _ in keys]
    shifts = Chart((f"Shift of {h['readout'].split(',')[0]} · r̂ (last column)",
                    f"(harmless object prompts, patched from harmful ones; n = {h['n_pairs']} pairs; ratio "
                    f"{fmt(h['ratio'], 2)})"),
                   [Series("shift", list(range(3)), [v["mean"] for v in vals], [HARMFUL, NEUTRAL, INK], kind="bar",
                           err=error_offsets((v["mean"], v["ci95"]) for v in vals), value_labels=True,
                           hover=[(name, f"{fmt(v['mean'])} ± {fmt(v['se'])} SE", f"95% CI {fmt_ci(v['ci95']) or '–'}",
                                   f"n {v['n']}") for (_, name), v in zip(keys, vals)])],
                   ylabel="shift of the projection on r̂", xticks=[name for _, name in keys], rules=[ZERO])
    w = [x for x in h["writes"] if x["column"] == "last"]
    names = [f"L{x['layer']}H{x['head']}" for x in w]
    idx = list(range(len(w)))
    writes = Chart(("Each refusal head's write along r̂ at the last column", "(mean over prompts; difference ± SE)"),
                   [Series("harmful", idx, [x["harmful_mean"] for x in w], HARMFUL, kind="bar"),
                    Series("harmless", idx, [x["harmless_mean"] for x in w], HARMLESS, kind="bar"),
                    Series("harmful − harmless", idx, [x["difference"] for x in w], INK, kind="bar",
                           err=se_offsets([x["difference_se"] for x in w]),
                           hover=[(n, f"difference {fmt(x['difference'])} ± {fmt(x['difference_se'])} SE",
                                   f"n {x['n_pairs']} pairs") for n, x in zip(names, w)])],
                   ylabel="head output · r̂", xticks=names, rules=[ZERO])
    return Panels(("Refusal heads → refusal direction",), [shifts, writes], columns=2)


def head_reads_panels(h: GeometryHeads) -> Panels:
    """What the refusal heads attend to: per query column a heatmap heads × labelled key columns of the
    harmful − harmless attention (paired mean over the object prompts), one shared colour scale."""
    rd = h["reads"]
    names = [f"L{x['layer']}H{x['head']}" for x in rd["heads"]]
    panels = []
    for q, row in zip(rd["query_roles"], rd["rows"]):
        z = as_array(row["difference"])
        hover = [[(f"{n} from {q} (column {row['index']}) to {k}", f"harmful {fmt(a)}, harmless {fmt(b)}",
                   f"difference {fmt(d)} ± {fmt(e)} SE", f"95% CI {fmt_ci(c) or '–'}")
                  for k, a, b, d, e, c in zip(rd["key_labels"], ra, rb, rdiff, rse, rci)]
                 for n, ra, rb, rdiff, rse, rci in zip(names, row["harmful_mean"], row["harmless_mean"],
                                                       row["difference"], row["difference_se"], row["difference_ci95"])]
        panels.append(Heatmap(z, names, rd["key_labels"], (f"from {q} (column {row['index']})",),
                              ("attention", "harmful − harmless"), xlabel="key position", ylabel="head", hover=hover))
    return Panels((f"What the refusal heads read: attention harmful − harmless (object prompts, n = {rd['n_pairs']} "
                   "pairs)",), panels, columns=len(panels), shared_scale=True)


def head_paths_chart(h: GeometryHeads) -> Chart:
    """The heads' patch on the metric: total, direct (straight to the logits) and indirect effect per
    patched column set, and its effect with r̂ ablated downstream of the heads (95 % bootstrap CIs)."""
    p, d = h["paths"], h.get("downstream")
    bars: list[tuple[str, dict, str]] = []
    for key, what in (("heads", "heads' column"), ("last", "last column")):
        if key in p:
            bars += [(f"{what}: total", p[key]["total"], INK), (f"{what}: direct", p[key]["direct"], HARMFUL),
                     (f"{what}: indirect", p[key]["indirect"], NEUTRAL)]
    if d:
        bars.append((f"heads' column, r̂ ablated after L{d['after_layer']}", d["effect_ablated"], HARMLESS))
        x = d.get("residual")
        if x and x["n_sites"]:
            bars.append((f"heads' column, r̂ ablated from resid_pre L{d['after_layer'] + 1} on", x["effect_ablated"],
                         HARMLESS))
    return Chart(("The refusal heads' patch on the metric: direct vs through later layers",
                  f"({p['metric']}; mean over n = {p['heads']['n_pairs']} pairs, 95% bootstrap CI)"),
                 [Series("effect", list(range(len(bars))), [v["mean"] for _, v, _ in bars], [c for _, _, c in bars],
                         kind="bar", err=error_offsets((v["mean"], v["ci95"]) for _, v, _ in bars), value_labels=True,
                         hover=[(n, f"{fmt(v['mean'])} ± {fmt(v['se'])} SE", f"95% CI {fmt_ci(v['ci95']) or '–'}",
                                 f"n {v['n']}") for n, v, _ in bars])],
                 ylabel="change of the metric", xticks=[n for n, _, _ in bars], rules=[ZERO])


def geometry_specs(g: Geometry) -> list[tuple[str, object]]:
    """Every geometry figure as ``(file stem, spec)``, in report order."""
    out = [("geometry_separation", separation_panels(g)), ("geometry_cosines", candidate_cosines_heatmap(g)),
           ("geometry_vectors", vector_cosines_heatmap(g)), ("geometry_subspace", subspace_chart(g))]
    if g["heads"] is not None:
        out.append(("geometry_heads", heads_panels(g["heads"])))
        if "reads" in g["heads"]:
            out.append(("geometry_head_reads", head_reads_panels(g["heads"])))
        if "paths" in g["heads"]:
            out.append(("geometry_head_paths", head_paths_chart(g["heads"])))
    return out


__all__ = ["candidate_cosines_heatmap", "geometry_specs", "head_paths_chart", "head_reads_panels", "heads_panels",
           "separation_panels", "subspace_chart",
           "vector_cosines_heatmap"]
