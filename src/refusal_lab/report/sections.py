"""The report's sections on the replication: overview and findings, the sanity gate, prompts,
baseline, logit attribution, patching, refusal heads, objects and the run's bookkeeping.

Each ``section_*`` takes typed results (:class:`refusal_lab.run.results.Results`) and the page's
:class:`~refusal_lab.report.interactive.Plots`, and returns escaped HTML; figures come from the
same specs as the PNGs (:mod:`refusal_lab.report.specs.run`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from refusal_lab.report.common import as_array, fmt, fmt_ci, grid_title, headline, iter_grids, metric_label
from refusal_lab.report.interactive import Plots, clean
from refusal_lab.report.page import cards, details, esc, numbers_bold, row, table
from refusal_lab.report.specs import METRIC_TITLE
from refusal_lab.report.specs import run as specs
from refusal_lab.run.results import Heads, Results


def section_overview(r: Results) -> str:
    """Header, the sanity banner, headline cards and findings."""
    m, h = r["model"], headline(r)
    items = [("harmful − harmless gap", fmt(h["gap"])), ("harmful mean", fmt(h["harmful_mean"])),
             ("harmless mean", fmt(h["harmless_mean"]))]
    if h["max_resid_last"] is not None:
        items.append((f"max {h['resid_grid']} patching at last position (layer {h['max_resid_last_layer']})",
                      fmt(h["max_resid_last"])))
    if h["n_refusal_heads"] is not None:
        items.append(("refusal heads above threshold", str(h["n_refusal_heads"])))
    if h["sufficiency"] is not None:
        ci = fmt_ci(h["sufficiency_ci95"])
        items.append(("joint sufficiency of refusal heads" + (f" (95% CI {ci})" if ci else ""), fmt(h["sufficiency"])))
    spec = ", ".join(f"{k} {m[k]}" for k in ("model_type", "n_layers", "n_heads", "d_model", "d_head", "dtype",
                                              "device"))
    out = [f'<h1 id="overview">Refusal circuit report: {esc(m["name"])}</h1>', sanity_banner(r),
           f'<p class="muted">{esc(spec)}; seed {esc(r["seed"])}; schema version {esc(r["schema_version"])}. '
           f"Metric: {esc(metric_label(r))}; patching values are normalised so that {esc(METRIC_TITLE)}.</p>",
           cards(items)]
    if r["findings"]:
        out.append('<h2 id="findings">Findings</h2><ul class="findings">'
                   + "".join(f"<li>{numbers_bold(f)}</li>" for f in r["findings"]) + "</ul>")
    return "\n".join(out)


def sanity_banner(r: Results) -> str:
    """A warning banner when the metric does not separate harmful from harmless prompts, a note when the
    refusal token is far less likely than the model's own refusal onset, else nothing."""
    san = r["sanity"]
    if not san["separates"]:
        return ('<div class="banner warning" id="sanity-banner" role="alert"><b>Sanity check failed.</b> '
                f'{numbers_bold(san["sentence"])} <a href="#sanity">Details</a>.</div>')
    if san["token_note"]:
        return (f'<div class="banner note" id="sanity-note">{numbers_bold(san["token_note"])} '
                '<a href="#sanity">Details</a>.</div>')
    return ""


def sanity_table(r: Results) -> str:
    """The sanity gate's verdict and numbers."""
    san = r["sanity"]
    gap, on = san["gap"], san["refusal_onset_fraction"]
    ref, top = san["refusal_token"], san["top_refusal_onset"]
    onset_ci = fmt_ci(on["ci95"], 3)
    rows = [[f"paired gap harmful − harmless ({san['metric']})", gap["mean"], gap["se"], fmt_ci(gap["ci95"], 3),
             f"{gap['n_pairs']} pairs"],
            [f"harmful prompts whose top next token is a refusal onset ({', '.join(map(repr, on['onset_tokens']))})",
             on["value"], None, onset_ci and f"{onset_ci} (Wilson)", f"{on['k']} of {on['n']}"],
            [f"mean probability of the refusal token {ref['token']!r} on harmful prompts", ref["mean_prob"], None,
             None, None],
            [f"mean probability of the most likely refusal onset {top['token']!r}", top["mean_prob"], None, None,
             None]]
    verdict = "<b>Separates</b>" if san["separates"] else '<b class="harmful">Does not separate</b>'
    return (f'<h3 id="sanity">Sanity check</h3><p>{verdict} <span class="muted">(rule: {esc(san["rule"])})</span></p>'
            + table(["", "value", "SE", "95% CI", "n"], rows))


