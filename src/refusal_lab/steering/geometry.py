"""The geometry of the refusal direction: how far it separates harmful from harmless activations at
every layer, how it lines up with its sibling candidates and with the replication's vectors, whether
one dimension is enough, and how much of it the refusal heads write.

All projections are in float64 on the unit direction ``r̂`` (:func:`~refusal_lab.steering.interventions.unit`).

* :func:`column_activations`: per-prompt activations at one column of chosen sites (float64).
* :func:`separation_curve`: ``resid_pre · r̂`` at every layer per side: mean, sd, n, and the
  harmful − harmless gap with its Welch SE and a two-sample bootstrap interval.
* :func:`cosine_matrix`: pairwise cosines of vectors (NaN for a zero vector).
* :func:`difference_basis`: the top-k principal directions of the harmful/harmless differences.
* :class:`ProjectOutSubspace` / :func:`subspace_ablation_hooks`: ablation of a k-dim orthonormal
  basis from every residual write (k = 1 is :func:`ablation_hooks` exactly).
* :func:`subspace_bypass`: refusal log-odds of harmful prompts under each subspace ablation.
* :func:`heads_to_direction`: the shift of ``resid_pre · r̂`` by the refusal heads' patch beside a
  patch of the whole residual at the heads' column, and each head's own write projected on ``r̂``.
* :func:`head_reads`: what the refusal heads attend to (``attn.hook_pattern``) from given query
  columns to the labelled key columns, harmful vs harmless.
* :func:`head_path_split`: the heads' patch's direct effect on the metric (straight to the logits,
  everything downstream frozen) beside its total effect.
* :func:`downstream_ablation`: how much of the heads' patch effect is left with ``r̂`` projected out
  of every residual write after the heads' last layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from refusal_lab.errors import SiteError
from refusal_lab.metrics import logit_diff, refusal_log_odds
from refusal_lab.models.edits import Patch, positional
from refusal_lab.models.hooked import HookPoint
from refusal_lab.models.shared_prefix import SharedPrefix
from refusal_lab.patching.heads import head_patch_hooks
from refusal_lab.stats import bootstrap_ci, mean_se, summary
from refusal_lab.steering.batching import tensor_batches
from refusal_lab.steering.interventions import ablation_hooks, unit

__all__ = ["HeadCaches", "ProjectOutSubspace", "column_activations", "cosine_matrix", "difference_basis",
           "downstream_ablation", "downstream_write_sites", "head_caches", "head_path_split", "head_reads", "heads_to_direction",
           "residual_write_sites", "separation_curve", "subspace_ablation_hooks", "subspace_bypass",
           "two_sample_gap"]

N_BOOT = 2000
"""Bootstrap resamples of every interval here."""
BASIS_DEFINITION = (
    "top right-singular vectors of the uncentred rows {harmful_i - mean(harmless)} and {mean(harmful) - "
    "harmless_j} of blocks.{layer}.hook_resid_pre at the direction's column on train instructions: their mean is "
    "the difference in means r, their second moment r r^T + (Cov_harmful + Cov_harmless) / 2, so the first "
    "direction is close to r̂ and the next ones are the largest within-class spreads")


class _Stop(Exception):
    """Raised by a hook to end a forward once every wanted site has been read."""


@torch.no_grad()
def column_activations(model, ids: torch.Tensor, mask: torch.Tensor | None, sites: Sequence[str], column: int,
                       batch_size: int = 32, fwd_hooks: Sequence = ()) -> torch.Tensor:
    """Each prompt's activation at ``column`` (negative: from the end) of every site: float64
    ``[n, len(sites), d]`` on the CPU. The forward stops after the last site it needs."""
    sites = list(sites)
    for s in sites:
        model.check_site(s)
    T = ids.shape[1]
    col = column + T if column < 0 else column
    if not 0 <= col < T:
        raise SiteError(f"Column {column} is outside the prompt columns 0..{T - 1}.")
    order = model.hook_names()
    last = max(sites, key=order.index)
    out = []
    for b_ids, b_mask in tensor_batches(ids, mask, batch_size, model.device):
        got: dict[str, torch.Tensor] = {}

        def make(name):
            def read(act, hook):
                got[name] = act[:, col].detach().to(torch.float64).cpu()
                if name == last:
                    raise _Stop
            return read

        try:
            model(b_ids, b_mask, fwd_hooks=[*fwd_hooks, *[(s, make(s)) for s in sites]], logits="last")
        except _Stop:
            pass
        out.append(torch.stack([got[s] for s in sites], 1))
    return torch.cat(out)


def two_sample_gap(a: torch.Tensor, b: torch.Tensor, seed: int = 0) -> dict:
    """mean(a) − mean(b) over axis 0 of two independent samples ``[n_a, ...]``, ``[n_b, ...]``: ``gap``,
    ``se`` (Welch: sqrt(sd_a²/n_a + sd_b²/n_b)) and ``ci95`` (percentile bootstrap, each side resampled
    on its own, seeded; the same resample for every cell), as float64 tensors of the trailing shape."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    na, nb = a.shape[0], b.shape[0]
    gap = a.mean(0) - b.mean(0)
    nan = torch.full_like(gap, float("nan"))
    se = (a.var(0) / na + b.var(0) / nb).sqrt() if na > 1 and nb > 1 else nan
    g = torch.Generator().manual_seed(seed)
    ia = torch.randint(0, na, (N_BOOT, na), generator=g)
    ib = torch.randint(0, nb, (N_BOOT, nb), generator=g)
    boot = a.reshape(na, -1)[ia].mean(1) - b.reshape(nb, -1)[ib].mean(1)  # [N_BOOT, cells]
    q = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    return {"gap": gap, "se": se, "ci95": (q[0].reshape(gap.shape), q[1].reshape(gap.shape))}


