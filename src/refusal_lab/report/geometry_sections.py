"""The report's geometry section: the refusal direction's separation per layer, its cosines, the
k-dimensional check, heads → direction and what the heads read and how their patch reaches the
metric, in words (the step's findings), figures (the specs of
:mod:`refusal_lab.report.specs.geometry`) and tables."""

from __future__ import annotations

from refusal_lab.report.common import fmt, fmt_ci
from refusal_lab.report.interactive import Plots
from refusal_lab.report.page import details, esc, numbers_bold, table
from refusal_lab.report.specs import geometry as specs
from refusal_lab.run.results import Geometry, Results


def _pm(m: dict) -> str:
    return f"{fmt(m['mean'])} ± {fmt(m['se'])}"


def geometry_separation(g: Geometry, plots: Plots) -> str:
    s = g["separation"]
    out = ['<h3 id="geometry-separation">Separation along r̂</h3>',
           f"<p><code>{esc(s['site'])}</code> at column {esc(s['column'])} of the {esc(s['split'])} instructions "
           f"({esc(s['n_harmful'])} harmful, {esc(s['n_harmless'])} harmless; never used for a choice), projected on "
           "the unit refusal direction at every layer (float64). Gap: harmful − harmless mean, Welch SE, percentile "
           "bootstrap 95% interval (each side resampled on its own).</p>",
           plots.add(specs.separation_panels(g))]
    out.append(details("Per layer", table(
        ["layer", "harmful mean", "harmful sd", "harmless mean", "harmless sd", "gap", "gap SE", "gap 95% CI"],
        [[l, s["harmful_mean"][i], s["harmful_sd"][i], s["harmless_mean"][i], s["harmless_sd"][i], s["gap"][i],
          s["gap_se"][i], fmt_ci(s["gap_ci95"][i])] for i, l in enumerate(s["layers"])])))
    return "\n".join(out)


def geometry_cosines(g: Geometry, plots: Plots) -> str:
    c = g["cosines"]
    out = ['<h3 id="geometry-cosines">Cosines</h3>',
           f"<p>The difference-in-means candidates of every layer at eoi column {esc(c['column'])} against each "
           "other (a zero candidate, e.g. where both sides hold the same token, is grey), and the run's vectors "
           "against each other.</p>",
           plots.add(specs.candidate_cosines_heatmap(g)), plots.add(specs.vector_cosines_heatmap(g))]
    out.append(table(["vector", "what", *c["vectors"]],
                     [[n, d, *row] for n, d, row in zip(c["vectors"], c["vector_descriptions"], c["vector_matrix"])]))
    return "\n".join(out)


def geometry_subspace(g: Geometry, plots: Plots) -> str:
    sub = g["subspace"]
    base, d = sub["baseline"], sub["direction"]
    out = ['<h3 id="geometry-subspace">Is one dimension enough?</h3>',
           f"<p>Basis: {esc(sub['definition'])} ({esc(', '.join(f'{v} {k}' for k, v in sub['n_basis'].items()))}). "
           f"{esc(sub['note'])}. Unedited <b>{esc(_pm(base))}</b>, r̂ ablated <b>{esc(_pm(d))}</b> "
           f"(n = {esc(d['n'])} {esc(sub['split'])} harmful instructions).</p>",
           plots.add(specs.subspace_chart(g)),
           table(["k", "mean refusal log-odds", "SE", "n", "cosine of direction k with r̂", "explained (direction k)"],
                 [[r["k"], r["mean"], r["se"], r["n"], r["cos_direction"], sub["explained"][r["k"] - 1]]
                  for r in sub["rows"]])]
    return "\n".join(out)


def geometry_heads(g: Geometry, plots: Plots) -> str:
    h = g["heads"]
    out = ['<h3 id="geometry-heads">Refusal heads → refusal direction</h3>']
    if h is None:
        return out[0] + f'<p class="muted">Not measured: {esc(g["heads_note"])}.</p>'
    out.append(f"<p>Object prompts (pair i: harmful i, harmless i; n = {esc(h['n_pairs'])} pairs). Readout: "
               f"{esc(h['readout'])}. The {esc(len(h['heads']))} refusal heads' <code>attn.hook_z</code> at column "
               f"{esc(h['heads_column'])} patched harmful → harmless shift it by <b>{esc(_pm(h['heads_shift']))}</b>; "
               f"the whole <code>{esc(h['resid_patch_site'])}</code> at that column patched instead shifts it by "
               f"<b>{esc(_pm(h['resid_shift']))}</b>: ratio <b>{esc(fmt(h['ratio']))}</b> (95% CI "
               f"{esc(fmt_ci(h['ratio_ci95']) or '–')}); of the full gap {esc(_pm(h['gap']))} the heads' patch moves "
               f"{esc(fmt(h['ratio_to_gap']))} (95% CI {esc(fmt_ci(h['ratio_to_gap_ci95']) or '–')}). Means ± SE over "
               "pairs, intervals: percentile bootstrap over pairs.</p>")
    out.append(plots.add(specs.heads_panels(h)))
    out.append(table(["head", "column", "harmful mean", "harmless mean", "difference", "SE", "95% CI", "n pairs"],
                     [[f"L{w['layer']}H{w['head']}", f"{w['column']} ({w['index']})", w["harmful_mean"],
                       w["harmless_mean"], w["difference"], w["difference_se"], fmt_ci(w["difference_ci95"]),
                       w["n_pairs"]] for w in h["writes"]]))
    return "\n".join(out)


