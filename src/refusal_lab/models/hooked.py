"""A TransformerLens-like view of a Hugging Face chat model, with sites that mean what TL means.

:class:`HookedChatModel` runs the decoder-block loop itself (through the adapter's modules), so
that every site is a named point of that loop:

=====================================  ======================================================
site                                    meaning (shape)
=====================================  ======================================================
``hook_embed``                          what enters block 0 (Gemma: scaled by sqrt(d)) [b,p,d]
``blocks.{l}.hook_resid_pre``           residual stream before block l [b,p,d]
``blocks.{l}.ln1.hook_normalized``      input of attention [b,p,d]
``blocks.{l}.attn.hook_z``              per-head input of the output projection [b,p,h,dh]
``blocks.{l}.attn.hook_result``         each head's share of the attention output, before any
                                        post-norm, without ``o_proj`` bias [b,p,h,d] (read only)
``blocks.{l}.hook_attn_out``            what attention adds to the residual (after Gemma's
                                        post-attention norm) [b,p,d]
``blocks.{l}.hook_resid_mid``           resid_pre + attn_out [b,p,d]
``blocks.{l}.ln2.hook_normalized``      input of the MLP [b,p,d]
``blocks.{l}.hook_mlp_out``             what the MLP adds (after Gemma's post-MLP norm) [b,p,d]
``blocks.{l}.hook_resid_post``          resid_mid + mlp_out = next resid_pre [b,p,d]
``ln_final.hook_normalized``            final norm output, the unembedding's input [b,p,d]
=====================================  ======================================================

Hooks are TransformerLens-style callables ``fn(activation, hook) -> activation | None``; ``hook``
carries ``name``, ``layer`` and ``cols`` (the absolute token columns present in this call, which
matters for the prefix-cached runs of the patching engine and generation). The loop can also start
at any layer from a given residual and reuse a cached key/value prefix: that is what lets the
patching engine recompute only the cone a patch can influence.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from refusal_lab.errors import SiteError
from refusal_lab.models.adapters import Adapter, get_adapter

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]

BLOCK_SITES = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "hook_mlp_out",
    "hook_resid_post",
)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass
class HookPoint:
    """What a hook function is told about the activation it receives."""

    name: str
    layer: int | None
    cols: torch.Tensor  # [q] absolute token columns of this activation's position axis

    def col_mask(self, positions: Sequence[int] | torch.Tensor | None) -> torch.Tensor | None:
        """Bool [q]: which of this call's columns are in ``positions`` (None = all)."""
        if positions is None:
            return None
        pos = torch.as_tensor(positions, device=self.cols.device).reshape(-1)
        return torch.isin(self.cols, pos)


@dataclass
class ModelConfig:
    """The shape of the model, with TransformerLens's field names."""

    model_name: str
    model_type: str
    n_layers: int
    n_heads: int
    n_key_value_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    dtype: str
    device: str
    has_post_norms: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ActivationCache(dict):
    """``cache[site_name]`` -> tensor, plus TL-like helpers."""

    def stack(self, site: str, n_layers: int) -> torch.Tensor:
        """[layer, ...] stack of ``blocks.{l}.{site}`` for every layer (on layer 0's device: with a
        ``device_map`` the layers' activations live on different devices)."""
        first = self[f"blocks.0.{site}"]
        return torch.stack([self[f"blocks.{l}.{site}"].to(first.device) for l in range(n_layers)])


