"""Difference-in-means steering vectors (Arditi et al. 2024), per site, layer and eoi position.

All means are accumulated in float64. ``position`` is a column index of the left-padded prompt
tensors that :func:`refusal_lab.prompts.build_instruction_prompts` returns; negative values count
from the end, which is meaningful because left padding aligns every prompt's last tokens (the
chat template's end-of-instruction tokens) in the same columns.

    v = diff_in_means(model, hf_ids, hf_mask, hl_ids, hl_mask, layer=12, position=-1)
    save_vector("run/refusal_dir.safetensors", v, {"model": model.cfg.model_name, "layer": 12})
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from refusal_lab.artifacts import load_tensors, save_tensors
from refusal_lab.errors import PromptError, SiteError
from refusal_lab.models.forward import head_result
from refusal_lab.steering.batching import tensor_batches

__all__ = [
    "cached_diff_in_means",
    "cached_head_vector",
    "diff_in_means",
    "diff_in_means_all_layers",
    "head_vector",
    "load_vector",
    "mean_activations",
    "save_vector",
]


class _Stop(Exception):
    """Raised by a hook to end a forward once every wanted site has been read."""


def _site_name(layer: int, site: str) -> str:
    return site if site == "hook_embed" or site.startswith("blocks.") or site.startswith("ln_final") else f"blocks.{layer}.{site}"


def _columns(positions: Sequence[int], T: int) -> list[int]:
    cols = []
    for p in positions:
        c = int(p) + T if int(p) < 0 else int(p)
        if not 0 <= c < T:
            raise PromptError(f"Position {p} is outside the prompt columns 0..{T - 1} (or -{T}..-1).")
        cols.append(c)
    return cols


def _check_pair(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise PromptError(f"Expected token ids of shape [n, T] with n >= 1, got {tuple(ids.shape)}.")
    if mask is None:
        mask = torch.ones_like(ids)
    if mask.shape != ids.shape:
        raise PromptError(f"The mask has shape {tuple(mask.shape)} but the ids have {tuple(ids.shape)}.")
    return mask


@torch.no_grad()
def mean_activations(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    sites: Sequence[str],
    positions: Sequence[int] = (-1,),
    batch_size: int = 16,
    fwd_hooks: Sequence = (),
    bar=None,
) -> torch.Tensor:
    """Mean over prompts of each site's activation at each column: float64 [n_sites, n_pos, ...].

    The forward stops as soon as the last requested site has been read (cheap for early layers).
    ``bar`` (a tqdm bar or anything with ``update``) advances by one per batch.
    """
    mask = _check_pair(ids, mask)
    sites = list(sites)
    for s in sites:
        model.check_site(s)
    cols = _columns(positions, ids.shape[1])
    order = model.hook_names()
    last_site = max(sites, key=order.index)
    total: list[torch.Tensor | None] = [None] * len(sites)
    for batch_ids, batch_mask in tensor_batches(ids, mask, batch_size, model.device):
        got: dict[str, torch.Tensor] = {}

        def make(name):
            def read(act, hook):
                got[name] = act[:, cols].detach().to(torch.float64).sum(0).cpu()
                if name == last_site:
                    raise _Stop
            return read

        hooks = [(s, make(s)) for s in sites]
        try:
            model(batch_ids, batch_mask, fwd_hooks=[*fwd_hooks, *hooks], logits="last")
        except _Stop:
            pass
        for i, s in enumerate(sites):
            total[i] = got[s] if total[i] is None else total[i] + got[s]
        if bar is not None:
            bar.update(1)
    return torch.stack(total) / ids.shape[0]


def diff_in_means_all_layers(
    model,
    harmful_ids: torch.Tensor,
    harmful_mask: torch.Tensor | None,
    harmless_ids: torch.Tensor,
    harmless_mask: torch.Tensor | None,
    positions: Sequence[int] = (-1,),
    site: str = "hook_resid_pre",
    batch_size: int = 16,
    layers: Sequence[int] | None = None,
    bar=None,
) -> torch.Tensor:
    """Difference in means at every layer and candidate column, one forward per batch: float64
    [L, n_pos, d] (``L`` = len(layers), default every layer). Use the eoi columns as candidates:
    ``positions=range(-len(eoi_tokens(tok)), 0)``. ``bar`` advances by one per batch
    (``ceil(n_harmful / batch_size) + ceil(n_harmless / batch_size)``)."""
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [_site_name(l, site) for l in layers]
    a = mean_activations(model, harmful_ids, harmful_mask, names, list(positions), batch_size, bar=bar)
    b = mean_activations(model, harmless_ids, harmless_mask, names, list(positions), batch_size, bar=bar)
    return a - b


def diff_in_means(model, harmful_ids: torch.Tensor, harmful_mask: torch.Tensor | None, harmless_ids: torch.Tensor,
                  harmless_mask: torch.Tensor | None, layer: int, position: int = -1, site: str = "hook_resid_pre",
                  batch_size: int = 16, bar=None) -> torch.Tensor:
    """mean(harmful) - mean(harmless) of ``blocks.{layer}.{site}`` at column ``position``: float64 [d]
    (:func:`diff_in_means_all_layers` at one layer and column)."""
    return diff_in_means_all_layers(model, harmful_ids, harmful_mask, harmless_ids, harmless_mask, [position], site,
                                    batch_size, [layer], bar)[0, 0]


@torch.no_grad()
def _mean_head_sum(model, ids, mask, heads, col_pos, batch_size) -> torch.Tensor:
    mask = _check_pair(ids, mask)
    col = _columns([col_pos], ids.shape[1])[0]
    layers = sorted({l for l, _ in heads})
    names = [f"blocks.{l}.attn.hook_result" for l in layers]
    total = None
    for batch_ids, batch_mask in tensor_batches(ids, mask, batch_size, model.device):
        _, cache = model.run_with_cache(batch_ids, batch_mask, names=names, logits="none")
        s = 0
        for l in layers:
            hs = [h for ll, h in heads if ll == l]
            res = model.head_results(cache, l)[:, col]  # [b, h, d], after any post-norm
            s = s + res[:, hs].to(torch.float64).sum(1).cpu()  # layers may sit on different devices
        s = s.sum(0)
        total = s if total is None else total + s
    return total / ids.shape[0]


def head_vector(
    model,
    harmful_ids: torch.Tensor,
    harmful_mask: torch.Tensor | None,
    harmless_ids: torch.Tensor,
    harmless_mask: torch.Tensor | None,
    heads: Sequence[tuple[int, int]],
    position: int = -1,
    batch_size: int = 16,
) -> torch.Tensor:
    """Summed residual contributions of ``heads`` [(layer, head), ...] at ``position``, harmful mean
    minus harmless mean: float64 [d]. Contributions are :meth:`HookedChatModel.head_results`, i.e.
    after Gemma's post-attention norm (what the heads actually add to the residual stream)."""
    heads = [(int(l), model.check_head(h)) for l, h in heads]
    if not heads:
        raise SiteError("Give at least one (layer, head) pair.")
    for l, _ in heads:
        model.check_site(f"blocks.{l}.attn.hook_result")
    a = _mean_head_sum(model, harmful_ids, harmful_mask, heads, position, batch_size)
    b = _mean_head_sum(model, harmless_ids, harmless_mask, heads, position, batch_size)
    return a - b


