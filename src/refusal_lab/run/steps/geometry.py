"""``geometry``: what the refusal direction is, beyond its steering effect — its separation of
harmful from harmless test instructions at every layer, its cosines with the other layers'
candidates and with the replication's two vectors, whether a k-dimensional subspace ablates more
refusal than the one direction, how much of it the refusal heads move and write, what those heads
attend to, how their patch reaches the metric (directly vs through later layers) and how much of it
needs later layers to write along r̂ (computations in :mod:`refusal_lab.steering.geometry`; this
module wires them to the run).

Cost: what the step would recompute it reuses — the train prompts' residuals at the direction's
site and the harmful val prompts' unedited and r̂-ablated log-odds come from the direction step
(``vectors/direction_train_{side}``, the record's per-prompt scores), the test prompts' residuals
at every layer from the evaluation step's unedited prefills (``vectors/evaluation_test_resid_{side}``),
and every head computation shares two clean forwards of the object prompts. It runs: the test
prompts only where those are missing (every layer, the chat template's common beginning once), the
harmful val prompts K times (the k-dimensional
ablations), and on the object prompts the two clean forwards plus cone runs — a patched forward
starts at the first head layer from the clean residual cached there, an ablation at the layer
after the heads, and the heads -> direction patches stop at the direction's layer.
"""

from __future__ import annotations

import torch

from refusal_lab.metrics import default_refusal_token_ids
from refusal_lab.models.shared_prefix import SharedPrefix
from refusal_lab.prompts import build_instruction_prompts
from refusal_lab.run.folder import public
from refusal_lab.run.step import RunContext, Step
from refusal_lab.run.steps.direction import enabled
from refusal_lab.run.steps.evaluation import TEST_RESID
from refusal_lab.steering import geometry as geo
from refusal_lab.steering.batching import instruction_sample, n_batches, progress_bar
from refusal_lab.steering.interventions import unit

K = 5
"""The largest subspace dimension ablated (k = 1..K)."""
BATCH = 32
"""Prompts per forward."""
VECTOR_NAMES = {"direction": "refusal direction r (instructions, difference in means)",
                "objects_difference": "object-prompt difference vector (steering step)",
                "objects_heads": "refusal heads' summed-output vector (steering step)",
                "principal_1": "first principal direction of the differences (subspace check)"}
"""The vectors whose pairwise cosines are reported, and what each is."""


