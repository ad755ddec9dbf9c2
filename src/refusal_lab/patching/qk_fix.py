"""AtP*'s QK fix for the head grid (Kramár, Lieberum, Shah & Nanda 2024, arXiv 2403.00745, §3.1.1).

Plain AtP (:mod:`refusal_lab.patching.attribution`) estimates the effect of patching node n as
Δn · ∂metric/∂n, which linearises every attention softmax downstream of n. Where a downstream head's
attention is saturated its softmax gradient is ~0, so AtP misses effects that go through *changing
where that head attends* (false negatives). The QK fix keeps the attention logits linear in the
node but computes the attention probabilities exactly.

The paper states the fix for nodes that act on a head through its queries or keys: the attention
logits are linearised in the node, the softmax is not. Here the nodes are head outputs, and the fix
is applied to each node's direct effect on the queries and keys of every later layer.

What is implemented here, for a node n = head h of layer l patched at the columns C (its ``hook_z``
set to the source value, Δz = z_S − z_R at C):

1. Δr: the node's write into the residual stream at columns C, Δz_h·W_O^h, taken through Gemma's
   post-attention RMSNorm to first order (a Jacobian-vector product at the receiving run, so the
   norm's scale *and* its dependence on the other heads' output are linearised, not frozen).
2. For every later layer l' > l (the node's own layer is untouched: patching z does not change its
   own pattern), the first-order change of that layer's queries and keys at C along the *direct*
   residual path: Δq, Δk = JVP of ``ln1`` → q/k projections → Qwen3/Gemma3 q/k norms → rotary,
   at the receiving run's ``resid_pre`` in the direction Δr (:func:`qk_states` calls the HF modules
   of the layer; forward-mode AD, so the RMSNorms are linearised exactly rather than with a frozen
   scale, which keeps step 5 equal to AtP's own term).
3. The first-order change of the attention logits (pre soft-cap, with the layer's scaling, e.g.
   Gemma's ``query_pre_attn_scalar``): Δs[t, c] = scale·q_t·Δk_c for every query t (key change),
   Δs[c, s] = scale·Δq_c·k_s (query change), both for query and key c in C; GQA maps query head h
   to key/value head h // (n_heads / n_kv_heads).
4. The attention probabilities exactly: p' = softmax(softcap(s + Δs) + mask) with Gemma 2's
   ``attn_logit_softcapping`` applied exactly, and the fixed contribution
   Σ_{t,s} (p'[t, s] − p[t, s]) · ∂metric/∂p[t, s] (gradient of the receiving run).
5. AtP's own contribution through the same logits, Σ Δs · ∂metric/∂s — exactly the chain-rule term
   of AtP's Δz · ∂metric/∂z along these paths, since steps 1–3 are the true derivative.

    AtP*(n) = AtP(n) + Σ_{l' > l} [fixed_{l'}(n) − linear_{l'}(n)].

What stays approximate (as in the paper): the logits are first order in Δz (the Δq·Δk cross term
and the curvature of the norms are dropped); only the *direct* path from n to each later layer's
q/k is fixed — effects on q/k that pass through intermediate heads/MLPs, and the paths through
values, MLPs and the final norm, keep AtP's linearisation; ∂metric/∂p is the receiving run's
gradient (the change of the pattern is not propagated nonlinearly to the metric); and the several
later layers' corrections are added independently. GradDrop (AtP*'s other ingredient) is not
implemented.

Cost: one forward and backward pass on the receiving prompts (with an eager attention that records
q, k and the pattern; it also gives plain AtP's gradients) plus, per later layer, one batched JVP
over all earlier nodes at the patched columns (the q/k projections of N·n·|C| tangent rows) and
one batched closed-form softmax: a row whose query is not patched changes only at the patched key
columns, so its new softmax costs O(|C|) given the row's old log-normaliser; only rows that see a
patched key are visited. On Qwen2.5-0.5B (24 × 14 heads, 7 prompts) this is about a third of the
forward-and-backward pass, no forward per head.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch

from refusal_lab.models.hooked import ActivationCache, HookedChatModel

RECORDER = "refusal_lab_record"


@dataclass
class AttentionRecord:
    """One layer of the receiving run: post-rotary queries [b, Hq, T, dh] and keys [b, Hkv, T, dh],
    the additive mask [b, 1, T, T], scaling, soft-cap and ∂Σmetric/∂pattern [b, Hq, T, T]."""

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    softcap: float | None
    grad_probs: torch.Tensor | None = None


class AttentionRecorder:
    """What :func:`recording` collects: each layer's record and its (graph-attached) pattern."""

    def __init__(self):
        self.records: dict[int, AttentionRecord] = {}
        self.probs: dict[int, torch.Tensor] = {}