def cached_diff_in_means(harmful_cache, harmless_cache, layer: int, position: int = -1,
                         site: str = "hook_resid_pre") -> torch.Tensor:
    """:func:`diff_in_means` from two clean runs' caches of the same prompts (``run_with_cache``
    with ``blocks.{layer}.{site}``) instead of new forwards: float64 [d]."""
    name = _site_name(layer, site)
    means = []
    for cache in (harmful_cache, harmless_cache):
        act = cache[name]
        col = _columns([position], act.shape[1])[0]
        means.append(act[:, col].detach().to(torch.float64).sum(0).cpu() / act.shape[0])
    return means[0] - means[1]


def cached_head_vector(model, harmful_cache, harmless_cache, heads: Sequence[tuple[int, int]],
                       position: int = -1) -> torch.Tensor:
    """:func:`head_vector` from two clean runs' caches of the same prompts holding
    ``blocks.{l}.attn.hook_z`` of the heads' layers (each head's contribution is its ``z`` at the
    column through its slice of the output projection, after any post-norm, as
    :meth:`HookedChatModel.head_results`): float64 [d]."""
    heads = [(int(l), model.check_head(h)) for l, h in heads]
    if not heads:
        raise SiteError("Give at least one (layer, head) pair.")
    out = []
    for cache in (harmful_cache, harmless_cache):
        total = None
        for l in sorted({l for l, _ in heads}):
            z = cache[f"blocks.{l}.attn.hook_z"]  # [b, T, h, dh]
            col = _columns([position], z.shape[1])[0]
            result = head_result(model.adapter.o_proj(l).weight, z[:, col:col + 1])  # attn.hook_result there
            res = model.head_results({f"blocks.{l}.attn.hook_result": result}, l)[:, 0]  # [b, h, d]
            hs = [h for ll, h in heads if ll == l]
            s = res[:, hs].to(torch.float64).sum(1).sum(0).cpu()
            total = s if total is None else total + s
        out.append(total / z.shape[0])
    return out[0] - out[1]


# ----------------------------------------------------------------------------------- files


def save_vector(path: str | Path, vector: torch.Tensor, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``vector`` to a safetensors file (atomically) with JSON-encoded ``metadata``
    (e.g. model, layer, position, site, dataset); ``norm`` is added from the vector."""
    meta = dict(metadata or {})
    meta.setdefault("norm", float(vector.detach().to(torch.float64).norm()))
    meta.setdefault("dtype", str(vector.dtype).replace("torch.", ""))
    return save_tensors(Path(path), {"vector": vector.detach()},
                        {k: json.dumps(v, default=str) for k, v in meta.items()})


def load_vector(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """(vector, metadata) as written by :func:`save_vector`."""
    from safetensors import safe_open

    path = Path(path)
    v = load_tensors(path)["vector"]
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    meta = {}
    for k, s in raw.items():
        try:
            meta[k] = json.loads(s)
        except (TypeError, ValueError):
            meta[k] = s
    return v, meta