def geometry_head_reads(g: Geometry, plots: Plots) -> str:
    """What the refusal heads attend to and how their patch reaches the metric (only when measured)."""
    h = g["heads"]
    if h is None or "reads" not in h:
        return ""
    rd = h["reads"]
    out = ['<h3 id="geometry-head-reads">What the refusal heads read, and their paths to the metric</h3>',
           f"<p>Attention (<code>{esc(rd['site'])}</code>, post-softmax, GQA expanded per query head) of the "
           f"{esc(len(rd['heads']))} refusal heads from the patched column(s) {esc(rd['heads_cols'])} and from the last "
           f"column to every labelled column from the object on, over n = {esc(rd['n_pairs'])} pairs of object "
           "prompts; the heatmaps show harmful − harmless (paired means). Head set: each prompt's attention averaged "
           "over the heads, mean ± SE over prompts, 95% percentile bootstrap interval.</p>",
           plots.add(specs.head_reads_panels(h))]
    for q, row in zip(rd["query_roles"], rd["rows"]):
        out.append(details(f"Head set from {q} (column {row['index']})", table(
            ["key", "harmful", "harmful SE", "harmless", "harmless SE", "difference", "SE", "95% CI"],
            [[k, a["mean"], a["se"], b["mean"], b["se"], d["mean"], d["se"], fmt_ci(d["ci95"])]
             for k, a, b, d in zip(rd["key_labels"], row["set_harmful"], row["set_harmless"], row["set_difference"])])))
    p, d = h.get("paths"), h.get("downstream")
    if p:
        out.append(f"<p>Path split of the heads' patch (harmful → harmless <code>attn.hook_z</code>) on "
                   f"{esc(p['metric'])}: <b>total</b> = patched − clean harmless; <b>direct</b> = the heads' outputs "
                   "straight to the logits with every later layer and the final norm's scale frozen (direct logit "
                   "attribution with the receiving run's scale; 0 when the last column is not patched, since a write "
                   "at another column reaches the logits only through later attention); indirect = total − direct. "
                   "Gemma 2's direct effect is before its final soft-cap.</p>")
        out.append(plots.add(specs.head_paths_chart(h)))
        rows = [[f"{key} {x['cols']}", _pm(x["total"]), _pm(x["direct"]), _pm(x["indirect"]), x["direct_fraction"],
                 fmt_ci(x["direct_fraction_ci95"]), x["n_pairs"]]
                for key, x in ((k, p[k]) for k in ("heads", "last") if k in p)]
        out.append(table(["patched columns", "total", "direct", "indirect", "direct / total", "95% CI", "n pairs"],
                         rows))
    if d:
        out.append(f"<p>r̂ projected out of every residual write after layer {esc(d['after_layer'])} ({esc(d['sites'])}; "
                   f"{esc(d['n_sites'])} sites) in the clean and the patched harmless runs: the heads' patch effect goes "
                   f"from <b>{esc(_pm(d['effect']))}</b> to <b>{esc(_pm(d['effect_ablated']))}</b> (sufficiency "
                   f"{esc(fmt(d['sufficiency']))} → {esc(fmt(d['sufficiency_ablated']))} of the gap "
                   f"{esc(_pm(d['gap']))}): <b>{esc(fmt(d['fraction_removed']))}</b> of it removed (95% CI "
                   f"{esc(fmt_ci(d['fraction_removed_ci95']) or '–')}, n = {esc(d['n_pairs'])} pairs).</p>")
        x = d.get("residual")
        if x and x["n_sites"]:
            out.append(f"<p>With r̂ also projected out of the residual entering layer {esc(d['after_layer'] + 1)} "
                       f"(<code>hook_resid_pre</code>, every column: what the heads and every earlier layer wrote "
                       f"along r̂; {esc(x['n_sites'])} sites): <b>{esc(_pm(x['effect_ablated']))}</b> (sufficiency "
                       f"{esc(fmt(x['sufficiency_ablated']))}): <b>{esc(fmt(x['fraction_removed']))}</b> removed "
                       f"(95% CI {esc(fmt_ci(x['fraction_removed_ci95']) or '–')}).</p>")
    return "\n".join(out)


def section_geometry(r: Results, plots: Plots) -> str:
    """The geometry section (only when the run has it): findings, then each part."""
    if "geometry" not in r:
        return ""
    g = r["geometry"]
    out = ['<h2 id="geometry">Geometry of the refusal direction</h2>',
           f"<p>Direction: layer {esc(g['direction']['layer'])}, eoi column {esc(g['direction']['position'])}, norm "
           f"{esc(fmt(g['direction']['norm']))}.</p>"]
    if g["findings"]:
        out.append('<ul class="findings">' + "".join(f"<li>{numbers_bold(f)}</li>" for f in g["findings"]) + "</ul>")
    out += [geometry_separation(g, plots), geometry_cosines(g, plots), geometry_subspace(g, plots),
            geometry_heads(g, plots), geometry_head_reads(g, plots)]
    return "\n".join(out)
