"""Figure specs of the steering steps: the direction candidates, the val alpha sweep, the object-prompt
sweeps and the held-out refusal rates (see :mod:`refusal_lab.report.specs`)."""

from __future__ import annotations

import numpy as np

from refusal_lab.report.common import error_offsets, fmt, rate_ci, se_offsets
from refusal_lab.report.specs import (
    FILTERED, HARMFUL, HARMLESS, METRIC_TITLE, NEUTRAL, SELECTED, Chart, Heatmap, Lines, Mark, Panels, Rule,
    Series,
)
from refusal_lab.run.results import (
    EVALUATION_RATES, Direction, Evaluation, InstructionSweep, ObjectRow, ObjectSweep, Results, SweepRow,
)


def eoi_label(pos: int, eoi: list[str]) -> str:
    """``-4 '\\n'``: an end-of-instruction column with its token when known."""
    return f"{pos} {eoi[pos]!r}" if -len(eoi) <= pos < len(eoi) else str(pos)


def rate_name(key: str) -> str:
    """``harmless added`` for ``harmless_refusal_rate_added``."""
    return key.replace("_refusal_rate", "").replace("_", " ")


def direction_heatmap(d: Direction) -> Heatmap:
    """The bypass score of every candidate (layer x end-of-instruction column); filtered ones crossed,
    the selected one boxed; hover: the exact scores, norm, kept or why not. In the top_k mode, where
    only the candidates that pass KL get an exact bypass, the colours are the first-order estimate
    that ranked them all (the title says so; the exact scores are in the hover and the table)."""
    eoi, cols = d["eoi_tokens"], d["positions"]
    estimated = d.get("selection", {}).get("mode") == "top_k" and any(
        x.get("bypass_estimate") is not None for x in d["table"])
    layers = sorted({x["layer"] for x in d["table"]})
    li, ci = {v: i for i, v in enumerate(layers)}, {v: j for j, v in enumerate(cols)}
    z = np.full((len(layers), len(cols)), np.nan)
    hover: list[list[Lines]] = [[() for _ in cols] for _ in layers]
    filtered = []
    for x in d["table"]:
        i, j = li[x["layer"]], ci[x["position"]]
        value = x.get("bypass_estimate") if estimated else x["bypass"]
        z[i, j] = np.nan if value is None else value
        hover[i][j] = (f"layer {x['layer']}, column {eoi_label(x['position'], eoi)}", f"bypass {fmt(x['bypass'])}",
                       *((f"bypass estimate {fmt(x.get('bypass_estimate'))}",) if estimated else ()),
                       f"induce {fmt(x['induce'])}", f"KL {fmt(x['kl'])}", f"norm {fmt(x['norm'])}",
                       "kept" if x["kept"] else f"filtered: {x['reason']}")
        if not x["kept"]:
            filtered.append((i, j))
    title = ["Direction candidates: first-order bypass estimate per layer and column" if estimated else
             "Direction candidates: bypass score per layer and end-of-instruction column",
             "(lower = stronger; x = filtered out or not scored, red box = selected)" if estimated else
             "(lower = stronger; x = filtered out, red box = selected)",
             f"selected: layer {d['layer']}, column {eoi_label(d['position'], eoi)}; bypass "
             f"{fmt(d['baseline']['harmful_val_log_odds'], 2)} → {fmt(d['bypass'], 2)}"]
    if estimated:
        title.append(f"(colours: the estimate that chose the top {d['selection']['top_k']}; exact scores: hover, table)")
    if d["fallback"]:
        title.append("FALLBACK: every candidate was filtered out")
    return Heatmap(z, layers, [eoi_label(c, eoi) for c in cols], tuple(title),
                   ("bypass estimate" if estimated else "bypass", "(harmful val", "refusal log-odds,", "ablated)"),
                   xlabel="end-of-instruction column",
                   scale="sequential", hover=hover,
                   marks=[Mark("filtered out", filtered, "x", FILTERED),
                          Mark("selected", [(li[d["layer"]], ci[d["position"]])], "box", SELECTED)])


def _by_alpha(rows: list) -> list:
    return sorted(rows, key=lambda x: x["alpha"])


def sweep_charts(ins: InstructionSweep) -> list[Chart]:
    """The val alpha sweep: refusal rate (Wilson intervals) and refusal score against alpha, with the
    ablation and the chosen alpha."""
    rows: list[SweepRow] = _by_alpha(ins["rows"])
    x = [r["alpha"] for r in rows]
    abl, chosen = ins["ablation"], ins["chosen_alpha"]
    charts = []
    for what, key, ylabel in (("refusal rate", "refusal_rate", "refusal rate (judge)"),
                              ("refusal score", "refusal_score", "mean refusal log-odds")):
        series = []
        for side, color, label in (("induce", HARMLESS, "induce: harmless, +alpha"),
                                   ("suppress", HARMFUL, "suppress: harmful, −alpha")):
            y = [r[f"{side}_{key}"] for r in rows]
            err = hover = None
            if key == "refusal_rate":
                cis = [r[f"{side}_refusal_rate_ci95"] for r in rows]
                err = error_offsets(zip(y, cis))
                hover = [(label, f"alpha {a:g}", f"{what} {fmt(v)}",
                          f"95% CI {rate_ci(c, None, r[f'{side}_n'])} (Wilson)")
                         for a, v, c, r in zip(x, y, cis, rows)]
            series.append(Series(label, x, y, color, err=err, hover=hover))
        rules = [Rule(chosen, axis="v", dash="dot", name=f"chosen alpha {chosen:g}")]
        if abl[key] is not None:
            rules.append(Rule(abl[key], color=HARMFUL, name=f"ablation: harmful ({abl[key]:.2f})"))
        charts.append(Chart((f"Val {what} vs alpha", "(dashed: ablation, dotted: chosen alpha)"), series,
                            xlabel="alpha", ylabel=ylabel, rules=rules,
                            ylim=(-0.03, 1.03) if key == "refusal_rate" else None))
    return charts