@dataclass
class _Run:
    """Per-forward state: hook functions by site, what to cache, recorded key/values."""

    hooks: dict[str, list[HookFn]] = field(default_factory=dict)
    cache: ActivationCache | None = None
    cache_filter: Callable[[str], bool] | None = None
    detach: bool = True

    def wants(self, name: str) -> bool:
        return name in self.hooks or (self.cache is not None and self.cache_filter(name))

    def site(self, name: str, layer: int | None, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        fns = self.hooks.get(name)
        if fns:
            point = HookPoint(name, layer, cols)
            for fn in fns:
                out = fn(x, point)
                if out is not None:
                    if out.shape != x.shape:
                        raise SiteError(
                            f"The hook on '{name}' returned shape {tuple(out.shape)} but the site has "
                            f"shape {tuple(x.shape)}; return a tensor of the same shape."
                        )
                    x = out
        if self.cache is not None and self.cache_filter(name):
            self.cache[name] = x.detach() if self.detach else x
        return x


class KVPrefix:
    """Duck-typed HF cache for one forward: prepends a cached key/value prefix per layer and/or
    records the full keys/values. HF attention modules only call ``update`` on it."""

    def __init__(self, prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None, record: bool = False):
        self.prefix = prefix or {}
        self.record = record
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.prefix:
            pk, pv = self.prefix[layer_idx]
            key = torch.cat([pk.to(key.device, key.dtype), key], dim=2)
            value = torch.cat([pv.to(value.device, value.dtype), value], dim=2)
        if self.record:
            self.kv[layer_idx] = (key.detach(), value.detach())
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:  # some HF code paths ask
        return 0 if layer_idx not in self.prefix else self.prefix[layer_idx][0].shape[2]


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, T] position ids that ignore left padding (what ``generate`` uses)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


