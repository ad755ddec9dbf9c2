"""Hook sites: their names, what a hook function is told, and the per-forward hook/cache state.

A forward of :class:`~refusal_lab.models.hooked.HookedChatModel` passes every activation through
:meth:`HookRun.site` under its TransformerLens name; the run applies the hooks registered for that
name and caches what was asked for. This module knows nothing about the model's computation, so
the block loop (:mod:`refusal_lab.models.forward`), the edits (:mod:`refusal_lab.models.edits`)
and the patching engine share one notion of a site.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from refusal_lab.errors import SiteError

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]

BLOCK_SITES = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "hook_mlp_out",
    "hook_resid_post",
)
GLOBAL_SITES = ("hook_embed", "ln_final.hook_normalized")
BLOCK_SITE_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def parse_site(name: str, n_layers: int) -> tuple[int | None, str]:
    """(layer, site) of a valid site name of an ``n_layers`` model; a SiteError naming the problem otherwise."""
    if name in GLOBAL_SITES:
        return None, name
    m = BLOCK_SITE_RE.match(name)
    if not m or m.group(2) not in BLOCK_SITES:
        raise SiteError(
            f"'{name}' is not a site of this model; sites are hook_embed, "
            f"blocks.{{l}}.{{{', '.join(BLOCK_SITES)}}} and ln_final.hook_normalized."
        )
    layer = int(m.group(1))
    if not 0 <= layer < n_layers:
        raise SiteError(f"Layer {layer} is out of range: this model has layers 0..{n_layers - 1}.")
    return layer, m.group(2)


@dataclass
class HookPoint:
    """What a hook function is told about the activation it receives."""

    name: str
    layer: int | None
    cols: torch.Tensor  # [q] absolute token columns of this activation's position axis (consecutive;
    # for attn.hook_pattern [b, h, q, k] the query axis q, its key axis being columns 0..k-1)

    def col_mask(self, positions: Sequence[int] | torch.Tensor | None) -> torch.Tensor | None:
        """Bool [q]: which of this call's columns are in ``positions`` (None = all)."""
        if positions is None:
            return None
        pos = torch.as_tensor(positions, device=self.cols.device).reshape(-1)
        return torch.isin(self.cols, pos)


class ActivationCache(dict):
    """``cache[site_name]`` -> tensor, as TransformerLens's cache is indexed."""


@dataclass
class HookRun:
    """Per-forward state: hook functions by site, and what to cache (``cache_filter`` of a name)."""

    hooks: dict[str, list[HookFn]] = field(default_factory=dict)
    cache: ActivationCache | None = None
    cache_filter: Callable[[str], bool] | None = None
    detach: bool = True

    def wants(self, name: str) -> bool:
        """Whether anything happens at ``name`` (lets the loop skip computing unwatched sites)."""
        return name in self.hooks or (self.cache is not None and self.cache_filter(name))

    def site(self, name: str, layer: int | None, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``x`` after the hooks of ``name`` (each may return a replacement of the same shape), cached if wanted."""
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