def sweep_panels(ins: InstructionSweep) -> Panels:
    """:func:`sweep_charts` side by side under one title."""
    return Panels((f"Alpha sweep of the selected direction on val instructions (layer {ins['layer']}, "
                   f"n = {ins['n_harmless']} harmless / {ins['n_harmful']} harmful)",), list(sweep_charts(ins)),
                  columns=2)


def object_charts(name: str, o: ObjectSweep) -> list[Chart]:
    """One vector on the object prompts: normalised metric (± SE) and, when completions were judged,
    refusal fraction (Wilson intervals), against |alpha|."""
    rows: list[ObjectRow] = _by_alpha(o["rows"])
    x = list(range(len(rows)))
    ticks = [f"{r['alpha']:g}" for r in rows]
    charts = []
    for key, ylabel in (("normalised", f"normalised metric ({METRIC_TITLE})"),
                        ("refusal_fraction", "refusal fraction (judge)")):
        if key == "refusal_fraction" and not all("harmless_refusal_fraction" in r for r in rows):
            continue  # no generation in this run
        series = []
        for side, color, label in (("harmless", HARMLESS, "harmless objects, +alpha"),
                                   ("harmful", HARMFUL, "harmful objects, −alpha")):
            y = [r[f"{side}_{key}"] for r in rows]
            if key == "normalised":
                ses = [r[f"{side}_normalised_se"] for r in rows]
                err = se_offsets(ses)
                extra = [f"± {fmt(e)} SE, n = {r[f'{side}_n']}" for e, r in zip(ses, rows)]
            else:
                cis = [r[f"{side}_refusal_fraction_ci95"] for r in rows]
                err = error_offsets(zip(y, cis))
                extra = [f"95% CI {rate_ci(c, None, r[f'{side}_n'])} (Wilson)" for c, r in zip(cis, rows)]
            series.append(Series(label, x, y, color, err=err,
                                 hover=[(label, f"|alpha| {t}", f"{fmt(v)}", e) for t, v, e in zip(ticks, y, extra)]))
        rules = ([Rule(0.0, color=HARMLESS, dash="dot"), Rule(1.0, color=HARMFUL, dash="dot")]
                 if key == "normalised" else [])
        what = ylabel.split(" (")[0]
        charts.append(Chart((f"{name} vector: {what} vs alpha", f"(layer {o['layer']})"), series, xlabel="|alpha|",
                            ylabel=ylabel, rules=rules, xticks=ticks,
                            ylim=(-0.03, 1.03) if key == "refusal_fraction" else None))
    return charts


def objects_panels(r: Results) -> Panels:
    """:func:`object_charts` of every vector, one row per vector."""
    objs = r["steering"]["objects"]
    panels = [c for name, o in objs.items() for c in object_charts(name, o)]
    return Panels(("Object-prompt sweeps: vectors added to harmless objects, subtracted from harmful ones",), panels,
                  columns=max(1, len(panels) // max(1, len(objs))))


def evaluation_chart(ev: Evaluation) -> Chart:
    """The held-out refusal rates: baseline beside edited, with Wilson intervals and n."""
    rates = [(k, ev[k]) for k in EVALUATION_RATES]
    x = list(range(len(rates)))
    hover = [(k, f"n {v['n']}", v["intervention"]) for k, v in rates]
    series = [Series("baseline", x, [v["baseline"] for _, v in rates], NEUTRAL, kind="bar", value_labels=True,
                     err=error_offsets((v["baseline"], v["baseline_ci95"]) for _, v in rates),
                     hover=[h + (f"baseline {fmt(v['baseline'])}",
                                 f"95% CI {rate_ci(v['baseline_ci95'], v['baseline_k'], v['n'])} (Wilson)")
                            for h, (_, v) in zip(hover, rates)]),
              Series("edited", x, [v["value"] for _, v in rates],
                     [HARMLESS if k.startswith("harmless") else HARMFUL for k, _ in rates], kind="bar",
                     value_labels=True, err=error_offsets((v["value"], v["ci95"]) for _, v in rates),
                     hover=[h + (f"edited {fmt(v['value'])}", f"95% CI {rate_ci(v['ci95'], v['k'], v['n'])} (Wilson)")
                            for h, (_, v) in zip(hover, rates)])]
    return Chart((f"Held-out {ev['split']} refusal rates: baseline vs edited (layer {ev['layer']}, "
                  f"alpha {ev['alpha']:g})",), series, ylabel="refusal rate",
                 xticks=[f"{rate_name(k)} (n = {v['n']})" for k, v in rates], ylim=(0.0, 1.12))
