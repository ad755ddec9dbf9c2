"""The report's steering section: the selected refusal direction, the val alpha sweep, the
object-prompt sweeps and the held-out evaluation, each in words, figures (the specs of
:mod:`refusal_lab.report.specs.steering`) and tables."""

from __future__ import annotations

from refusal_lab.report.common import fmt, interval, rate_ci
from refusal_lab.report.interactive import Plots
from refusal_lab.report.page import details, esc, row, table
from refusal_lab.report.specs import METRIC_TITLE
from refusal_lab.report.specs import steering as specs
from refusal_lab.run.results import (
    EVALUATION_RATES, Direction, Evaluation, InstructionSweep, ObjectRow, ObjectSweep, Results,
)


def _vs(after: object, before: object) -> str:
    return f"{fmt(before)} → {fmt(after)}"


def steering_direction(d: Direction, plots: Plots) -> str:
    """The selected direction in words, the fallback warning, the candidates' bypass heatmap and table."""
    eoi, base = d["eoi_tokens"], d["baseline"]
    tok = f" (token <code>{esc(repr(d['position_token']))}</code>)" if d["position_token"] is not None else ""
    counts = "; ".join(f"{split}: {', '.join(f'{v} {k}' for k, v in n.items())}"
                       for split, n in (("train", d["n_train"]), ("val", d["n_val"])))
    text = [f"Layer <b>{esc(d['layer'])}</b>, eoi column <b>{esc(d['position'])}</b>{tok} at "
            f"<code>{esc(d['site'])}</code>, norm {esc(fmt(d['norm']))}.",
            "On the val instructions, ablating it moves the harmful refusal log-odds "
            f"<b>{esc(_vs(d['bypass'], base['harmful_val_log_odds']))}</b> (bypass, lower is better); adding it "
            f"moves the harmless ones <b>{esc(_vs(d['induce'], base['harmless_val_log_odds']))}</b> (induce); "
            f"KL on harmless prompts <b>{esc(fmt(d['kl']))}</b>.",
            f"Instructions {esc(counts)}.",
            "Filters: " + ", ".join(f"{esc(k)} {esc(fmt(v))}" for k, v in d["filters"].items()) + "."]
    out = ['<h3 id="steering-direction">Selected refusal direction</h3>', "<p>" + " ".join(text) + "</p>"]
    if d["fallback"]:
        out.append(f'<p class="warn"><b>Fallback:</b> {esc(d["fallback"])}</p>')
    out += [f'<p class="muted">{esc(d["note"])}</p>', plots.add(specs.direction_heatmap(d))]
    ranked = sorted(d["table"], key=lambda x: (not x["kept"], x["bypass"] is None, x["bypass"] or 0.0))
    kept = sum(x["kept"] for x in ranked)
    out.append(details(f"All {len(ranked)} candidates ({kept} kept), best bypass first", table(
        ["layer", "eoi column", "norm", "bypass", "induce", "KL", "kept", "reason"],
        [[x["layer"], specs.eoi_label(x["position"], eoi), x["norm"], x["bypass"], x["induce"], x["kl"],
          "yes" if x["kept"] else "no", x["reason"]] for x in ranked])))
    return "\n".join(out)


def steering_sweep(ins: InstructionSweep, plots: Plots) -> str:
    """The val alpha sweep of the selected direction: words, refusal rate and score against alpha, table."""
    rows, abl = sorted(ins["rows"], key=lambda x: x["alpha"]), ins["ablation"]
    out = ['<h3 id="steering-sweep">Alpha sweep on val instructions</h3>',
           f"<p>Vector: {esc(ins['vector'])} at layer {esc(ins['layer'])}, positions {esc(ins['positions'])}, split "
           f"{esc(ins['split'])} ({esc(ins['n_harmless'])} harmless, {esc(ins['n_harmful'])} harmful instructions). "
           "Induce: +alpha on harmless prompts; suppress: −alpha on harmful prompts; ablation: the direction "
           "projected out of every residual write on harmful prompts. Chosen alpha "
           f"<b>{ins['chosen_alpha']:g}</b> ({esc(ins['chosen_alpha_reason'])}).</p>",
           row(*(plots.add(c) for c in specs.sweep_charts(ins)))]
    out.append(table(["alpha", "induce refusal rate", "suppress refusal rate", "induce refusal score",
                      "suppress refusal score", "n harmless", "n harmful", "induce 95% CI (Wilson)",
                      "suppress 95% CI (Wilson)"],
                     [[r["alpha"], r["induce_refusal_rate"], r["suppress_refusal_rate"], r["induce_refusal_score"],
                       r["suppress_refusal_score"], r["induce_n"], r["suppress_n"],
                       rate_ci(r["induce_refusal_rate_ci95"]), rate_ci(r["suppress_refusal_rate_ci95"])] for r in rows]
                     + [["ablation", None, abl["refusal_rate"], None, abl["refusal_score"], None, abl["n"], None,
                         rate_ci(abl["refusal_rate_ci95"])]]))
    if ins["samples"]:
        out.append(details(f"Sample completions on val ({len(ins['samples'])})", table(
            ["setting", "alpha", "instruction", "completion", "refused"],
            [[s["setting"], s["alpha"], s["instruction"], s["completion"], s["refused"]] for s in ins["samples"]],
            cls="gen")))
    return "\n".join(out)