def compute(ctx: RunContext) -> dict:
    model, cfg, d = ctx.model, ctx.cfg, ctx.records["direction"]
    layer, position = d["layer"], d["position"]
    r = ctx.folder.load_vector("direction").to(torch.float64)
    cands = ctx.folder.load_vector("direction_candidates").to(torch.float64)  # [L, P, d]
    L = model.cfg.n_layers
    tok = model.tokenizer
    test = instruction_sample("test", cfg.steering_n_test, cfg.seed)
    train = instruction_sample("train", cfg.steering_n_train, cfg.seed)
    val = instruction_sample("val", cfg.steering_n_val, cfg.seed)
    enc = {(split, side): build_instruction_prompts(tok, v[side]) for split, v in
           (("test", test), ("train", train), ("val", val)) for side in ("harmful", "harmless")}
    heads = ctx.records.get("heads") or {}
    selected = [(x["layer"], x["head"]) for x in heads.get("selected") or []]
    total = (sum(n_batches(len(test[s]), BATCH) + n_batches(len(train[s]), BATCH) for s in ("harmful", "harmless"))
             + K + 2 + (2 if selected else 0))
    bar = progress_bar(total, "geometry: separation", ctx.progress)
    try:
        # 1. separation of the test prompts along r̂ at every layer (the direction's column)
        acts = {}
        same_direction = (ctx.records.get("evaluation") or {}).get("layer") == layer
        for side in ("harmful", "harmless"):  # the evaluation step's unedited prefills recorded them
            name = TEST_RESID.format(side=side)
            kept = ctx.folder.load_vector(name) if same_direction and ctx.folder.has_vector(name) else None
            if kept is not None and tuple(kept.shape[:2]) == (len(test[side]), L):
                acts[side] = kept.to(torch.float64)
            else:
                acts[side] = resid_at(model, enc["test", side], range(L), position)
            bar.update(n_batches(len(test[side]), BATCH))
        curve = geo.separation_curve(acts["harmful"], acts["harmless"], r, seed=cfg.seed)
        proj = curve.pop("projections")
        separation = {"split": "test", "site": "hook_resid_pre", "column": position, "layers": list(range(L)),
                      **curve, "_projections": {k: v.tolist() for k, v in proj.items()}}

        # 2. cosines: the candidates at the direction's column, and the run's vectors
        j = list(d["positions"]).index(position)
        col_cands = cands[:, j]
        vectors = {"direction": r}
        for name in (ctx.records.get("steering") or {}).get("objects") or {}:
            vectors[f"objects_{name}"] = ctx.folder.load_vector(f"objects_{name}").to(torch.float64)

        # 3. the k-dimensional check: principal directions of the train differences, ablated on val
        bar.set_description("geometry: subspace")
        train_acts = {}
        for side in ("harmful", "harmless"):  # the direction step's rows where it kept them
            name = f"direction_train_{side}"
            if ctx.folder.has_vector(name) and d["n_train"][side] == len(train[side]):
                train_acts[side] = ctx.folder.load_vector(name).to(torch.float64)
            else:
                train_acts[side] = resid_at(model, enc["train", side], [layer], position)[:, 0]
            bar.update(n_batches(len(train[side]), BATCH))
        basis, explained = geo.difference_basis(train_acts["harmful"], train_acts["harmless"], K)
        ctx.folder.save_vector("geometry_basis", basis, {"model": model.cfg.model_name, "layer": layer,
                                                         "position": position, "site": "hook_resid_pre",
                                                         "kind": "orthonormal basis [k, d]",
                                                         "definition": geo.BASIS_DEFINITION})
        vectors["principal_1"] = basis[0]
        refusal_ids = default_refusal_token_ids(tok)
        known = {}  # the direction step's harmful val log-odds (unedited, r̂ ablated) on the same prompts
        if d["n_val"]["harmful"] == len(val["harmful"]):
            scored = d.get("_val_log_odds") or {}
            known = {key: torch.tensor(scored[f"harmful_{name}"], dtype=torch.float64)
                     for key, name in (("baseline", "baseline"), ("direction", "ablated")) if f"harmful_{name}" in scored}
        byp = geo.subspace_bypass(model, *enc["val", "harmful"], basis, r, refusal_ids, batch_size=16, bar=bar,
                                  known=known)
        subspace = {"definition": geo.BASIS_DEFINITION.replace("{layer}", str(layer)), "layer": layer,
                    "column": position, "basis_split": "train", "n_basis": {s: len(train[s]) for s in train},
                    "split": "val", "explained": explained.tolist(), "baseline": byp["baseline"],
                    "direction": byp["direction"], "rows": byp["rows"],
                    "note": "mean refusal log-odds of the harmful val prompts with the span of the first k principal "
                            "directions projected out of every residual write (lower = more refusal removed), beside "
                            "the unedited prompts and the one-direction ablation of r̂"}

        # 4. heads -> direction (object prompts, the heads' patch harmful -> harmless)
        heads_out = None
        if selected:
            bar.set_description("geometry: heads")
            b = ctx.inputs.batches
            pairs = (b["harmful"].ids, b["harmful"].mask), (b["harmless"].ids, b["harmless"].mask)
            inputs = ctx.inputs
            T = inputs.prompts.seq_len
            hcol = heads["cols"][0] + T if heads["cols"][0] < 0 else heads["cols"][0]
            lp = geo.resid_patch_layer(selected, hcol, T - 1, layer)
            hc = geo.head_caches(model, *pairs, selected, (inputs.tokens.refusal_id, inputs.tokens.compliance_id),
                                 resid_layers=[layer, lp])  # the clean forwards every head computation shares
            res = geo.heads_to_direction(model, *pairs, selected, heads["cols"][0], r, layer, seed=cfg.seed, hc=hc)
            per = res.pop("per_pair")
            heads_out = {**res, "position": heads.get("position"), "_per_pair": {k: v.tolist() for k, v in per.items()}}
            bar.update(1)
            heads_out.update(heads_reads_paths(ctx, hc, selected, heads["cols"], r))
            bar.update(1)
    finally:
        bar.close()
    names = list(vectors)
    return {
        "direction": {"layer": layer, "position": position, "norm": float(r.norm())},
        "separation": separation,
        "cosines": {"column": position, "layers": list(range(L)),
                    "candidates": geo.cosine_matrix(col_cands).tolist(),
                    "candidate_norms": col_cands.norm(dim=-1).tolist(),
                    "direction_vs_candidates": geo.cosine_matrix(torch.cat([unit(r)[None], col_cands]))[0, 1:].tolist(),
                    "vectors": names, "vector_descriptions": [VECTOR_NAMES[n] for n in names],
                    "vector_matrix": geo.cosine_matrix(torch.stack([vectors[n] for n in names])).tolist()},
        "subspace": subspace,
        "heads": heads_out,
        "heads_note": None if selected else ("no refusal heads were selected" if heads else "the heads step did not run"),
    }