def _sd(x: torch.Tensor) -> torch.Tensor:
    return x.std(0, unbiased=True) if x.shape[0] > 1 else torch.full_like(x[0], float("nan"))


def separation_curve(harmful: torch.Tensor, harmless: torch.Tensor, direction: torch.Tensor, seed: int = 0) -> dict:
    """Projections on ``r̂`` of per-prompt activations ``[n, L, d]`` of each side (from
    :func:`column_activations` over every layer's ``hook_resid_pre``), per layer: ``harmful_mean``,
    ``harmful_sd``, ``harmless_mean``, ``harmless_sd`` (ddof 1), ``gap`` (harmful − harmless),
    ``gap_se`` (Welch), ``gap_ci95`` ([low, high] per layer, bootstrap), ``n_harmful``, ``n_harmless``;
    and the per-prompt projections ``[n, L]`` under ``projections`` (not JSON)."""
    r = unit(direction)
    ph, ps = harmful.to(torch.float64) @ r, harmless.to(torch.float64) @ r  # [n, L]
    g = two_sample_gap(ph, ps, seed)
    return {"harmful_mean": ph.mean(0).tolist(), "harmful_sd": _sd(ph).tolist(),
            "harmless_mean": ps.mean(0).tolist(), "harmless_sd": _sd(ps).tolist(),
            "gap": g["gap"].tolist(), "gap_se": g["se"].tolist(),
            "gap_ci95": [[float(lo), float(hi)] for lo, hi in zip(*g["ci95"])],
            "n_harmful": int(ph.shape[0]), "n_harmless": int(ps.shape[0]),
            "projections": {"harmful": ph, "harmless": ps}}


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of the rows of ``vectors`` ``[m, d]`` in float64 ``[m, m]``; rows
    and columns of a zero (or non-finite) vector are NaN."""
    v = torch.as_tensor(vectors, dtype=torch.float64)
    n = v.norm(dim=-1)
    ok = torch.isfinite(n) & (n > 0)
    u = torch.where(ok[:, None], v / torch.where(ok, n, 1.0)[:, None], torch.zeros_like(v))
    c = (u @ u.T).clamp(-1.0, 1.0)
    c[~ok, :] = float("nan")
    c[:, ~ok] = float("nan")
    return c


def difference_basis(harmful: torch.Tensor, harmless: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(basis [k, d], explained [k])``: the top-``k`` principal directions of the harmful/harmless
    differences (:data:`BASIS_DEFINITION`) of per-prompt activations ``[n_h, d]``, ``[n_s, d]``, in
    float64, orthonormal, each signed to point along the difference in means; ``explained`` is each
    direction's share of the rows' total second moment (squared singular values / their sum)."""
    h, s = torch.as_tensor(harmful, dtype=torch.float64), torch.as_tensor(harmless, dtype=torch.float64)
    rows = torch.cat([h - s.mean(0), h.mean(0) - s])
    _, sv, vh = torch.linalg.svd(rows, full_matrices=False)
    k = min(int(k), vh.shape[0])
    basis = vh[:k].clone()
    r = h.mean(0) - s.mean(0)
    sign = torch.where(basis @ r < 0, -1.0, 1.0).to(torch.float64)
    basis = basis * sign[:, None]
    energy = sv.square()
    return basis, (energy[:k] / energy.sum()).clone()


