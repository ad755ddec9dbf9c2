"""A TransformerLens-like view of a Hugging Face chat model, with sites that mean what TL means.

:class:`HookedChatModel` runs the decoder-block loop itself (through the adapter's modules), so
that every site is a named point of that loop:

=====================================  ======================================================
site                                    meaning (shape)
=====================================  ======================================================
``hook_embed``                          what enters block 0 (Gemma: scaled by sqrt(d)) [b,p,d]
``blocks.{l}.hook_resid_pre``           residual stream before block l [b,p,d]
``blocks.{l}.ln1.hook_normalized``      input of attention [b,p,d]
``blocks.{l}.attn.hook_pattern``        post-softmax attention probabilities, HF eager semantics
                                        (GQA repeated per query head, soft-cap, causal, padding
                                        and sliding-window masks) [b,h,q,k]; computed only when
                                        watched; a hook may edit it
                                        (:mod:`refusal_lab.models.pattern`)
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
matters for the prefix-cached runs of the patching engine and generation).

Every prompt forward is one call of :meth:`HookedChatModel.prefill` (embed -> blocks -> final norm
and unembedding, with hooks, an optional cached key/value prefix, logits at every or the last
column): ``forward``, ``run_with_cache``, ``generate`` (:mod:`refusal_lab.models.generate`) and the
patching engine's receiving run use it. :meth:`HookedChatModel.blocks` runs a range of layers from
a given residual (:mod:`refusal_lab.models.forward`), which lets the patching engine recompute only
the cone a patch can influence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from refusal_lab.errors import SiteError
from refusal_lab.models.adapters import Adapter, get_adapter
from refusal_lab.models.cpu_linear import use_onednn_linear
from refusal_lab.models.forward import KV, KVPrefix, default_position_ids, run_blocks
from refusal_lab.models.generate import greedy_generate
from refusal_lab.models.sites import BLOCK_SITES, ActivationCache, HookFn, HookPoint, HookRun, parse_site

__all__ = ["ActivationCache", "BLOCK_SITES", "HookFn", "HookPoint", "HookedChatModel", "ModelConfig", "Prefill",
           "gradient_hooks"]

CacheNames = Iterable[str] | str | Callable[[str], bool] | bool


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


@dataclass
class Prefill:
    """What one :meth:`HookedChatModel.prefill` returns."""

    logits: torch.Tensor | None  # [b, q, vocab] ('all'), [b, vocab] ('last') or None ('none')
    resid: torch.Tensor  # [b, q, d] residual stream after the last block (before the final norm)
    cache: ActivationCache | None  # the cached sites (when ``names`` was given)
    kv: KV  # every layer's keys/values over prefix + q columns (when ``record_kv``), else {}


class HookedChatModel(nn.Module):
    """A Hugging Face causal LM with TransformerLens site names, hooks, caching and cone runs."""

    def __init__(self, hf_model: nn.Module, tokenizer=None, name: str | None = None, adapter: Adapter | None = None):
        super().__init__()
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.adapter = adapter or get_adapter(hf_model)
        use_onednn_linear(hf_model)  # fp32 CPU products through oneDNN (2x on AMD Zen; equal to rounding)
        self._greedy_head: tuple | None = None  # (weight identity, CertifiedArgmax), built on first use
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
        return parse_site(name, self.cfg.n_layers)

    def check_head(self, head: int) -> int:
        if not 0 <= int(head) < self.cfg.n_heads:
            raise SiteError(f"Head {head} is out of range: this model has heads 0..{self.cfg.n_heads - 1}.")
        return int(head)

    def eos_ids(self) -> list[int]:
        """The ids that end a reply: the generation config's eos ids, then the tokenizer's (no duplicates)."""
        ids: list[int] = []
        gen = getattr(self.hf_model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if src is None:
                continue
            ids += list(src) if isinstance(src, (list, tuple)) else [src]
        return list(dict.fromkeys(ids))

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

    def _make_run(self, fwd_hooks, names: CacheNames | None, detach: bool = True) -> HookRun:
        run = HookRun(detach=detach)
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

    # ------------------------------------------------------------------ forwards
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

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        names: CacheNames | None = None,
        detach: bool = True,
        kv_prefix: KV | None = None,
        record_kv: bool = False,
        position_ids: torch.Tensor | None = None,
        logits: str = "all",
        start_layer: int = 0,
        stop_layer: int | None = None,
        resid: torch.Tensor | None = None,
        kv_buffer: tuple[KV, int] | None = None,
    ) -> Prefill:
        """The one prompt forward: embed ``input_ids`` [b, q], run every block, final norm and unembedding.

        Hooks (``fwd_hooks`` and those of an enclosing :meth:`hooks`) apply at every site; ``names``
        caches sites (a name, names, a filter or True for all; ``detach=False`` keeps the graph, in the
        cached sites and in the keys/values of ``record_kv``).
        With ``kv_prefix`` (the ``kv`` of an earlier prefill with ``record_kv``) the tokens continue
        that prefix: they sit at columns P..P+q-1 after its P columns and attend over its keys and
        values; ``attention_mask`` [b, P + q] (default: all real) then covers prefix and tokens, and
        ``position_ids`` [b, q] default to the mask's (left padding ignored). ``logits``: 'all' columns, the 'last'
        one, 'greedy' (the last column's greedy token ids [b] instead of logits, :meth:`greedy_tokens`)
        or 'none' (no final norm: ``resid`` is what a caller wants).

        ``stop_layer`` (with ``logits='none'``) ends the forward before that block: ``resid`` is then
        what enters it, and ``kv`` holds the blocks run. ``start_layer`` with ``resid`` (what enters
        that block, e.g. an earlier prefill's with that ``stop_layer``) runs only the blocks from it
        on, so several edits at or above one layer share the computation below it; merging the two
        prefills' ``kv`` gives every layer's, bit for bit those of one whole forward.

        ``kv_buffer = (buffers, n)`` instead of ``kv_prefix``: per layer, keys/values with room for
        more columns whose first ``n`` are the prefix; this forward's keys and values are written
        into them in place after those (:class:`~refusal_lab.models.forward.KVPrefix`), and ``kv``
        holds views of the buffers' first ``n + q`` columns."""
        if logits not in ("all", "last", "none", "greedy"):
            raise ValueError(f"logits must be 'all', 'last', 'greedy' or 'none', not {logits!r}.")
        n_layers = self.cfg.n_layers
        stop = n_layers if stop_layer is None else int(stop_layer)
        if not 0 <= start_layer <= stop <= n_layers:
            raise ValueError(f"Need 0 <= start_layer <= stop_layer <= {n_layers}, got {start_layer} and {stop}.")
        if stop < n_layers and logits != "none":
            raise ValueError("A forward that stops before the last block has no logits; pass logits='none'.")
        if (resid is None) != (start_layer == 0):
            raise ValueError("Give resid (what enters start_layer) exactly when start_layer > 0.")
        if kv_buffer is not None and kv_prefix is not None:
            raise ValueError("Give kv_prefix or kv_buffer, not both.")
        if attention_mask is None:  # every prefix and token column is real
            prefix = (kv_buffer[1] if kv_buffer is not None else
                      next(iter(kv_prefix.values()))[0].shape[2] if kv_prefix else 0)
            attention_mask = torch.ones(input_ids.shape[0], prefix + input_ids.shape[1], dtype=input_ids.dtype,
                                        device=input_ids.device)
        run = self._make_run(fwd_hooks, names, detach=detach)
        q, k = input_ids.shape[1], attention_mask.shape[1]
        cols = torch.arange(k - q, k, device=input_ids.device)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)[:, k - q:]
        if kv_buffer is not None:
            kv = KVPrefix(record=record_kv, detach=detach, buffer=kv_buffer[0], length=kv_buffer[1])
        else:
            kv = KVPrefix(prefix=kv_prefix, record=record_kv, detach=detach) if kv_prefix is not None or record_kv else None
        a = self.adapter
        dev = a.embed_tokens.weight.device
        if start_layer == 0:
            resid = run.site("hook_embed", None, a.embed(input_ids.to(dev)), cols.to(dev))
        resid = self.blocks(resid, run=run, cols=cols, position_ids=position_ids, key_valid=attention_mask.bool(), kv=kv,
                            start_layer=start_layer, stop_layer=stop)
        out = None
        if logits != "none":
            at = slice(None) if logits == "all" else slice(-1, None)
            final = resid[:, at].to(a.final_norm.weight.device)
            normed = run.site("ln_final.hook_normalized", None, a.final_norm(final), cols[at].to(final.device))
            if logits == "greedy":
                out = self.greedy_tokens(normed[:, -1])
            else:
                out = a.final_logits(normed.to(a.lm_head.weight.device))
                if logits == "last":
                    out = out[:, -1]
        return Prefill(out, resid, run.cache, kv.kv if kv is not None else {})

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        logits: str = "all",
    ) -> torch.Tensor:
        """Logits [b, T, vocab] (``logits='last'``: [b, vocab]) with hooks applied."""
        return self.prefill(input_ids, attention_mask, fwd_hooks=fwd_hooks, logits=logits).logits

    def run_with_cache(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        names: CacheNames = True,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        logits: str = "all",
        detach: bool = True,
    ) -> tuple[torch.Tensor | None, ActivationCache]:
        """(logits, cache) like TransformerLens; ``names`` filters the cached sites."""
        out = self.prefill(input_ids, attention_mask, fwd_hooks=fwd_hooks, names=names, detach=detach, logits=logits)
        return out.logits, out.cache

    #: greedy continuation [b, new] with hooks on the prompt and every new token (absolute columns:
    #: the prompt has 0..T-1, new tokens T, T+1, ...): :func:`refusal_lab.models.generate.greedy_generate`
    generate = greedy_generate
    #: run a range of layers from a given residual at given columns, over an optional key/value
    #: prefix (the patching engine's cone runs): :func:`refusal_lab.models.forward.run_blocks`
    blocks = run_blocks

    # ------------------------------------------------------------------ derived quantities
    def greedy_tokens(self, normed: torch.Tensor) -> torch.Tensor:
        """The greedy token ids [b] of ``ln_final`` outputs [b, d]: ``argmax`` of the logits, through
        :class:`~refusal_lab.models.greedy_head.CertifiedArgmax` where it applies (float32 on a CPU
        with native bfloat16: the unembedding bounded in bfloat16, float32 logits of the tokens that
        can still win; the same tokens to float32 rounding)."""
        from refusal_lab.models.greedy_head import CertifiedArgmax

        a = self.adapter
        w = a.lm_head.weight
        if CertifiedArgmax.applicable(a):
            key = (w.data_ptr(), w._version, tuple(w.shape))  # rebuilt if the weights were edited
            if self._greedy_head is None or self._greedy_head[0] != key:
                self._greedy_head = (key, CertifiedArgmax(w))
            return self._greedy_head[1](normed.to(w.device))
        return a.final_logits(normed.to(w.device)).argmax(-1)

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
        a = self.adapter
        return (a.ln_scale_weight(norm).float() * a.rms_scale(norm, raw)).to(raw.dtype)

    @property
    def W_U(self) -> torch.Tensor:
        """[d_model, d_vocab] unembedding, TL orientation."""
        return self.adapter.lm_head.weight.T


def gradient_hooks(sites) -> tuple[list[tuple[str, HookFn]], dict[str, torch.Tensor]]:
    """Hooks that start the autograd graph at ``hook_embed`` and keep every site of ``sites`` with
    its gradient retained, and the dict they fill (name -> activation; after ``backward`` each
    activation's ``.grad`` is the gradient of the metric w.r.t. an additive change at that site)."""
    acts: dict[str, torch.Tensor] = {}

    def start_graph(x, hook):
        return x.detach().requires_grad_(True)

    def keep(x, hook):
        x.retain_grad()
        acts[hook.name] = x
        return None

    return [("hook_embed", start_graph)] + [(s, keep) for s in sites], acts