def section_prompts(r: Results) -> str:
    """Template, an example chat-formatted prompt, the metric tokens and the grid positions."""
    p, t = r["prompts"], r["tokens"]
    return "\n".join([
        '<h2 id="prompts">Prompts and tokens</h2>',
        table(["template", "mode", "pairing", "sequence length"], [[p["template"], p["mode"], p["pairing"],
                                                                     p["seq_len"]]]),
        f"<h3>Example (harmful prompt 0, chat-formatted)</h3><pre>{esc(p['example'])}</pre>",
        "<h3>Metric tokens</h3>" + table(["role", "token", "id", "chosen by"],
                                         [[k, repr(t[k]["str"]), t[k]["id"], r["token_choice"][k]]
                                          for k in ("refusal", "compliance")]),
        "<h3>Positions used by the grids</h3>" + table(["index", "label", "token"],
                                                       [[q["index"], q["label"], repr(q["token"])]
                                                        for q in r["positions"]])])


def section_baseline(r: Results, plots: Plots) -> str:
    """The sanity gate, side means and gap, the metric per object, the top next tokens."""
    b = r["baseline"]
    lo = b["log_odds"]
    hm, sm = b["harmful_mean"], b["harmless_mean"]
    lo_gap = None if None in (lo["harmful_mean"], lo["harmless_mean"]) else lo["harmful_mean"] - lo["harmless_mean"]
    means = table(["", "harmful mean", "harmless mean", "gap"],
                  [[f"{metric_label(r)} ({b['metric']})", hm, sm, hm - sm],
                   ["refusal log-odds", lo["harmful_mean"], lo["harmless_mean"], lo_gap]])
    tops = [f'<h3 class="{side}">Top next tokens, {side} mean</h3>'
            + table(["token", "prob"], [[repr(tok), p] for tok, p in b["top_next_tokens"][side]])
            for side in ("harmful", "harmless")]
    return "\n".join(['<h2 id="baseline">Baseline</h2>', sanity_table(r), means,
                      plots.add(specs.baseline_chart(r)), row(*tops)])


def section_dla(r: Results, plots: Plots) -> str:
    """Accumulated residual logit attribution, components, per-head DLA."""
    return "\n".join(['<h2 id="dla">Logit attribution</h2>',
                      f'<p class="muted">Final-norm scale: {esc(r["dla"]["scale"])}</p>',
                      plots.add(specs.dla_resid_chart(r)), plots.add(specs.dla_components_panels(r)),
                      plots.add(specs.dla_heads_heatmap(r))])


def section_patching(r: Results, plots: Plots) -> str:
    """Every patching grid (exact, attribution, necessity) as a heatmap with hover, and the agreement
    of attribution with exact patching."""
    grids = list(iter_grids(r))
    if not grids:
        return ""
    pt = r["patching"]
    out = ['<h2 id="patching">Activation patching</h2>',
           f'<p class="muted">Each cell is the mean normalised metric after patching that site ({esc(METRIC_TITLE)}). '
           "Hover a cell for its value ± its standard error over prompt pairs, the number of pairs and a 95% "
           "bootstrap interval over pairs (the baselines are held fixed).</p>"]
    if not all(g["interpretable"] for *_, g in grids):
        out.append('<p class="warn" id="patching-not-interpretable"><b>Not interpretable:</b> the metric does '
                   'not separate harmful from harmless prompts on this model (see the '
                   '<a href="#sanity-banner">sanity check</a>), so these normalised values do not measure '
                   "how much of a refusal signal a site carries.</p>")
    summary, figs = [], []
    for kind, name, slug, g in grids:
        a = as_array(g["values"])
        if np.isfinite(a).any():
            i, j = np.unravel_index(int(np.nanargmax(a)), a.shape)
            summary.append([kind, name, g["direction"], g["method"], f"{a.shape[0]}×{a.shape[1]}", float(a[i, j]),
                            f"layer {g['rows'][i]}, {g['cols'][j]}"])
        figs.append(f'<h3 id="{esc(slug)}">{esc(grid_title(kind, name, g, r))}</h3>'
                    + plots.add(specs.grid_heatmap(kind, name, g, r)))
    out += [table(["kind", "grid", "direction", "method", "shape", "max", "at"], summary), *figs]
    agreement = pt.get("agreement", {})
    if agreement:
        out.append('<h3 id="agreement">Attribution vs exact patching</h3>')
        out.append(table(["grid", "variant", "Spearman", "top k", "top-k overlap", "plain AtP Spearman"],
                         [[k, v["variant"], v["spearman"], v["top_k"], v["top_k_overlap"],
                           v["plain"]["spearman"] if "plain" in v else None] for k, v in agreement.items()]))
        out.append(row(*(plots.add(c) for c in specs.attribution_scatters(r).values())))
    return "\n".join(out)


