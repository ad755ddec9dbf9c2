"""The findings: the run's headline observations in words, each with its numbers, n and interval,
written from results.json alone (so a report can be rebuilt from it). The sanity gate speaks
first: a model that does not separate harmful from harmless prompts is told so before anything."""

from __future__ import annotations

import torch

from refusal_lab.report.common import fmt_ci


def findings(r: dict) -> list[str]:
    """Every finding of a run: the replication's, then the steering's."""
    return replication_findings(r) + steering_findings(r)


def replication_findings(r: dict) -> list[str]:
    """The replication's headline observations (sanity first), in words with their numbers."""
    out = []
    san = r.get("sanity") or {}
    if san:
        out.append(san["sentence"])  # the sanity gate speaks first: passed, or the warning
        if san.get("token_note"):
            out.append(san["token_note"])
    b = r["baseline"]
    out.append(f"Harmful prompts score {b['harmful_mean']:.2f} and harmless prompts {b['harmless_mean']:.2f} on "
               f"logit[{r['tokens']['refusal']['str']}] - logit[{r['tokens']['compliance']['str']}] "
               f"(gap {b['harmful_mean'] - b['harmless_mean']:.2f}).")
    p = r["patching"]
    labels = [f"{x['label']}" for x in r["positions"]]
    if "resid_pre" in p:
        v = torch.as_tensor(p["resid_pre"]["values"])
        pm = ""
        if "se" in p["resid_pre"]:
            se = torch.as_tensor(p["resid_pre"]["se"], dtype=torch.float64)
            pm = f" (± {float(se[-1, -1]):.2f} SE, n = {p['resid_pre']['n_pairs']} pairs)"
        out.append(f"Patching resid_pre at the last position recovers {v[-1, -1]:.2f}{pm} at the last layer and "
                   f"{v[:, -1].max():.2f} at most.")
        for lab in ("post_obj", "eoi"):
            idx = [i for i, x in enumerate(labels) if x == lab and i != len(labels) - 1]
            if idx:
                best = v[:, idx].max(1).values
                if best.max() > 0.05:
                    band = [l for l in range(len(best)) if best[l] >= 0.5 * best.max()]
                    out.append(f"At the {lab} position(s) resid_pre patching carries the signal in layers "
                               f"{band[0]}-{band[-1]} (at least half its maximum {best.max():.2f}, reached at layer {int(best.argmax())}).")
    for g in ("attn_out_cumulative", "mlp_out_cumulative", "attn_out", "mlp_out"):
        if g in p:
            v = torch.as_tensor(p[g]["values"])
            i = int(v.argmax())
            l, c = divmod(i, v.shape[1])
            out.append(f"{g} reaches {v.max():.3f} at layer {l}, position {p[g]['cols'][c]}.")
    if "heads" in r:
        h = r["heads"]
        suff = "n/a" if h["sufficiency"] is None else f"{h['sufficiency']:.3f}"
        ci = h.get("sufficiency_ci95")
        if h["sufficiency"] is not None and ci:
            se = h.get("sufficiency_se")
            suff += (f" (± {se:.3f} SE, " if se is not None and se == se else " (") + \
                f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}], n = {h.get('n_pairs')} pairs)"
        out.append(f"{len(h['selected'])} heads pass the {h['threshold']} threshold at {h['position']}; patched together "
                   f"they recover {suff} of the refusal metric.")
    for g, a in p.get("agreement", {}).items():
        line = (f"Attribution patching ({a.get('variant', 'AtP')}) vs exact on {g}: Spearman {a['spearman']:.2f}, "
                f"top-{a['top_k']} overlap {a['top_k_overlap']:.2f}")
        if "plain" in a:
            line += f" (plain AtP: Spearman {a['plain']['spearman']:.2f}, top-{a['plain']['top_k']} overlap {a['plain']['top_k_overlap']:.2f})"
        out.append(line + ".")
    return out