def resid_at(model, prompts: tuple[torch.Tensor, torch.Tensor], layers, position: int) -> torch.Tensor:
    """Each prompt's ``blocks.{l}.hook_resid_pre`` at ``position`` for every layer of ``layers``:
    float64 ``[n, len(layers), d]``. A column counted from the end (every eoi column) runs the chat
    template's common beginning once (:meth:`SharedPrefix.row_resid`); any other the whole prompts."""
    layers = list(layers)
    if position < 0:
        return SharedPrefix.split(*prompts, BATCH, model.device).row_resid(model, layers, [position])[:, :, 0]
    return geo.column_activations(model, *prompts, [f"blocks.{l}.hook_resid_pre" for l in layers], position, BATCH)


def heads_reads_paths(ctx: RunContext, hc: geo.HeadCaches, selected: list[tuple[int, int]], cols: list[int],
                      r: torch.Tensor) -> dict:
    """What the refusal heads read (from the patched column(s) and the last one to every labelled
    column from the object on), their patch's path split (at the heads' columns, as the ``heads``
    step patches, and at the last column, where the direct path exists) and r̂ ablated downstream of
    them, on the object prompts (pair i: harmful i, harmless i)."""
    model, inputs, seed = ctx.model, ctx.inputs, ctx.cfg.seed
    pos = inputs.prompts.positions
    last = inputs.prompts.seq_len - 1
    queries = sorted(set(cols) | {last})
    reads = geo.head_reads(model, hc, selected, queries, inputs.cols, seed=seed)
    per = reads.pop("per_prompt")
    reads.update(key_labels=inputs.col_labels(), key_roles=[pos[c].label for c in inputs.cols],
                 query_roles=["last" if q == last else pos[q].label for q in queries],
                 site="blocks.{layer}.attn.hook_pattern [b, head, q, k]", heads_cols=list(cols),
                 _per_prompt={k: v.tolist() for k, v in per.items()})
    paths, path_pairs = {}, {}
    for name, where in (("heads", cols), ("last", [last])):
        if name == "last" and last in cols:
            continue
        p = geo.head_path_split(model, hc, selected, where, seed=seed)
        path_pairs[name] = {k: v.tolist() for k, v in p.pop("per_pair").items()}
        paths[name] = p
    down = geo.downstream_ablation(model, hc, selected, cols, r, seed=seed)
    down_pairs = {k: v.tolist() for k, v in down.pop("per_pair").items()}
    return {"reads": reads, "paths": {**paths, "metric": f"logit[{inputs.tokens.refusal_str}] - "
                                                          f"logit[{inputs.tokens.compliance_str}], last column",
                                      "_per_pair": path_pairs},
            "downstream": {**down, "_per_pair": down_pairs}}


def strip(x):
    """``x`` without the private (``_``) keys at any depth: what results.json publishes."""
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if not k.startswith("_")}
    return x


def publish(ctx: RunContext) -> dict:
    from refusal_lab.run.findings import geometry_findings

    g = strip(public(ctx.records["geometry"]))
    g["findings"] = geometry_findings(g)
    return {"geometry": g}


STEP = Step("geometry", compute, publish, enabled)