class HookedChatModel(nn.Module):
    """A Hugging Face causal LM with TransformerLens site names, hooks, caching and cone runs."""

    def __init__(self, hf_model: nn.Module, tokenizer=None, name: str | None = None, adapter: Adapter | None = None):
        super().__init__()
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.adapter = adapter or get_adapter(hf_model)
        a = self.adapter
        p = next(hf_model.parameters())
        self.cfg = ModelConfig(
            model_name=name or getattr(hf_model.config, "_name_or_path", "") or a.config.model_type,
            model_type=a.config.model_type,
            n_layers=a.n_layers,
            n_heads=a.n_heads,
            n_key_value_heads=a.n_kv_heads,
            d_model=a.d_model,
            d_head=a.d_head,
            d_vocab=a.d_vocab,
            dtype=str(p.dtype).replace("torch.", ""),
            device=str(p.device),
            has_post_norms=a.post_attn_norm is not None,
        )
        self._ctx_hooks: list[tuple[str, HookFn]] = []

    # ------------------------------------------------------------------ names and checks
    @property
    def device(self) -> torch.device:
        return self.adapter.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.embed_tokens.weight.dtype

    def hook_names(self) -> list[str]:
        names = ["hook_embed"]
        for l in range(self.cfg.n_layers):
            names += [f"blocks.{l}.{s}" for s in BLOCK_SITES]
        return names + ["ln_final.hook_normalized"]

    def check_site(self, name: str) -> tuple[int | None, str]:
        """(layer, site) of a valid site name; a SiteError naming the problem otherwise."""
        if name in ("hook_embed", "ln_final.hook_normalized"):
            return None, name
        m = _BLOCK_RE.match(name)
        if not m or m.group(2) not in BLOCK_SITES:
            raise SiteError(
                f"'{name}' is not a site of this model; sites are hook_embed, "
                f"blocks.{{l}}.{{{', '.join(BLOCK_SITES)}}} and ln_final.hook_normalized."
            )
        layer = int(m.group(1))
        if not 0 <= layer < self.cfg.n_layers:
            raise SiteError(f"Layer {layer} is out of range: this model has layers 0..{self.cfg.n_layers - 1}.")
        return layer, m.group(2)

    def check_head(self, head: int) -> int:
        if not 0 <= int(head) < self.cfg.n_heads:
            raise SiteError(f"Head {head} is out of range: this model has heads 0..{self.cfg.n_heads - 1}.")
        return int(head)

    # ------------------------------------------------------------------ hook management
    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str, HookFn]]):
        """Context manager: every forward inside it applies ``fwd_hooks`` ([(site, fn), ...])."""
        added = list(fwd_hooks)
        for name, _ in added:
            self.check_site(name)
        self._ctx_hooks.extend(added)
        try:
            yield self
        finally:
            for item in added:
                self._ctx_hooks.remove(item)

    def _make_run(self, fwd_hooks, names, detach=True) -> _Run:
        run = _Run(detach=detach)
        for name, fn in [*self._ctx_hooks, *(fwd_hooks or [])]:
            self.check_site(name)
            run.hooks.setdefault(name, []).append(fn)
        if names is not None:
            run.cache = ActivationCache()
            if names is True:
                run.cache_filter = lambda n: True
            elif callable(names):
                run.cache_filter = names
            else:
                wanted = {names} if isinstance(names, str) else set(names)
                for n in wanted:
                    self.check_site(n)
                run.cache_filter = wanted.__contains__
        return run

    # ------------------------------------------------------------------ public forwards
    def to_tokens(self, prompts: str | list[str], chat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (input_ids, attention_mask); with ``chat`` each prompt is a user turn."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if chat:
            prompts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        logits: str = "all",
    ) -> torch.Tensor:
        """Logits [b, T, vocab] (``logits='last'``: [b, vocab]) with hooks applied."""
        return self._run_full(input_ids, attention_mask, self._make_run(fwd_hooks, None), logits)[0]

    def run_with_hooks(self, input_ids, attention_mask=None, *, fwd_hooks=(), logits: str = "all"):
        return self.forward(input_ids, attention_mask, fwd_hooks=fwd_hooks, logits=logits)

    def run_with_cache(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        names: Iterable[str] | str | Callable[[str], bool] | bool = True,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        logits: str = "all",
        detach: bool = True,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """(logits, cache) like TransformerLens; ``names`` filters the cached sites."""
        run = self._make_run(fwd_hooks, names, detach=detach)
        out, _ = self._run_full(input_ids, attention_mask, run, logits)
        return out, run.cache

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        stop_at_eos: bool = True,
    ) -> torch.Tensor:
        """Greedy continuation [b, new] with hooks applied to the prompt and every new token.

        Hooks see absolute columns: the prompt has columns 0..T-1, new tokens T, T+1, ...
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        run = self._make_run(fwd_hooks, None)
        b, T = input_ids.shape
        kv = KVPrefix(record=True)
        pos = default_position_ids(attention_mask)
        cols = torch.arange(T, device=input_ids.device)
        resid = self._embed(input_ids, run, cols)
        resid = self.blocks(resid, run=run, cols=cols, position_ids=pos, key_valid=attention_mask.bool(), kv=kv)
        logits = self._final(resid[:, -1:], run, cols[-1:])[:, -1]
        eos = self._eos_ids()
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out = []
        key_valid = attention_mask.bool()
        last_pos = pos[:, -1]
        for t in range(max_new_tokens):
            nxt = logits.argmax(-1).to(input_ids.device)  # lm_head may sit on another device
            if stop_at_eos and eos:
                nxt = torch.where(done, torch.as_tensor(eos[0], device=nxt.device), nxt)
            out.append(nxt)
            if stop_at_eos and eos:
                done |= torch.isin(nxt, torch.as_tensor(eos, device=nxt.device))
                if bool(done.all()):
                    break
            if t == max_new_tokens - 1:
                break
            col = torch.tensor([T + t], device=input_ids.device)
            last_pos = last_pos + 1
            key_valid = torch.cat([key_valid, torch.ones(b, 1, dtype=torch.bool, device=key_valid.device)], 1)
            kv = KVPrefix(prefix=kv.kv, record=True)
            resid = self._embed(nxt[:, None], run, col)
            resid = self.blocks(resid, run=run, cols=col, position_ids=last_pos[:, None], key_valid=key_valid, kv=kv)
            logits = self._final(resid, run, col)[:, -1]
        return torch.stack(out, 1)

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen = getattr(self.hf_model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if src is None:
                continue
            ids += list(src) if isinstance(src, (list, tuple)) else [src]
        return list(dict.fromkeys(ids))

    # ------------------------------------------------------------------ the loop
    def _run_full(self, input_ids, attention_mask, run: _Run, logits: str, kv: KVPrefix | None = None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        T = input_ids.shape[1]
        cols = torch.arange(T, device=input_ids.device)
        resid = self._embed(input_ids, run, cols)
        resid = self.blocks(
            resid, run=run, cols=cols, position_ids=default_position_ids(attention_mask),
            key_valid=attention_mask.bool(), kv=kv,
        )
        if logits == "none":
            return None, resid
        if logits == "last":
            return self._final(resid[:, -1:], run, cols[-1:])[:, -1], resid
        return self._final(resid, run, cols), resid

    def _embed(self, input_ids: torch.Tensor, run: _Run, cols: torch.Tensor) -> torch.Tensor:
        dev = self.adapter.embed_tokens.weight.device
        return run.site("hook_embed", None, self.adapter.embed(input_ids.to(dev)), cols.to(dev))

    def _rotary_device(self, default: torch.device) -> torch.device:
        """Where the rotary embedding's buffers live (``device_map`` may put it anywhere)."""
        rot = getattr(self.adapter.base, "rotary_emb", None)
        buf = next(rot.buffers(), None) if rot is not None else None
        return buf.device if buf is not None else default

    def _final(self, resid: torch.Tensor, run: _Run, cols: torch.Tensor, vocab_rows=None) -> torch.Tensor:
        a = self.adapter
        resid = resid.to(a.final_norm.weight.device)
        normed = run.site("ln_final.hook_normalized", None, a.final_norm(resid), cols.to(resid.device))
        return a.final_logits(normed.to(a.lm_head.weight.device), vocab_rows)

    def attention_mask_4d(
        self, cols: torch.Tensor, key_valid: torch.Tensor, window: int | None, dtype: torch.dtype
    ) -> torch.Tensor:
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

    def blocks(
        self,
        resid: torch.Tensor,
        *,
        run: _Run,
        cols: torch.Tensor,
        position_ids: torch.Tensor,
        key_valid: torch.Tensor,
        kv: KVPrefix | None = None,
        start_layer: int = 0,
        stop_layer: int | None = None,
        on_layer_start: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run blocks ``start_layer..stop_layer-1`` on ``resid`` [b, q, d] at columns ``cols``.

        ``key_valid`` [b, k] marks real (non-pad) keys over all k = prefix + q columns; ``kv``
        supplies the cached key/value prefix (columns before ``cols[0]``) and/or records keys.
        ``on_layer_start(l, resid)`` may return a new residual (rows joining a cone run).
        """
        a = self.adapter
        stop_layer = self.cfg.n_layers if stop_layer is None else stop_layer
        masks: dict[tuple, torch.Tensor] = {}
        rotary: dict[tuple, tuple] = {}
        for l in range(start_layer, stop_layer):
            if on_layer_start is not None:
                resid = on_layer_start(l, resid)
            dev = a.ln1(l).weight.device
            if resid.device != dev:  # device_map: the residual follows the layers
                resid = resid.to(dev)
            if cols.device != dev:  # so hooks index this layer's activations with same-device columns
                cols = cols.to(dev)
            b = resid.shape[0]
            window = a.sliding_window(l)
            mkey = (window, b, str(dev))
            if mkey not in masks:
                masks[mkey] = self.attention_mask_4d(cols, key_valid.to(dev), window, resid.dtype)
            rkey = (a.rotary_key(l), b, str(dev))
            if rkey not in rotary:
                # the rotary module sits on one device (its inv_freq buffer); cos/sin go to this layer's
                rdev = self._rotary_device(dev)
                rotary[rkey] = tuple(t.to(dev) for t in a.rotary(resid, position_ids.to(rdev), l))

            pre = f"blocks.{l}."
            resid = run.site(pre + "hook_resid_pre", l, resid, cols)
            x = a.ln1(l)(resid)
            if run.wants(pre + "ln1.hook_normalized"):
                x = run.site(pre + "ln1.hook_normalized", l, x, cols)
            attn = self._attention(l, x, masks[mkey], rotary[rkey], kv, run, cols)
            post = a.attn_post_norm(l)
            attn_out = run.site(pre + "hook_attn_out", l, post(attn) if post is not None else attn, cols)
            mid = run.site(pre + "hook_resid_mid", l, resid + attn_out, cols)
            y = a.ln2(l)(mid)
            if run.wants(pre + "ln2.hook_normalized"):
                y = run.site(pre + "ln2.hook_normalized", l, y, cols)
            m = a.mlp(l)(y)
            post = a.mlp_post_norm(l)
            mlp_out = run.site(pre + "hook_mlp_out", l, post(m) if post is not None else m, cols)
            resid = run.site(pre + "hook_resid_post", l, mid + mlp_out, cols)
        return resid

    def _attention(self, l, x, mask, rot, kv, run: _Run, cols) -> torch.Tensor:
        a = self.adapter
        attn = a.attn(l)
        zname, rname = f"blocks.{l}.attn.hook_z", f"blocks.{l}.attn.hook_result"
        handle = None
        if run.wants(zname) or run.wants(rname):
            n_heads, d_head = self.cfg.n_heads, self.cfg.d_head

            def pre_hook(module, args):
                (z_flat,) = args
                z = z_flat.view(*z_flat.shape[:-1], n_heads, d_head)
                z = run.site(zname, l, z, cols)
                if run.wants(rname):
                    w = module.weight.view(module.weight.shape[0], n_heads, d_head)  # [d, h, dh]
                    run.site(rname, l, torch.einsum("bqhe,dhe->bqhd", z, w), cols)
                return (z.reshape(z_flat.shape),)

            handle = a.o_proj(l).register_forward_pre_hook(pre_hook)
        try:
            out, _ = attn(hidden_states=x, position_embeddings=rot, attention_mask=mask, cache=kv)
        finally:
            if handle is not None:
                handle.remove()
        return out

    # ------------------------------------------------------------------ derived quantities
    def head_results(self, cache: ActivationCache, layer: int, after_post_norm: bool = True) -> torch.Tensor:
        """Each head's contribution to ``hook_attn_out`` [b, p, h, d].

        Without a post-norm this is ``attn.hook_result``. With Gemma's post-attention RMSNorm,
        ``attn_out = g * raw / rms(raw)`` is linear in ``raw`` once the per-position scale
        ``g / rms(raw)`` is fixed, so head h contributes ``g * result_h / rms(raw)`` and the heads
        sum to ``attn_out`` minus the (scaled) ``o_proj`` bias.
        """
        result = cache[f"blocks.{layer}.attn.hook_result"]
        norm = self.adapter.attn_post_norm(layer)
        if norm is None or not after_post_norm:
            return result
        result = result.to(norm.weight.device)
        bias = self.adapter.o_proj(layer).bias
        raw = result.sum(-2) + (bias.to(result.device) if bias is not None else 0)
        return result * self.post_norm_scale(norm, raw)[..., None, :]

    def post_norm_scale(self, norm: nn.Module, raw: torch.Tensor) -> torch.Tensor:
        """g / rms(raw) [..., d]: the per-position linear map an RMSNorm applies to ``raw``."""
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
        rms = torch.rsqrt(raw.float().pow(2).mean(-1, keepdim=True) + eps)
        return (self.adapter.ln_scale_weight(norm).float() * rms).to(raw.dtype)

    @property
    def W_U(self) -> torch.Tensor:
        """[d_model, d_vocab] unembedding, TL orientation."""
        return self.adapter.lm_head.weight.T