def steering_findings(r: dict) -> list[str]:
    """Headline steering numbers in words (direction, sweeps, held-out refusal rates)."""
    out = []
    d, st, ev = r.get("direction"), r.get("steering"), r.get("evaluation")
    if d:
        tok = f" ({d['position_token']!r})" if d.get("position_token") else ""
        out.append(f"Selected refusal direction: layer {d['layer']}, eoi column {d['position']}{tok}; on val, ablating it "
                   f"moves harmful refusal log-odds {d['baseline']['harmful_val_log_odds']:.2f} -> {d['bypass']:.2f}, adding it "
                   f"moves harmless {d['baseline']['harmless_val_log_odds']:.2f} -> {d['induce']:.2f} (KL {d['kl']:.3f})"
                   + (" [fallback: every candidate was filtered out]" if d.get("fallback") else "") + ".")
    if ev:
        a, b, c = (ev["harmless_refusal_rate_added"], ev["harmful_refusal_rate_ablated"],
                   ev["harmful_refusal_rate_subtracted"])

        def ci(x: dict, key: str = "ci95") -> str:  # " [0.41, 0.63]": the Wilson interval, when recorded
            c = fmt_ci(x.get(key))
            return f" {c}" if c else ""

        wilson = any(ci(x) or ci(x, "baseline_ci95") for x in (a, b, c))
        out.append(f"Held-out test prompts: harmless refusal rate {a['baseline']:.2f}{ci(a, 'baseline_ci95')} -> "
                   f"{a['value']:.2f}{ci(a)} with the direction added (alpha {ev['alpha']:g}, n={a['n']}); harmful "
                   f"refusal rate {b['baseline']:.2f}{ci(b, 'baseline_ci95')} -> {b['value']:.2f}{ci(b)} with it ablated "
                   f"(n={b['n']}) and {c['value']:.2f}{ci(c)} with it subtracted (n={c['n']})"
                   + (" [Wilson 95% intervals]" if wilson else "") + ".")
    for name, o in ((st or {}).get("objects") or {}).items():
        rows = o.get("rows") or []
        if rows:
            top = max(rows, key=lambda x: x["harmless_normalised"])
            low = min(rows, key=lambda x: x["harmful_normalised"])
            out.append(f"Object prompts, {name} vector: adding it to harmless objects reaches normalised metric "
                       f"{top['harmless_normalised']:.2f} at alpha {top['alpha']:g}; subtracting it from harmful objects "
                       f"goes down to {low['harmful_normalised']:.2f} (1 = harmful baseline, 0 = harmless).")
    return out


def _n(x, digits: int = 2) -> str:
    """A number for a sentence; ``n/a`` where it is missing (null / NaN)."""
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def _pm(m: dict) -> str:
    """``1.23 ± 0.45 SE`` of a ``{mean, se}`` entry."""
    return f"{_n(m['mean'])} ± {_n(m['se'])} SE"


def geometry_findings(g: dict) -> list[str]:
    """The geometry step's observations in words with their numbers, n and spread (``g``: its section)."""
    out = []
    s, c, sub, h = g["separation"], g["cosines"], g["subspace"], g.get("heads")
    layer = g["direction"]["layer"]
    gaps = [x if x is not None and x == x else float("-inf") for x in s["gap"]]
    best = max(range(len(gaps)), key=gaps.__getitem__)
    ci = fmt_ci(s["gap_ci95"][layer])
    out.append(f"Along the refusal direction ({s['split']} instructions, n = {s['n_harmful']} harmful / "
               f"{s['n_harmless']} harmless, {s['site']} at column {s['column']}), harmful and harmless prompts are "
               f"{_n(s['gap'][layer])} ± {_n(s['gap_se'][layer])} SE apart at the direction's layer {layer}"
               + (f" (95% CI {ci})" if ci else "") + f" (harmful {_n(s['harmful_mean'][layer])} ± "
               f"{_n(s['harmful_sd'][layer])} sd, harmless {_n(s['harmless_mean'][layer])} ± "
               f"{_n(s['harmless_sd'][layer])} sd); the gap is largest at layer {best} ({_n(s['gap'][best])} ± "
               f"{_n(s['gap_se'][best])} SE).")
    row = c["candidates"][layer]
    close = [l for l, v in enumerate(row) if v is not None and v == v and v >= 0.9]
    names = dict(zip(c["vectors"], range(len(c["vectors"]))))
    pairs = [f"{n} {_n(c['vector_matrix'][0][i])}" for n, i in names.items() if n != "direction"]
    out.append(f"The candidate directions of layers {_ranges(close)} have cosine >= 0.9 with the chosen one "
               f"(layer {layer}, column {c['column']})" + (f"; r̂'s cosine with {', '.join(pairs)}" if pairs else "")
               + ".")
    rows = sub["rows"]
    ks = ", ".join(f"k={x['k']} {_pm(x)}" for x in rows)
    expl = sub["explained"][0] if sub["explained"] else None
    out.append(f"k-dimensional check ({sub['split']} harmful instructions, n = {sub['direction']['n']}; mean refusal "
               f"log-odds): unedited {_pm(sub['baseline'])}, r̂ ablated {_pm(sub['direction'])}, top-k principal "
               f"subspace ablated {ks} (the first principal direction has cosine "
               f"{_n(rows[0]['cos_direction'] if rows else None)} with r̂ and {_n(expl)} of the second moment).")
    if h:
        rc = h["ratio_ci95"]
        top = max((w for w in h["writes"] if w["column"] == "last"),
                  key=lambda w: abs(w["difference"]) if w["difference"] is not None and w["difference"] == w["difference"]
                  else -1.0, default=None)
        line = (f"Heads -> direction (object prompts, n = {h['n_pairs']} pairs, {h['readout']}): patching the "
                f"{len(h['heads'])} refusal heads harmful -> harmless moves the projection by {_pm(h['heads_shift'])}; "
                f"patching the whole residual stream at the heads' column ({h['resid_patch_site']}) moves it by "
                f"{_pm(h['resid_shift'])}; ratio {_n(h['ratio'])}" + (f" (95% CI {fmt_ci(rc)})" if fmt_ci(rc) else "")
                + f", against a full harmful - harmless gap of {_pm(h['gap'])}.")
        if top is not None:
            line += (f" The largest write along r̂ at the last position is head {top['layer']}.{top['head']}'s: "
                     f"harmful {_n(top['harmful_mean'])}, harmless {_n(top['harmless_mean'])}, difference "
                     f"{_n(top['difference'])} ± {_n(top['difference_se'])} SE.")
        out.append(line)
        out += head_reads_findings(h)
    elif g.get("heads_note"):
        out.append(f"Heads -> direction: not measured ({g['heads_note']}).")
    return out