_STACK: list[AttentionRecorder] = []


def _repeat_kv(x: torch.Tensor, n_rep: int, dim: int = 1) -> torch.Tensor:
    """Key/value heads to query heads (query head h reads key/value head h // n_rep), as HF's repeat_kv."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=dim)


def _recording_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
    """An HF attention function: eager attention (HF's ``eager_attention_forward``) that records."""
    rec = _STACK[-1]
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    n_rep = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : k.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if probs.requires_grad:
        probs.retain_grad()
    rec.probs[module.layer_idx] = probs
    mask = None if attention_mask is None else attention_mask[:, :, :, : k.shape[-2]].detach()
    rec.records[module.layer_idx] = AttentionRecord(query.detach(), key.detach(), mask, float(scaling),
                                                    None if softcap is None else float(softcap))
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out, probs


_registered = False


@contextlib.contextmanager
def recording(model: HookedChatModel):
    """Within the block, every attention of ``model`` runs through :func:`_recording_attention`."""
    global _registered
    from transformers import AttentionInterface

    if not _registered:
        AttentionInterface.register(RECORDER, _recording_attention)
        _registered = True
    cfg = model.hf_model.config
    old = cfg._attn_implementation
    rec = AttentionRecorder()
    _STACK.append(rec)
    cfg._attn_implementation = RECORDER
    try:
        yield rec
    finally:
        cfg._attn_implementation = old
        _STACK.remove(rec)


# ---------------------------------------------------------------------------------------- JVPs
def _batched_jvp(fn, primal: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """d fn(primal)[t] for every t in ``tangents`` [N, *primal.shape] (forward-mode AD; the primal is
    computed once)."""
    tangent = lambda t: torch.func.jvp(fn, (primal,), (t,))[1]  # noqa: E731
    with torch.no_grad():
        return torch.func.vmap(tangent)(tangents.to(primal.device, primal.dtype))


def head_writes(model: HookedChatModel, layer: int, z_rec: torch.Tensor, dz: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """First-order change of the residual stream [len(heads), b, C, d] when head h's z at some columns
    changes by dz[:, :, h] (z_rec [b, C, H, dh] the receiving run's z there): Δz_h·W_O^hᵀ, through
    the post-attention norm's Jacobian (Gemma) at the receiving run."""
    a = model.adapter
    o = a.o_proj(layer)
    dh = model.cfg.d_head
    w = o.weight.view(o.weight.shape[0], model.cfg.n_heads, dh)[:, heads]  # [d, k, dh]
    dz = dz[:, :, heads].to(w.dtype)
    res = torch.einsum("bckx,dkx->kbcd", dz, w)
    norm = a.attn_post_norm(layer)
    if norm is None:
        return res
    raw = o(z_rec.flatten(-2).to(w.dtype))  # [b, C, d]: attention output before the post-norm
    return _batched_jvp(norm, raw, res)


def qk_states(model: HookedChatModel, layer: int, resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Post-rotary queries [b, Hq, C, dh] and keys [b, Hkv, C, dh] of layer ``layer`` from its
    ``resid_pre`` [b, C, d]: ``ln1`` → q/k projections → q/k norms (Qwen3, Gemma 3) → rotary, the
    steps of every supported HF attention module before the scores (tests compare with HF)."""
    a = model.adapter
    attn = a.attn(layer)
    x = a.ln1(layer)(resid)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q, k = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    return rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def qk_tangents(
    model: HookedChatModel, layer: int, resid: torch.Tensor, dr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order change (dq [N, b, Hq, C, dh], dk [N, b, Hkv, C, dh]) of layer ``layer``'s post-rotary
    queries/keys at some columns when its ``resid_pre`` there ([b, C, d]) changes by dr [N, b, C, d];
    ``cos``/``sin`` [b, C, dh] are the rotary embeddings of those columns. One batched JVP (the
    receiving-run primal is computed once, the N tangents together)."""
    dev = model.adapter.ln1(layer).weight.device
    resid, cos, sin = resid.to(dev), cos.to(dev), sin.to(dev)
    return _batched_jvp(lambda x: qk_states(model, layer, x, cos, sin), resid, dr)


# ---------------------------------------------------------------------------------------- the fix
def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def delta_scores(rec: AttentionRecord, dq: torch.Tensor, dk: torch.Tensor):
    """(D_cols [N, b, Hq, T, C], D_rows [N, b, Hq, C, T]): the first-order change of the scaled,
    pre-soft-cap logits through the keys (columns C, every query) and through the queries (rows C).
    The full change is their sum scattered into [T, T]."""
    f = _work_dtype(rec.query.device)
    n_rep = rec.query.shape[1] // rec.key.shape[1]
    q = rec.query.to(f)
    k = _repeat_kv(rec.key.to(f), n_rep)
    dk = _repeat_kv(dk.to(q.device, f), n_rep, dim=2)
    dq = dq.to(q.device, f)
    d_cols = torch.einsum("bhtx,nbhcx->nbhtc", q, dk) * rec.scaling
    d_rows = torch.einsum("nbhcx,bhsx->nbhcs", dq, k) * rec.scaling
    return d_cols, d_rows


def fixed_and_linear(rec: AttentionRecord, d_cols: torch.Tensor, d_rows: torch.Tensor, cols: list[int]):
    """(fixed [N, b], linear [N, b]) contributions of a logit change through this layer's patterns:
    Σ (p' − p)·∂metric/∂p with p' the exact (soft-capped, masked) softmax of the changed logits, and
    Σ Δs·∂metric/∂s, AtP's first-order term. Rows whose query is not in C change only at the key
    columns C and are done in closed form (log-space, so saturated keys that gain mass are exact)."""
    f = d_cols.dtype
    dev = d_cols.device
    n_rep = rec.query.shape[1] // rec.key.shape[1]
    q, k = rec.query.to(dev, f), _repeat_kv(rec.key.to(dev, f), n_rep)
    T = q.shape[2]
    raw = torch.matmul(q, k.transpose(2, 3)) * rec.scaling  # [b, H, T, T]
    cap = (lambda x: torch.tanh(x / rec.softcap) * rec.softcap) if rec.softcap else (lambda x: x)
    if rec.mask is None:
        allowed = torch.ones(1, 1, T, T, dtype=torch.bool, device=dev)
    else:
        allowed = rec.mask.to(dev) > torch.finfo(rec.mask.dtype).min / 2
    neg = torch.tensor(-1e30 if f == torch.float64 else -1e20, dtype=f, device=dev)
    logits = torch.where(allowed, cap(raw), neg)  # a fully masked row stays uniform, as in HF's eager
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    G = rec.grad_probs.to(dev, f)
    # AtP's term: ∂metric/∂s = cap'(s) · p ⊙ (G − <p, G>)
    gS = p * (G - (p * G).sum(-1, keepdim=True))
    if rec.softcap:
        gS = gS * (1 - torch.tanh(raw / rec.softcap) ** 2)
    gS = torch.where(allowed, gS, 0)
    c = torch.as_tensor(cols, device=dev)
    in_c = torch.zeros(T, dtype=torch.bool, device=dev)
    in_c[c] = True
    linear = (d_cols * gS[..., :, c]).sum((2, 3, 4)) + (d_rows * gS[..., c, :]).sum((2, 3, 4))

    # rows t not in C: only the entries at key columns C change, by delta (after the exact soft-cap);
    # rows where no key of C is visible (before C, by causality) do not change at all
    r = torch.nonzero(allowed[..., :, c].any(-1).flatten(0, 1).any(0) & ~in_c).flatten()
    raw_c, logp_c, p_c, G_c = raw[..., r, :][..., c], logp[..., r, :][..., c], p[..., r, :][..., c], G[..., r, :][..., c]
    d_c = d_cols[..., r, :]
    delta = torch.where(allowed[..., r, :][..., c], cap(raw_c + d_c) - cap(raw_c), 0)  # [N, b, H, R, C]
    lw = logp_c + delta
    log_rest = logp[..., r, :].masked_fill(in_c, float("-inf")).logsumexp(-1)  # [b, H, R]: mass outside C
    rest_pg = (p * G)[..., r, :].masked_fill(in_c, 0).sum(-1)  # [b, H, R]
    log_z = torch.logaddexp(log_rest, lw.logsumexp(-1))  # [N, b, H, R]: new normaliser (old one is 1)
    per_row = rest_pg * torch.expm1(-log_z) + (((lw - log_z[..., None]).exp() - p_c) * G_c).sum(-1)
    fixed = per_row.sum((2, 3))

    # rows t in C: the whole row changes (query change, plus the key change at columns C)
    rows = raw[..., c, :] + d_rows  # [N, b, H, C, T]
    rows = rows.index_add(4, c, d_cols[..., c, :])
    new = torch.softmax(torch.where(allowed[..., c, :], cap(rows), neg), -1)
    fixed = fixed + ((new - p[..., c, :]) * G[..., c, :]).sum((2, 3, 4))
    return fixed, linear


def qk_fix_correction(
    model: HookedChatModel,
    receiver_acts: ActivationCache,
    source: ActivationCache,
    records: dict[int, AttentionRecord],
    resid_pre: dict[int, torch.Tensor],
    position_ids: torch.Tensor,
    layers: list[int],
    heads: list[int],
    cols: list[int],
    max_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fixed, linear) [n, len(layers), len(heads)] summed over later layers, and their difference
    (AtP* − AtP) for the head grid. ``resid_pre[l]`` is the receiving run's residual [n, T, d]."""
    L = model.cfg.n_layers
    n = resid_pre[0].shape[0]
    fixed = torch.zeros(n, len(layers), len(heads), dtype=torch.float64)
    linear = torch.zeros_like(fixed)
    # the node's write to the residual stream, per layer of the grid
    writes = {}
    for l in layers:
        name = f"blocks.{l}.attn.hook_z"
        z_r = receiver_acts[name][:, cols]
        dz = source[name][:, cols].to(z_r.device) - z_r
        writes[l] = head_writes(model, l, z_r, dz, heads)  # [k, n, C, d]
    a = model.adapter
    for l2 in range(1, L):
        earlier = [i for i, l in enumerate(layers) if l < l2]
        if not earlier:
            continue
        rec = records[l2]
        dev = a.ln1(l2).weight.device
        resid = resid_pre[l2][:, cols]
        cos, sin = a.rotary(resid_pre[l2].to(dev), position_ids.to(dev), l2)
        dr = torch.cat([writes[layers[i]].to(dev) for i in earlier])  # [N, n, C, d], node-major
        T, H = rec.query.shape[2], rec.query.shape[1]
        per_node = n * H * T * len(cols) * 2 + n * len(cols) * model.cfg.d_model
        chunk = max(1, max_elements // max(per_node, 1))
        fx, ln = [], []
        for s in range(0, dr.shape[0], chunk):
            dq, dk = qk_tangents(model, l2, resid, dr[s:s + chunk], cos[:, cols], sin[:, cols])
            d_cols, d_rows = delta_scores(rec, dq, dk)
            f_, l_ = fixed_and_linear(rec, d_cols, d_rows, cols)
            fx.append(f_.cpu())
            ln.append(l_.cpu())
        fx = torch.cat(fx).view(len(earlier), len(heads), n).permute(2, 0, 1)
        ln = torch.cat(ln).view(len(earlier), len(heads), n).permute(2, 0, 1)
        idx = torch.tensor(earlier)
        fixed[:, idx] += fx.double()
        linear[:, idx] += ln.double()
    return fixed, linear, fixed - linear


__all__ = [
    "AttentionRecord", "AttentionRecorder", "recording", "head_writes", "qk_states", "qk_tangents", "delta_scores",
    "fixed_and_linear", "qk_fix_correction",
]
