"""Tidy tables of a run (``tables/*.csv``), one row per observation: the baseline per object, every
patching grid per pair and cell, the refusal heads, and the per-cell summary of every published
grid (mean, SE, bootstrap interval, n pairs)."""

from __future__ import annotations

import pandas as pd
import torch

from refusal_lab.artifacts import write_csv
from refusal_lab.run.inputs import SIDES
from refusal_lab.run.step import RunContext
from refusal_lab.run.steps.patch import step_name


def patching_summary(patching: dict) -> pd.DataFrame:
    """``tables/patching_summary.csv``: one row per grid cell with mean, SE, bootstrap interval and pair count."""
    entries = [(g, "sufficiency", e) for g, e in patching.items() if isinstance(e, dict) and "values" in e]
    entries += [(g, "necessity", e) for g, e in (patching.get("necessity") or {}).items()]
    entries += [(g, "sufficiency", e) for g, e in (patching.get("attribution") or {}).items()]
    recs = []
    for g, direction, e in entries:
        vals = torch.as_tensor(e["values"], dtype=torch.float64)
        se = torch.as_tensor(e["se"], dtype=torch.float64)
        lo = torch.as_tensor(e["ci95"]["low"], dtype=torch.float64)
        hi = torch.as_tensor(e["ci95"]["high"], dtype=torch.float64)
        for a, layer in enumerate(e["rows"]):
            for b, col in enumerate(e["cols"]):
                recs.append({"grid": g, "direction": direction, "method": e["method"], "layer": layer, "col": col,
                             "mean": float(vals[a, b]), "se": float(se[a, b]), "ci_low": float(lo[a, b]),
                             "ci_high": float(hi[a, b]), "n_pairs": e["n_pairs"]})
    return pd.DataFrame(recs, columns=["grid", "direction", "method", "layer", "col", "mean", "se", "ci_low",
                                       "ci_high", "n_pairs"])


def write_tables(ctx: RunContext, patching: dict) -> None:
    """Every table of the run into ``<folder>/tables``."""
    t = ctx.folder.root / "tables"
    base, prompts = ctx.records["baseline"], ctx.inputs.prompts
    rows = [{"side": side, "object": o, "logit_diff": s, "log_odds": base[side]["log_odds"][o], "top_token": tt}
            for side in SIDES
            for (o, s), tt in zip(base[side]["scores"].items(), base[side]["top_token"])]
    write_csv(t / "baseline.csv", pd.DataFrame(rows))
    labels = ctx.inputs.col_labels()
    for direction in ctx.cfg.directions:  # the patch steps of the config, by their one naming rule
        for grid in ctx.cfg.grids:
            data = ctx.records[step_name(grid, direction)]
            per = torch.as_tensor(data["per_pair"])
            recs = []
            for i in range(per.shape[0]):
                for a in range(per.shape[1]):
                    for b in range(per.shape[2]):
                        col = data["heads"][b] if grid == "heads" else labels[b]
                        recs.append({"grid": grid, "direction": direction, "method": "exact", "pair": i,
                                     "harmful_object": prompts.harmful_objects[i],
                                     "harmless_object": prompts.harmless_objects[i],
                                     "layer": data["layers"][a], "col": col, "metric": float(per[i, a, b])})
            write_csv(t / f"patching_{grid}_{direction}.csv", pd.DataFrame(recs))
    heads = ctx.records.get("heads")
    if heads and heads.get("ranked"):
        write_csv(t / "heads.csv", pd.DataFrame(heads["selected"] or heads["ranked"]))
    write_csv(t / "patching_summary.csv", patching_summary(patching))
    if "geometry" in ctx.records:
        for name, frame in geometry_tables(ctx.records["geometry"]).items():
            write_csv(t / f"{name}.csv", frame)


def geometry_tables(g: dict) -> dict[str, pd.DataFrame]:
    """The geometry step's tables: ``geometry_separation`` (one row per instruction x layer: its
    projection on r̂), ``geometry_subspace`` (one row per ablation: unedited, r̂, k = 1..K) and, when
    heads were selected, ``geometry_heads`` (one row per pair: the readout clean, heads-patched and
    residual-patched), ``geometry_head_writes`` (one row per head x column), ``geometry_head_reads``
(one row per side x pair x head x query x key column: the attention) and ``geometry_head_paths``
(one row per pair: each path split's total and direct effect, the downstream-ablated effect)."""
    s = g["separation"]
    proj = s.get("_projections") or {}
    out = {"geometry_separation": pd.DataFrame(
        [{"split": s["split"], "side": side, "prompt": i, "layer": l, "column": s["column"], "projection": v}
         for side, rows in proj.items() for i, row in enumerate(rows) for l, v in zip(s["layers"], row)],
        columns=["split", "side", "prompt", "layer", "column", "projection"])}
    sub = g["subspace"]
    rows = [{"ablation": key, "k": None, "mean": sub[key]["mean"], "se": sub[key]["se"], "n": sub[key]["n"],
             "cos_direction": None, "explained": None} for key in ("baseline", "direction")]
    rows += [{"ablation": f"top-{r['k']} subspace", "k": r["k"], "mean": r["mean"], "se": r["se"], "n": r["n"],
              "cos_direction": r["cos_direction"], "explained": sub["explained"][r["k"] - 1]} for r in sub["rows"]]
    out["geometry_subspace"] = pd.DataFrame(rows)
    h = g.get("heads")
    if h:
        per = h.get("_per_pair") or {}
        out["geometry_heads"] = pd.DataFrame([{"pair": i, **{k: v[i] for k, v in per.items()}}
                                              for i in range(h["n_pairs"])] if per else [])
        out["geometry_head_writes"] = pd.DataFrame(
            [{k: v for k, v in w.items() if k != "difference_ci95"} | {"ci_low": (w["difference_ci95"] or [None])[0],
                                                                       "ci_high": (w["difference_ci95"] or [None, None])[1]}
             for w in h["writes"]])
        rd = h.get("reads")
        if rd:
            per = rd.get("_per_prompt") or {}
            out["geometry_head_reads"] = pd.DataFrame(
                [{"side": side, "pair": i, "layer": hd["layer"], "head": hd["head"], "query": rd["query_roles"][j],
                  "query_column": row["index"], "key": rd["key_labels"][k], "key_column": rd["keys"][k],
                  "attention": per[side][i][a][j][k]}
                 for side in per for i in range(rd["n_pairs"]) for a, hd in enumerate(rd["heads"])
                 for j, row in enumerate(rd["rows"]) for k in range(len(rd["keys"]))],
                columns=["side", "pair", "layer", "head", "query", "query_column", "key", "key_column", "attention"])
        if h.get("paths") or h.get("downstream"):
            pp = (h.get("paths") or {}).get("_per_pair") or {}
            dp = (h.get("downstream") or {}).get("_per_pair") or {}
            cols = {f"{k}_{v}": x for k, d in pp.items() for v, x in d.items()}
            cols |= {f"downstream_{v}": x for v, x in dp.items()}
            out["geometry_head_paths"] = pd.DataFrame([{"pair": i, **{k: v[i] for k, v in cols.items()}}
                                                       for i in range(h["n_pairs"])] if cols else [])
    return out