def _ci(x) -> str:
    c = fmt_ci(x)
    return f" (95% CI {c})" if c else ""


def head_reads_findings(h: dict) -> list[str]:
    """What the refusal heads read, their path split and r̂ ablated downstream of them, in words
    (``h``: the geometry section's ``heads``; each part only when the run measured it)."""
    out = []
    n = len(h["heads"])
    rd = h.get("reads")
    if rd:
        roles = rd["key_roles"]
        obj = roles.index("obj") if "obj" in roles else 0
        parts = []
        for q, row in zip(rd["query_roles"], rd["rows"]):
            a, b = row["set_harmful"][obj], row["set_harmless"][obj]
            diffs = [abs(c["mean"]) if c["mean"] is not None and c["mean"] == c["mean"] else -1.0
                     for c in row["set_difference"]]
            k = max(range(len(diffs)), key=diffs.__getitem__)
            d = row["set_difference"][k]
            parts.append(f"from {q} (column {row['index']}) {_n(a['mean'])} ± {_n(a['se'])} SE to the object token "
                         f"on harmful prompts vs {_n(b['mean'])} ± {_n(b['se'])} SE on harmless ones, the largest "
                         f"harmful - harmless difference being {_n(d['mean'])} ± {_n(d['se'])} SE at "
                         f"{rd['key_labels'][k]}")
        out.append(f"What the {n} refusal heads read (attention averaged over the heads, n = {rd['n_pairs']} pairs of "
                   f"object prompts): " + "; ".join(parts) + ".")
    p = h.get("paths")
    if p:
        lines = []
        for key, what in (("heads", "at the heads' column(s)"), ("last", "at the last column")):
            x = p.get(key)
            if x:
                lines.append(f"patched {what} {x['cols']} the heads move the metric by {_pm(x['total'])} in total, "
                             f"{_pm(x['direct'])} of it directly to the logits (direct / total "
                             f"{_n(x['direct_fraction'])}{_ci(x['direct_fraction_ci95'])})")
        out.append(f"Path split ({p['metric']}, n = {p['heads']['n_pairs']} pairs; direct = the heads' outputs straight "
                   "to the logits, downstream frozen): " + "; ".join(lines) + ".")
    d = h.get("downstream")
    if d and not d["n_sites"]:
        out.append(f"r̂ ablated downstream of the refusal heads: not measured ({d['sites']}).")
    elif d:
        out.append(f"Ablating r̂ from every residual write after layer {d['after_layer']} ({d['n_sites']} sites) "
                   f"removes {_n(d['fraction_removed'])}{_ci(d['fraction_removed_ci95'])} of the refusal heads' "
                   f"sufficiency (n = {d['n_pairs']} pairs): {_n(d['sufficiency'])} -> {_n(d['sufficiency_ablated'])} "
                   f"of the harmful - harmless gap (patch effect {_pm(d['effect'])} -> {_pm(d['effect_ablated'])}).")
        x = d.get("residual")
        if x and x["n_sites"]:
            out.append(f"Ablating r̂ also from the residual entering layer {d['after_layer'] + 1} (what the heads and "
                       f"every earlier layer wrote along it; {x['n_sites']} sites) removes "
                       f"{_n(x['fraction_removed'])}{_ci(x['fraction_removed_ci95'])} of their sufficiency: "
                       f"{_n(d['sufficiency'])} -> {_n(x['sufficiency_ablated'])} of the gap (patch effect "
                       f"{_pm(d['effect'])} -> {_pm(x['effect_ablated'])}).")
    return out


def _ranges(xs: list[int]) -> str:
    """``3-5, 8`` for [3, 4, 5, 8]; ``none`` for []."""
    if not xs:
        return "none"
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)
