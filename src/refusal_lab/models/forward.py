"""The decoder-block loop, run site by site through the adapter's Hugging Face modules.

:func:`run_blocks` is the only place a block is computed: every forward of
:class:`~refusal_lab.models.hooked.HookedChatModel` (its prompt forward, generation, the patching
engine's cone runs) goes through it. It can run any range of layers on a residual given at any
absolute columns, attending over a cached key/value prefix (:class:`KVPrefix`) for the columns
before them: that is what lets generation feed one token at a time and the patching engine
recompute only the cone a patch can influence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from refusal_lab.models.cpu_linear import under_transform
from refusal_lab.models.pattern import watching
from refusal_lab.models.sites import HookRun

if TYPE_CHECKING:  # pragma: no cover
    from refusal_lab.models.hooked import HookedChatModel

KV = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (keys, values) [b, kv_heads, k, d_head]


class KVPrefix:
    """Duck-typed HF cache for one forward: prepends a cached key/value prefix per layer and/or
    records the full keys/values. HF attention modules only call ``update`` on it.

    With ``buffer`` (per layer, keys/values [b, kv_heads, capacity, d_head] whose first ``length``
    columns are the cache) the forward's keys and values are written into the buffer in place after
    those columns and attention reads a view of it: a decoding step copies one column, not the
    whole cache (:func:`~refusal_lab.models.generate.greedy_decode`)."""

    def __init__(self, prefix: KV | None = None, record: bool = False, detach: bool = True,
                 buffer: KV | None = None, length: int = 0):
        self.prefix = prefix or {}
        self.record = record
        self.detach = detach  # False: the recorded keys/values keep the graph (a later forward's gradient reaches them)
        self.buffer, self.length = buffer or {}, length
        self.kv: KV = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.buffer:  # decoding: columns 0..length-1 are cached, the new ones written after them
            bk, bv = self.buffer[layer_idx]
            end = self.length + key.shape[2]
            bk[:, :, self.length:end] = key
            bv[:, :, self.length:end] = value
            key, value = bk[:, :, :end], bv[:, :, :end]
        elif layer_idx in self.prefix:
            pk, pv = self.prefix[layer_idx]
            key = torch.cat([pk.to(key.device, key.dtype), key], dim=2)
            value = torch.cat([pv.to(value.device, value.dtype), value], dim=2)
        if self.record:
            self.kv[layer_idx] = (key.detach(), value.detach()) if self.detach else (key, value)
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:  # some HF code paths ask
        return 0 if layer_idx not in self.prefix else self.prefix[layer_idx][0].shape[2]


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, T] position ids that ignore left padding (what ``generate`` uses)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def attention_mask_4d(cols: torch.Tensor, key_valid: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [b, 1, q, k]: causal in absolute columns, padding, sliding window."""
    k = key_valid.shape[1]
    kidx = torch.arange(k, device=key_valid.device)
    c = cols.to(key_valid.device)
    allowed = kidx[None, :] <= c[:, None]
    if window:
        allowed = allowed & ((c[:, None] - kidx[None, :]) < window)
    allowed = allowed[None] & key_valid[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _rotary_device(model: HookedChatModel, default: torch.device) -> torch.device:
    """Where the rotary embedding's buffers live (``device_map`` may put it anywhere)."""
    rot = getattr(model.adapter.base, "rotary_emb", None)
    buf = next(rot.buffers(), None) if rot is not None else None
    return buf.device if buf is not None else default


def run_blocks(
    model: HookedChatModel,
    resid: torch.Tensor,
    *,
    run: HookRun,
    cols: torch.Tensor,
    position_ids: torch.Tensor,
    key_valid: torch.Tensor,
    kv: KVPrefix | None = None,
    start_layer: int = 0,
    stop_layer: int | None = None,
    keys_only: bool = False,
) -> torch.Tensor:
    """Run blocks ``start_layer..stop_layer-1`` on ``resid`` [b, q, d] at columns ``cols``.

    ``key_valid`` [b, k] marks real (non-pad) keys over all k = prefix + q columns; ``kv``
    supplies the cached key/value prefix (columns before ``cols[0]``) and/or records keys.
    ``keys_only``: the last block stops after its attention (which records its keys and values
    into ``kv``), for columns whose only use at that layer is to be attended to by later columns;
    what comes back is then that block's residual input (after its ``hook_resid_pre`` hooks).
    """
    a = model.adapter
    stop_layer = model.cfg.n_layers if stop_layer is None else stop_layer
    masks: dict[tuple, torch.Tensor] = {}
    rotary: dict[tuple, tuple] = {}
    real: dict[str, torch.Tensor | None] = {}  # per device: the flat indices of the real query columns (packed MLP)
    for l in range(start_layer, stop_layer):
        dev = a.ln1(l).weight.device
        if resid.device != dev:  # device_map: the residual follows the layers
            resid = resid.to(dev)
        if cols.device != dev:  # so hooks index this layer's activations with same-device columns
            cols = cols.to(dev)
        b = resid.shape[0]
        window = a.sliding_window(l)
        mkey = (window, b, str(dev))
        if mkey not in masks:
            masks[mkey] = attention_mask_4d(cols, key_valid.to(dev), window, resid.dtype)
        rkey = (a.rotary_key(l), b, str(dev))
        if rkey not in rotary:
            # the rotary module sits on one device (its inv_freq buffer); cos/sin go to this layer's
            rdev = _rotary_device(model, dev)
            rotary[rkey] = tuple(t.to(dev) for t in a.rotary(resid, position_ids.to(rdev), l))

        pre = f"blocks.{l}."
        resid = run.site(pre + "hook_resid_pre", l, resid, cols)
        x = a.ln1(l)(resid)
        if run.wants(pre + "ln1.hook_normalized"):
            x = run.site(pre + "ln1.hook_normalized", l, x, cols)
        attn = _attention(model, l, x, masks[mkey], rotary[rkey], kv, run, cols)
        if keys_only and l == stop_layer - 1:
            return resid
        post = a.attn_post_norm(l)
        attn_out = run.site(pre + "hook_attn_out", l, post(attn) if post is not None else attn, cols)
        mid = run.site(pre + "hook_resid_mid", l, resid + attn_out, cols)
        y = a.ln2(l)(mid)
        if run.wants(pre + "ln2.hook_normalized"):
            y = run.site(pre + "ln2.hook_normalized", l, y, cols)
        dkey = str(dev)
        if dkey not in real:
            real[dkey] = real_columns(key_valid.to(dev), resid)
        m = a.mlp(l)(y) if real[dkey] is None else packed(a.mlp(l), y, real[dkey])
        post = a.mlp_post_norm(l)
        mlp_out = run.site(pre + "hook_mlp_out", l, post(m) if post is not None else m, cols)
        resid = run.site(pre + "hook_resid_post", l, mid + mlp_out, cols)
    return resid


def real_columns(key_valid: torch.Tensor, resid: torch.Tensor) -> torch.Tensor | None:
    """The flat indices (into ``b * q``) of the query columns of ``resid`` [b, q, d] that are real
    tokens (the last ``q`` columns of ``key_valid`` [b, k]), or None when every one is real or when
    a forward-mode or ``torch.func`` derivative runs (their in-place-free path is the plain one).

    A padding column's MLP output is never read by a real token (its key is masked and its residual
    reaches no later column), so :func:`run_blocks` runs the MLP on the real columns only (about a
    quarter of a length-sorted instruction batch's columns are padding) and leaves zeros in the
    others: the real columns' values are those of the whole batch to rounding (matrix products of
    another row count), padding columns' residuals differ from Hugging Face's (which computes noise
    there)."""
    q = resid.shape[1]
    if q < 2 or under_transform(resid):
        return None
    valid = key_valid[:, -q:].reshape(-1)
    if bool(valid.all()):
        return None
    return valid.nonzero().flatten()


def packed(fn, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``fn`` (a token-wise module: an MLP) applied to the flat rows ``rows`` of ``x`` [b, q, d] only,
    as one [1, n, d] sequence; zeros elsewhere. Differentiable (out-of-place index ops)."""
    b, q, d = x.shape
    out = fn(x.reshape(b * q, d).index_select(0, rows)[None])[0]
    return out.new_zeros(b * q, out.shape[-1]).index_copy(0, rows, out).view(b, q, -1)


def head_result(o_proj_weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``attn.hook_result`` [b, q, h, d]: each head's ``attn.hook_z`` [b, q, h, dh] through its slice
    of the output projection's weight [d, h * dh] (no bias, before any post-norm)."""
    w = o_proj_weight.view(o_proj_weight.shape[0], z.shape[-2], z.shape[-1]).to(z.device)  # [d, h, dh]
    return torch.einsum("bqhe,dhe->bqhd", z, w)


def _attention(model: HookedChatModel, l, x, mask, rot, kv, run: HookRun, cols) -> torch.Tensor:
    """The HF attention module of layer ``l``, with ``attn.hook_z`` / ``attn.hook_result`` taken at
    the input of its output projection (a torch pre-hook, only while a site there is watched) and
    ``attn.hook_pattern`` inside its attention function (:mod:`refusal_lab.models.pattern`, only
    while watched)."""
    a = model.adapter
    attn = a.attn(l)
    zname, rname = f"blocks.{l}.attn.hook_z", f"blocks.{l}.attn.hook_result"
    handle = None
    if run.wants(zname) or run.wants(rname):
        n_heads, d_head = model.cfg.n_heads, model.cfg.d_head

        def pre_hook(module, args):
            (z_flat,) = args
            z = z_flat.view(*z_flat.shape[:-1], n_heads, d_head)
            z = run.site(zname, l, z, cols)
            if run.wants(rname):
                run.site(rname, l, head_result(module.weight, z), cols)
            return (z.reshape(z_flat.shape),)

        handle = a.o_proj(l).register_forward_pre_hook(pre_hook)
    pname = f"blocks.{l}.attn.hook_pattern"
    try:
        if run.wants(pname):
            site = lambda p: run.site(pname, l, p, cols)  # noqa: E731
            with watching(attn, site) as extra:
                out, _ = attn(hidden_states=x, position_embeddings=rot, attention_mask=mask, cache=kv, **extra)
        else:
            out, _ = attn(hidden_states=x, position_embeddings=rot, attention_mask=mask, cache=kv)
    finally:
        if handle is not None:
            handle.remove()
    return out