def steering_object(name: str, o: ObjectSweep, plots: Plots) -> str:
    """One vector's object-prompt sweep: words, figures, the per-alpha table and sample completions."""
    rows = sorted(o["rows"], key=lambda x: x["alpha"])
    judged = all("harmless_refusal_fraction" in r for r in rows)

    def side(r: ObjectRow, s: str) -> list[str]:
        cells = [f"{fmt(r[f'{s}_normalised'])} ± {fmt(r[f'{s}_normalised_se'])}",
                 f"{fmt(r[f'{s}_metric'])} ± {fmt(r[f'{s}_metric_se'])}"]
        if judged:
            cells.append(f"{fmt(r[f'{s}_refusal_fraction'])} {rate_ci(r[f'{s}_refusal_fraction_ci95']) or ''}")
        return cells

    head = ["alpha"] + [f"{s} {what}" for s in ("harmless", "harmful") for what in
                        ("normalised ± SE", "metric ± SE") + (("refusal fraction, 95% CI (Wilson)",) if judged else ())]
    cells = [[r["alpha"], *side(r, "harmless"), *side(r, "harmful"), r["harmless_n"]] for r in rows]
    out = [f"<h4>{esc(name)} vector</h4><p>{esc(o['description'])}; layer {esc(o['layer'])}, norm "
           f"{esc(fmt(o['norm']))}.</p>", row(*(plots.add(c) for c in specs.object_charts(name, o))),
           table(head + ["n per side"], cells)]
    if o["samples"]:
        out.append(details(f"Sample completions, {name} vector ({len(o['samples'])})", table(
            ["side", "alpha", "object", "completion", "refused"],
            [[s["side"], s["alpha"], s["object"], s["completion"], s["refused"]] for s in o["samples"]], cls="gen")))
    return "\n".join(out)


def steering_evaluation(ev: Evaluation, plots: Plots) -> str:
    """Held-out refusal rates (table and grouped bars), the damage (KL, CE) and sample generations."""
    out = ['<h3 id="steering-evaluation">Held-out evaluation</h3>',
           f"<p>split {esc(ev['split'])}; judge {esc(ev['judge'])}; max new tokens {ev['max_new_tokens']}; layer "
           f"{ev['layer']}; alpha {ev['alpha']:g}. Layer and alpha were chosen on train/val; these prompts were "
           "never used for a choice.</p>"]
    rates = [(k, ev[k]) for k in EVALUATION_RATES]
    with_ci = any(interval(v["ci95"]) or interval(v["baseline_ci95"]) for _, v in rates)
    out.append(table(["measure", "value", "baseline", "change", "n", "refusal score", "baseline refusal score",
                      "intervention"] + (["95% CI (Wilson)", "baseline 95% CI (Wilson)"] if with_ci else []),
                     [[k, v["value"], v["baseline"],
                       None if v["value"] is None or v["baseline"] is None else v["value"] - v["baseline"], v["n"],
                       v["refusal_score"], v["baseline_refusal_score"], v["intervention"]]
                      + ([rate_ci(v["ci95"], v["k"], v["n"]), rate_ci(v["baseline_ci95"], v["baseline_k"], v["n"])]
                         if with_ci else []) for k, v in rates]))
    out.append(plots.add(specs.evaluation_chart(ev)))
    dmg = ev["damage"]
    out.append("<h4>Damage on harmless prompts</h4>" + table(
        ["edit", "KL(base ‖ edited)", "CE baseline", "CE edited", "Δ CE", "tokens", "prompts"],
        [[k, v["kl_harmless"], v["ce_baseline"], v["ce_edited"],
          None if v["ce_edited"] is None or v["ce_baseline"] is None else v["ce_edited"] - v["ce_baseline"],
          v["n_tokens"], v["n"]] for k, v in dmg.items()]))
    if ev["samples"]:
        out.append(f"<h4>Sample generations ({len(ev['samples'])})</h4>" + table(
            ["setting", "instruction", "completion", "refused"],
            [[s["setting"], s["instruction"], s["completion"], s["refused"]] for s in ev["samples"]], cls="gen"))
    if ev["substrings"] is not None:
        out.append(details("Refusal substrings of the judge", esc(", ".join(map(repr, ev["substrings"])))))
    return "\n".join(out)


def section_steering(r: Results, plots: Plots) -> str:
    """Direction, steering sweeps and held-out evaluation (each only when the run has it)."""
    if not any(k in r for k in ("direction", "steering", "evaluation")):
        return ""
    out = ['<h2 id="steering">Steering, direction and evaluation</h2>']
    if "direction" in r:
        out.append(steering_direction(r["direction"], plots))
    if "steering" in r:
        st = r["steering"]
        out.append(steering_sweep(st["instructions"], plots))
        if st["objects"]:
            out.append('<h3 id="steering-objects">Object-prompt sweeps</h3>'
                       '<p class="muted">The replication\'s vectors on its own object prompts: added to harmless '
                       f"objects (+alpha) and subtracted from harmful ones (−alpha). Normalised metric: "
                       f"{esc(METRIC_TITLE)}.</p>")
            out += [steering_object(name, o, plots) for name, o in st["objects"].items()]
    if "evaluation" in r:
        out.append(steering_evaluation(r["evaluation"], plots))
    return "\n".join(out)