def _sufficiency_interval(h: Heads) -> str:
    """`` ± 0.031 SE (95% CI [0.410, 0.530], n = 7 pairs)`` for the heads' joint sufficiency, when measured."""
    if h["sufficiency"] is None:
        return ""
    ci = fmt_ci(h["sufficiency_ci95"], 3)
    se = f" ± {fmt(h['sufficiency_se'])} SE" if h["sufficiency_se"] is not None else ""
    return esc(se + f" ({f'95% CI {ci}, ' if ci else ''}n = {h['n_pairs']} pairs)")


def section_heads(r: Results, plots: Plots) -> str:
    """Refusal heads: threshold, ranked bar chart, selected heads, joint sufficiency, generations."""
    if "heads" not in r:
        return ""
    h = r["heads"]
    out = ['<h2 id="heads">Refusal heads</h2>',
           f"<p>Heads patched one at a time at position <code>{esc(h['position'])}</code>; heads above "
           f"<b>{esc(fmt(h['threshold']))}</b> are kept as refusal heads. Patching all of them together recovers "
           f"<b>{esc(fmt(h['sufficiency']))}</b>{_sufficiency_interval(h)} of the gap (joint sufficiency; "
           f"{esc(METRIC_TITLE)}).</p>"]
    if h["ranked"]:
        out.append(plots.add(specs.heads_ranked_chart(r)))
    out.append(f"<h3>Selected heads ({len(h['selected'])})</h3>"
               + table(["layer", "head", "value"], [[x["layer"], x["head"], x["value"]] for x in h["selected"]]))
    if h["ranked"]:
        out.append(details("Top ranked heads", table(["rank", "layer", "head", "value"],
                                                     [[i + 1, x["layer"], x["head"], x["value"]]
                                                      for i, x in enumerate(h["ranked"])])))
    if h["generations"]:
        out.append("<h3>Generations with the refusal heads patched in</h3>" + table(
            ["object", "baseline", "patched"], [[g["object"], g["baseline"], g["patched"]] for g in h["generations"]],
            cls="gen"))
    return "\n".join(out)


def section_objects(r: Results) -> str:
    """The objects of each side with their baseline scores, and the dropped objects with reasons."""
    o, b = r["objects"], r["baseline"]
    sides = [f'<h3 class="{side}">{side} ({len(o[side])})</h3>'
             + table(["object", "baseline"], [[x, b[side][x]] for x in o[side]])
             for side in ("harmful", "harmless")]
    dropped = o["dropped"]
    return "\n".join(['<h2 id="objects">Objects</h2>', row(*sides), f"<h3>Dropped ({len(dropped)})</h3>" + (
        table(["object", "side", "reason"], [[d["object"], d["side"], d["reason"]] for d in dropped])
        if dropped else '<p class="muted">None.</p>')])


def section_run(r: Results, tables_: Sequence[str]) -> str:
    """Versions, timings, the model, the config and the CSV tables beside results.json."""
    timings = table(["step", "seconds"], list(r["timings"].items()))
    out = ['<h2 id="run">Run</h2>',
           row("<h3>Versions</h3>" + table(["package", "version"], list(r["versions"].items())),
               "<h3>Timings (s)</h3>" + timings),
           "<h3>Model</h3>" + table(["field", "value"], list(r["model"].items())),
           "<h3>Config</h3><pre>" + esc(json.dumps(clean(r["config"]), indent=2, ensure_ascii=False)) + "</pre>"]
    if tables_:
        out.append("<h3>Tables</h3><ul>" + "".join(f'<li><a href="tables/{esc(n)}">{esc(n)}</a></li>'
                                                   for n in tables_) + "</ul>")
    return "\n".join(out)