def residual_write_sites(model) -> list[str]:
    """Every write to the residual stream: ``hook_embed`` and each layer's ``hook_attn_out`` and
    ``hook_mlp_out`` (the sites :func:`ablation_hooks` edits)."""
    names = ["hook_embed"]
    for l in range(model.cfg.n_layers):
        names += [f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out"]
    return names


@dataclass
class ProjectOutSubspace:
    """Remove the span of an orthonormal ``basis`` ``[k, d]`` from every row and column: one
    :class:`~refusal_lab.models.edits.ProjectOut` step per basis vector, in float32 (modified
    Gram-Schmidt: for an orthonormal basis the steps compose to ``x − B^T B x``), so ``k = 1`` is
    the directional ablation's own arithmetic, bit for bit."""

    basis: torch.Tensor

    def __call__(self, act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        positional(hook)
        x = act.float()
        for b in self.basis:
            r = b.to(x.device, torch.float32)
            r = r / r.norm()
            x = x - (x @ r)[..., None] * r
        return x.to(act.dtype)


def subspace_ablation_hooks(model, basis: torch.Tensor) -> list[tuple[str, ProjectOutSubspace]]:
    """Ablation of the span of ``basis`` ``[k, d]`` (orthonormal rows, e.g. :func:`difference_basis`)
    from every residual write (:func:`residual_write_sites`)."""
    b = torch.as_tensor(basis).detach()
    if b.ndim != 2 or b.shape[1] != model.cfg.d_model or b.shape[0] == 0:
        raise SiteError(f"The basis must be [k >= 1, d_model = {model.cfg.d_model}], got {tuple(b.shape)}.")
    gram = b.to(torch.float64) @ b.to(torch.float64).T
    err = float((gram - torch.eye(b.shape[0], dtype=torch.float64)).abs().max())
    if not err <= 1e-4:  # also catches NaN: a zero or non-finite row would make every output NaN
        raise SiteError(f"The basis rows must be orthonormal (|B B^T - I| <= 1e-4), got {err:.3g}.")
    edit = ProjectOutSubspace(b.to(torch.float32))
    return [(n, edit) for n in residual_write_sites(model)]




def _mean_se_n(x: torch.Tensor) -> dict:
    x = torch.as_tensor(x, dtype=torch.float64)
    n = int(x.numel())
    se = float(x.std(unbiased=True) / n ** 0.5) if n > 1 else float("nan")
    return {"mean": float(x.mean()), "se": float(se), "n": n}


def subspace_bypass(model, ids: torch.Tensor, mask: torch.Tensor | None, basis: torch.Tensor,
                    direction: torch.Tensor, refusal_ids: Sequence[int], batch_size: int = 16,
                    bar=None, known: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Mean refusal log-odds (with SE and n) of the prompts ``(ids, mask)`` unedited (``baseline``),
    under directional ablation of ``direction`` (``direction``) and under ablation of the span of the
    first k rows of ``basis`` for every k (``rows``: ``k``, ``mean``, ``se``, ``n``, ``cos_direction``:
    cosine of the k-th basis vector with ``r̂``). ``bar`` advances by one per setting. Every setting
    edits every column alike, so the prompts' common beginning (the chat template's) runs once per
    setting (:class:`~refusal_lab.models.shared_prefix.SharedPrefix`; equal to the whole forward to
    rounding). ``known`` may hold the per-prompt log-odds [n] of ``baseline`` and ``direction``
    already computed on these prompts (the direction step's scoring): those settings are not rerun."""
    r = unit(direction)
    known = dict(known or {})
    settings = [("baseline", []), ("direction", ablation_hooks(model, direction))]
    settings += [(k, subspace_ablation_hooks(model, basis[:k])) for k in range(1, basis.shape[0] + 1)]
    shared = SharedPrefix.split(ids, mask, batch_size, model.device)
    out: dict = {"rows": []}
    for key, hooks in settings:
        if key in known:
            if len(known[key]) != shared.n:
                raise ValueError(f"known[{key!r}] has {len(known[key])} values for {shared.n} prompts.")
            v = _mean_se_n(known[key])
        else:
            with torch.no_grad():
                v = _mean_se_n(refusal_log_odds(shared.last_logits(model, hooks), refusal_ids).cpu())
        if isinstance(key, int):
            out["rows"].append({"k": key, **v, "cos_direction": float(basis[key - 1].to(torch.float64) @ r)})
        else:
            out[key] = v
        if bar is not None:
            bar.update(1)
    return out


def _ratio_ci(num: torch.Tensor, den: torch.Tensor, seed: int) -> list[float]:
    """Percentile bootstrap interval over pairs of mean(num) / mean(den) (the same resample of both)."""
    n = num.shape[0]
    if n < 2:
        v = float(num.mean() / den.mean())
        return [v, v]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (N_BOOT, n), generator=g)
    ratio = num[idx].mean(1) / den[idx].mean(1)
    ratio = ratio[torch.isfinite(ratio)]
    if ratio.numel() == 0:
        return [float("nan"), float("nan")]
    q = torch.quantile(ratio, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


def resid_patch_layer(heads: Sequence[tuple[int, int]], heads_column: int, last_column: int, layer: int) -> int:
    """The layer whose ``hook_resid_pre`` at the heads' column the whole-residual patch replaces:
    right after the last selected head (``max head layer + 1``), but early enough to reach the
    readout at ``layer``'s last column — at most ``layer`` when the heads' column is the last one,
    else at most ``layer − 1`` (another column reaches the last one only through a later layer's
    attention)."""
    cap = layer if heads_column == last_column else layer - 1
    return max(0, min(max(l for l, _ in heads) + 1, cap))


@torch.no_grad()
def heads_to_direction(model, harmful: tuple[torch.Tensor, torch.Tensor], harmless: tuple[torch.Tensor, torch.Tensor],
                       heads: Sequence[tuple[int, int]], heads_column: int, direction: torch.Tensor, layer: int,
                       seed: int = 0, hc: HeadCaches | None = None) -> dict:
    """How much of ``r̂`` at ``blocks.{layer}.hook_resid_pre`` (last column) the refusal heads move.

    Pairs: harmful prompt i with harmless prompt i (one batch per side; same length). Readout:
    ``resid_pre[layer][:, -1] · r̂``. ``heads_patch``: the harmless prompts with every head of
    ``heads`` patched from the harmful run at ``heads_column`` (``attn.hook_z``, as the ``heads``
    step patches); ``resid_patch``: with the whole ``hook_resid_pre`` at the heads' column of
    :func:`resid_patch_layer` patched instead. Each shift (patched − clean harmless, per pair) and
    the full gap (harmful − harmless, per pair) as ``{mean, se, ci95, n}``; ``ratio`` = mean heads
    shift / mean residual shift with a bootstrap interval over pairs; ``ratio_to_gap`` likewise.
    ``writes``: each head's own output (:meth:`head_results`, after Gemma's post-norm: what it adds to
    the residual) at the last column and at the heads' column, projected on ``r̂`` — harmful and
    harmless means and their paired difference with SE.

    The clean forwards are ``hc``'s when given (the same prompts; :func:`head_caches` with
    ``resid_layers`` holding ``layer`` and :func:`resid_patch_layer`'s layer), else two of its own;
    the two patched forwards run only the blocks from their edit up to ``layer`` (from the clean
    residual there)."""
    heads = [(int(l), model.check_head(h)) for l, h in heads]
    if not heads:
        raise SiteError("Give at least one (layer, head) pair.")
    r = unit(direction)
    (h_ids, _), (s_ids, s_mask) = harmful, harmless
    if h_ids.shape != s_ids.shape:
        raise SiteError(f"Paired prompts need equal shapes, got {tuple(h_ids.shape)} and {tuple(s_ids.shape)}.")
    T = h_ids.shape[1]
    last, hcol = T - 1, heads_column + T if heads_column < 0 else heads_column
    lp = resid_patch_layer(heads, hcol, last, layer)
    readout = f"blocks.{layer}.hook_resid_pre"
    head_layers = sorted({l for l, _ in heads})
    first = min(head_layers[0], layer)  # the heads' patch edits nothing below its first layer
    names = {readout, f"blocks.{lp}.hook_resid_pre", f"blocks.{first}.hook_resid_pre"}
    names |= {f"blocks.{l}.attn.{s}" for l in head_layers for s in ("hook_z", "hook_result")}
    dev = model.device
    if hc is not None and all(n in hc.caches[side] for n in names for side in ("harmful", "harmless")):
        caches = hc.caches
    else:
        caches = {side: model.run_with_cache(i.to(dev), m.to(dev), names=lambda n: n in names, logits="none")[1]
                  for side, (i, m) in (("harmful", harmful), ("harmless", harmless))}

    def read(cache) -> torch.Tensor:
        return cache[readout][:, last].to(torch.float64).cpu() @ r

    ph, ps = read(caches["harmful"]), read(caches["harmless"])
    s_ids, s_mask = s_ids.to(dev), s_mask.to(dev)
    def patched(hooks, start: int) -> torch.Tensor:
        """The readout of the harmless prompts under ``hooks`` (all at ``start`` or later): blocks
        ``start..layer`` only, from the clean residual entering ``start``."""
        resid = caches["harmless"][f"blocks.{start}.hook_resid_pre"] if start else None
        run = model.prefill(s_ids, s_mask, fwd_hooks=hooks, names=[readout], logits="none", start_layer=start,
                            stop_layer=layer + 1, resid=resid)
        return read(run.cache)

    p_heads = patched(head_patch_hooks(caches["harmful"], heads, [hcol]), first)
    src = caches["harmful"][f"blocks.{lp}.hook_resid_pre"][:, hcol : hcol + 1]
    p_resid = patched([(f"blocks.{lp}.hook_resid_pre", Patch.block(src, [hcol]))], lp)
    d_heads, d_resid, gap = p_heads - ps, p_resid - ps, ph - ps
    writes = []
    for l, h in heads:
        res = {side: model.head_results(c, l)[:, :, h].to(torch.float64).cpu() @ r for side, c in caches.items()}
        for where, c in (("last", last), ("heads", hcol)):
            a, b = res["harmful"][:, c], res["harmless"][:, c]
            diff = summary(a - b, seed=seed)
            writes.append({"layer": l, "head": h, "column": where, "index": c, "harmful_mean": float(a.mean()),
                           "harmless_mean": float(b.mean()), "difference": diff["mean"], "difference_se": diff["se"],
                           "difference_ci95": diff["ci95"], "n_pairs": diff["n"]})
    return {
        "layer": layer, "readout": f"{readout}, last column ({last}), projected on the unit direction",
        "heads": [{"layer": l, "head": h} for l, h in heads], "heads_column": hcol, "resid_patch_layer": lp,
        "resid_patch_site": f"blocks.{lp}.hook_resid_pre", "n_pairs": int(ph.shape[0]),
        "harmful_mean": float(ph.mean()), "harmless_mean": float(ps.mean()),
        "heads_patched_mean": float(p_heads.mean()), "resid_patched_mean": float(p_resid.mean()),
        "gap": summary(gap, seed=seed), "heads_shift": summary(d_heads, seed=seed),
        "resid_shift": summary(d_resid, seed=seed),
        "ratio": float(d_heads.mean() / d_resid.mean()) if float(d_resid.mean()) != 0 else float("nan"),
        "ratio_ci95": _ratio_ci(d_heads, d_resid, seed),
        "ratio_to_gap": float(d_heads.mean() / gap.mean()) if float(gap.mean()) != 0 else float("nan"),
        "ratio_to_gap_ci95": _ratio_ci(d_heads, gap, seed),
        "writes": writes,
        "per_pair": {"harmful": ph, "harmless": ps, "heads_patched": p_heads, "resid_patched": p_resid},
    }



# ------------------------------------------------------------------ what the refusal heads read and do

@dataclass
class HeadCaches:
    """One clean forward per side of paired prompts, shared by :func:`head_reads`,
    :func:`head_path_split` and :func:`downstream_ablation`: each side's ``(ids, mask)``, its cache
    (the head layers' ``attn.hook_pattern``, ``attn.hook_z``, ``attn.hook_result``, the last
    layer's ``hook_resid_post`` and the ``hook_resid_pre`` where the cone runs start: the first head
    layer's and the one after the last head layer) and its metric ``logit[refusal] − logit[compliance]``
    at the last column ``[n]`` (float64, CPU). A patched forward whose edits all lie at layer ``l`` or
    later runs blocks ``l..`` only, from the clean residual cached there (the blocks below compute
    what the clean run computed); ``effects`` keeps each head patch's metric change for reuse."""

    inputs: dict  # side -> (ids [n, T], mask [n, T]) on the model's device
    caches: dict  # side -> ActivationCache
    metric: dict  # side -> [n] float64
    tokens: tuple[int, int]  # (refusal id, compliance id)
    effects: dict = field(default_factory=dict)  # (heads, cols) -> patched − clean harmless metric [n]


def _pairs(model, heads) -> list[tuple[int, int]]:
    heads = [(int(l), model.check_head(h)) for l, h in heads]
    if not heads:
        raise SiteError("Give at least one (layer, head) pair.")
    return heads


@torch.no_grad()
def head_caches(model, harmful: tuple[torch.Tensor, torch.Tensor], harmless: tuple[torch.Tensor, torch.Tensor],
                heads: Sequence[tuple[int, int]], tokens: tuple[int, int], resid_layers: Sequence[int] = ()) -> HeadCaches:
    """The two clean forwards (one per side, pair i = harmful i, harmless i, equal shapes) of
    :class:`HeadCaches`; ``resid_layers``: more layers whose ``hook_resid_pre`` to keep (e.g. those
    :func:`heads_to_direction` reads and patches)."""
    heads = _pairs(model, heads)
    if harmful[0].shape != harmless[0].shape:
        raise SiteError(f"Paired prompts need equal shapes, got {tuple(harmful[0].shape)} and "
                        f"{tuple(harmless[0].shape)}.")
    layers = {l for l, _ in heads}
    names = {f"blocks.{l}.attn.{s}" for l in layers for s in ("hook_pattern", "hook_z", "hook_result")}
    names.add(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    names |= {f"blocks.{l}.hook_resid_pre" for l in (*_cone_starts(model, heads), *resid_layers)}
    dev = model.device
    inputs, caches, metric = {}, {}, {}
    for side, (i, m) in (("harmful", harmful), ("harmless", harmless)):
        inputs[side] = (i.to(dev), None if m is None else m.to(dev))
        logits, caches[side] = model.run_with_cache(*inputs[side], names=lambda n: n in names, logits="last")
        metric[side] = logit_diff(logits, tokens).to(torch.float64).cpu()
    return HeadCaches(inputs, caches, metric, (int(tokens[0]), int(tokens[1])))


def _paired(x: torch.Tensor, seed: int) -> dict:
    """Mean, SE and percentile-bootstrap 95 % interval over pairs (axis 0) of ``x`` ``[n, ...]``, per cell."""
    m, se = mean_se(x)
    lo, hi = bootstrap_ci(x, seed=seed)
    return {"mean": m, "se": se, "ci95": torch.stack([lo, hi], -1)}


def head_reads(model, hc: HeadCaches, heads: Sequence[tuple[int, int]], query_cols: Sequence[int],
               key_cols: Sequence[int], seed: int = 0) -> dict:
    """What each head of ``heads`` attends to: ``attn.hook_pattern[:, h, q, k]`` (post-softmax,
    GQA expanded per query head) from every query column of ``query_cols`` to every key column of
    ``key_cols``, over the pairs of ``hc``.

    Per query column (``rows``, one per query): ``harmful_mean``/``harmless_mean`` with their
    ``*_se``, ``difference`` (harmful − harmless, paired) and its ``difference_se`` as ``[heads][keys]``, ``difference_ci95``
    ``[heads][keys][2]``; and the head set (each prompt's attention averaged over the heads, then
    over prompts): ``set_harmful``/``set_harmless``/``set_difference`` as ``[keys]`` lists of
    ``{mean, se, ci95}``. ``per_prompt`` (not JSON): side -> ``[n, heads, queries, keys]``."""
    heads = _pairs(model, heads)
    T = hc.inputs["harmful"][0].shape[1]
    qs = [q + T if q < 0 else int(q) for q in query_cols]
    ks = [k + T if k < 0 else int(k) for k in key_cols]
    if not all(0 <= c < T for c in qs + ks):
        raise SiteError(f"Query and key columns must lie in 0..{T - 1}, got {qs} and {ks}.")
    qi, ki = torch.tensor(qs), torch.tensor(ks)
    att = {}
    for side, cache in hc.caches.items():
        per = [cache[f"blocks.{l}.attn.hook_pattern"][:, h].to(torch.float64).cpu()[:, qi][:, :, ki] for l, h in heads]
        att[side] = torch.stack(per, 1)  # [n, heads, q, k]
    diff = att["harmful"] - att["harmless"]
    d = _paired(diff, seed)
    sets = {side: _paired(x.mean(1), seed) for side, x in (("harmful", att["harmful"]), ("harmless", att["harmless"]),
                                                              ("difference", diff))}

    def cells(s: dict, q: int) -> list[dict]:
        return [{"mean": float(s["mean"][q, k]), "se": float(s["se"][q, k]), "ci95": s["ci95"][q, k].tolist()}
                for k in range(len(ks))]

    rows = []
    for j, q in enumerate(qs):
        side_se = {side: mean_se(att[side][:, :, j])[1].tolist() for side in ("harmful", "harmless")}
        rows.append({"index": q, "harmful_mean": att["harmful"][:, :, j].mean(0).tolist(),
                     "harmful_se": side_se["harmful"], "harmless_mean": att["harmless"][:, :, j].mean(0).tolist(),
                     "harmless_se": side_se["harmless"],
                     "difference": d["mean"][:, j].tolist(), "difference_se": d["se"][:, j].tolist(),
                     "difference_ci95": d["ci95"][:, j].tolist(),
                     **{f"set_{side}": cells(s, j) for side, s in sets.items()}})
    return {"heads": [{"layer": l, "head": h} for l, h in heads], "keys": ks, "n_pairs": int(diff.shape[0]),
            "rows": rows, "per_prompt": att}


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    d = float(den.mean())
    return float(num.mean()) / d if d != 0 else float("nan")


def _cone_starts(model, heads: Sequence[tuple[int, int]]) -> list[int]:
    """Where :class:`HeadCaches`' cone runs start: the first head layer (a head patch edits nothing
    below it) and, if there is one, the layer after the last head layer (the downstream ablation)."""
    first, after = min(l for l, _ in heads), max(l for l, _ in heads) + 1
    return [first] + ([after] if after < model.cfg.n_layers else [])


def _patched_metric(model, hc: HeadCaches, hooks: Sequence, receiver: str = "harmless",
                    start_layer: int = 0) -> torch.Tensor:
    """The receiver's metric under ``hooks``, every one of them at ``start_layer`` or later: only
    blocks ``start_layer..`` run, from the clean residual cached there (0: the whole forward)."""
    resid = hc.caches[receiver][f"blocks.{start_layer}.hook_resid_pre"] if start_layer else None
    logits = model.prefill(*hc.inputs[receiver], fwd_hooks=list(hooks), logits="last", start_layer=start_layer,
                           resid=resid).logits
    return logit_diff(logits, hc.tokens).to(torch.float64).cpu()


def _heads_effect(model, hc: HeadCaches, heads: list[tuple[int, int]], cols: list[int]) -> torch.Tensor:
    """Patched − clean harmless metric of the heads' patch at ``cols`` (one cone forward from the
    first head layer, computed once per ``hc``)."""
    key = (tuple(heads), tuple(cols))
    if key not in hc.effects:
        hooks = head_patch_hooks(hc.caches["harmful"], heads, cols)
        hc.effects[key] = _patched_metric(model, hc, hooks, start_layer=min(l for l, _ in heads)) - hc.metric["harmless"]
    return hc.effects[key]


@torch.no_grad()
def head_path_split(model, hc: HeadCaches, heads: Sequence[tuple[int, int]], cols: Sequence[int],
                    seed: int = 0) -> dict:
    """The refusal heads' patch (every head's ``attn.hook_z`` at ``cols`` from the harmful run into
    the harmless one, as the ``heads`` step patches) split into its paths to the metric.

    ``total``: patched − clean harmless metric per pair (one patched forward). ``direct``: only the
    heads' own outputs go straight to the logits, everything downstream frozen (TransformerLens's
    direct logit attribution with the receiving run's final-norm scale, as :mod:`refusal_lab.dla`):
    ``Σ_h (head_h^harmful − head_h^harmless)[last] / rms(resid_final^harmless[last]) · (g ⊙ (W_U[:, r] −
    W_U[:, c]))``, head outputs as :meth:`head_results` (after Gemma's post-attention norm); it is 0
    unless ``cols`` holds the last column (a head's write at another column reaches the logits only
    through later layers' attention). Before Gemma 2's final soft-cap (the total is after it).
    ``indirect`` = total − direct; ``direct_fraction`` = mean direct / mean total with a bootstrap
    interval over pairs. ``per_pair`` (not JSON): side-less ``[n]`` tensors."""
    heads = _pairs(model, heads)
    T = hc.inputs["harmless"][0].shape[1]
    cols = sorted({c + T if c < 0 else int(c) for c in cols})
    last = T - 1
    total = _heads_effect(model, hc, heads, cols)
    a = model.adapter
    r_id, c_id = hc.tokens
    w_u = a.lm_head.weight[[r_id, c_id]].to(torch.float64).cpu()
    readout = (w_u[0] - w_u[1]) * a.ln_scale_weight(a.final_norm).to(torch.float64).cpu()  # [d]
    final = hc.caches["harmless"][f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, last]
    scale = a.rms_scale(a.final_norm, final).to(torch.float64).cpu()  # [n, 1], the receiving run's
    direct = torch.zeros_like(total)
    if last in cols:
        for l, h in heads:
            w = {s: model.head_results(c, l)[:, last, h].to(torch.float64).cpu() for s, c in hc.caches.items()}
            direct += ((w["harmful"] - w["harmless"]) * scale) @ readout
    return {"cols": cols, "last_patched": last in cols, "n_pairs": int(total.shape[0]),
            "total": summary(total, seed=seed), "direct": summary(direct, seed=seed),
            "indirect": summary(total - direct, seed=seed), "direct_fraction": _ratio(direct, total),
            "direct_fraction_ci95": _ratio_ci(direct, total, seed),
            "per_pair": {"total": total, "direct": direct}}


def downstream_write_sites(model, after_layer: int) -> list[str]:
    """The residual writes (``hook_attn_out``, ``hook_mlp_out``) of every layer after ``after_layer``."""
    return [f"blocks.{l}.{s}" for l in range(after_layer + 1, model.cfg.n_layers)
            for s in ("hook_attn_out", "hook_mlp_out")]


@torch.no_grad()
def downstream_ablation(model, hc: HeadCaches, heads: Sequence[tuple[int, int]], cols: Sequence[int],
                        direction: torch.Tensor, seed: int = 0) -> dict:
    """How much of the heads' patch sufficiency needs later layers to write along ``r̂``.

    ``effect``: patched − clean harmless metric per pair (the heads' patch at ``cols``, as
    :func:`head_path_split`'s total); ``effect_ablated``: the same with ``r̂`` projected out of every
    residual write after the heads' last layer (:func:`downstream_write_sites`, the k = 1 edit of
    :func:`subspace_ablation_hooks`) in both the clean and the patched forward (two forwards).
    ``sufficiency``/``sufficiency_ablated``: each mean over the mean harmful − harmless gap;
    ``fraction_removed`` = 1 − mean effect_ablated / mean effect, with a bootstrap interval over
    pairs. ``residual``: the same with ``r̂`` also projected out of the residual entering the next
    layer (``blocks.{after + 1}.hook_resid_pre``, every column), so that what the heads (and every
    earlier layer) wrote along ``r̂`` is gone too, not only what later layers write (two more
    forwards). With the heads in the last layer nothing is ablated (``n_sites`` 0)."""
    heads = _pairs(model, heads)
    T = hc.inputs["harmless"][0].shape[1]
    cols = sorted({c + T if c < 0 else int(c) for c in cols})
    after = max(l for l, _ in heads)
    sites = downstream_write_sites(model, after)
    edit = ProjectOutSubspace(unit(direction).to(torch.float32)[None])
    abl = [(n, edit) for n in sites]
    patch = head_patch_hooks(hc.caches["harmful"], heads, cols)
    clean = hc.metric["harmless"]
    first = min(l for l, _ in heads)  # cone runs: the patch edits from the first head layer, the ablation after the last
    effect = _heads_effect(model, hc, heads, cols)
    if sites:
        effect_abl = (_patched_metric(model, hc, [*patch, *abl], start_layer=first)
                      - _patched_metric(model, hc, abl, start_layer=after + 1))
    else:
        effect_abl = effect
    res_sites = [f"blocks.{after + 1}.hook_resid_pre", *sites] if sites else []
    res = [(n, edit) for n in res_sites]
    effect_res = (_patched_metric(model, hc, [*patch, *res], start_layer=first)
                  - _patched_metric(model, hc, res, start_layer=after + 1)) if res else effect
    gap = hc.metric["harmful"] - clean

    def ablated(x: torch.Tensor) -> dict:
        lo, hi = _ratio_ci(x, effect, seed)
        return {"effect_ablated": summary(x, seed=seed), "sufficiency_ablated": _ratio(x, gap),
                "fraction_removed": 1.0 - _ratio(x, effect), "fraction_removed_ci95": [1.0 - hi, 1.0 - lo]}

    return {"after_layer": after, "n_sites": len(sites), "sites": f"hook_attn_out, hook_mlp_out of layers "
            f"{after + 1}..{model.cfg.n_layers - 1}" if sites else "none (the heads are in the last layer)",
            "cols": cols, "n_pairs": int(effect.shape[0]), "gap": summary(gap, seed=seed),
            "effect": summary(effect, seed=seed), "sufficiency": _ratio(effect, gap), **ablated(effect_abl),
            "residual": {"n_sites": len(res_sites), "sites": f"blocks.{after + 1}.hook_resid_pre and every later "
                         "residual write" if res_sites else "none (the heads are in the last layer)", **ablated(effect_res)},
            "per_pair": {"effect": effect, "effect_ablated": effect_abl, "effect_ablated_residual": effect_res}}
