"""Exact activation patching at the compute limit ("cone" engine).

A patch at layer l, column p changes nothing before layer l and nothing at columns before p.
So for each patch we start the forward at layer l from the receiving run's cached residual
(columns p..T-1 only), attend over the receiving run's cached keys/values for columns < p, and
compute the final norm and the metric at the last column only. Many patches share one batched
forward: rows are grouped by their first patched column p (same query length) and sorted by their
start layer; at layer k the rows that start at k join the batch, so each row costs exactly its
cone, (L - l) layers × (T - p) columns — less at the last layer, where only the last column reaches
the metric: the other columns get that block's keys and values (all the last one attends to) but
not its attention output or MLP.

Cumulative grids (sites at layers 0..l patched together) reuse a trunk: the row that patches every
layer is run once and each cumulative cell l branches off it at layer l + 1.

Each layer's :class:`Edit` entries of a batch's rows are one :class:`~refusal_lab.models.edits.Patch`
hook (:func:`edit_patch`), the edit of the naive reference too (:mod:`refusal_lab.patching.naive`,
one full forward per cell; tests assert both agree to 1e-4 in fp32).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refusal_lab.errors import RefusalLabError
from refusal_lab.metrics import logit_diff
from refusal_lab.models.edits import Patch
from refusal_lab.models.forward import KV, KVPrefix, default_position_ids
from refusal_lab.models.hooked import ActivationCache, HookedChatModel
from refusal_lab.models.sites import HookRun
from refusal_lab.patching.checkpoint import RowCheckpoint, grid_key

#: grid name -> TransformerLens site patched
GRID_SITES = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "attn_out_cumulative": "hook_attn_out",
    "mlp_out_cumulative": "hook_mlp_out",
    "heads": "attn.hook_z",
}
GRIDS = tuple(GRID_SITES)


class NormedMetric:
    """A metric computed from the final-norm output at the last column, per row."""

    def __call__(self, model: HookedChatModel, normed: torch.Tensor, prompt_idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_logits(self, logits: torch.Tensor, prompt_idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class LogitDiff(NormedMetric):
    """logit[refusal] - logit[compliance]; only two unembedding rows are computed."""

    refusal_id: int
    compliance_id: int

    def __call__(self, model, normed, prompt_idx):
        rows = torch.tensor([self.refusal_id, self.compliance_id], device=model.adapter.lm_head.weight.device)
        lg = model.adapter.final_logits(normed.to(rows.device), rows).float()
        return lg[:, 0] - lg[:, 1]

    def from_logits(self, logits, prompt_idx):
        return logit_diff(logits, (self.refusal_id, self.compliance_id)).float()


@dataclass
class Batch:
    """Token ids [n, T] and attention mask [n, T] of one side (all rows the same length)."""

    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def n(self) -> int:
        return self.ids.shape[0]

    @property
    def T(self) -> int:
        return self.ids.shape[1]


@dataclass
class Receiver:
    """The receiving (corrupted) run: residuals before every block and keys/values per layer."""

    batch: Batch
    resid_pre: list[torch.Tensor]  # L x [n, T, d]
    kv: KV  # layer -> ([n, kvh, T, dh], ...)
    position_ids: torch.Tensor  # [n, T]
    baseline: torch.Tensor  # [n] metric without any patch

    @classmethod
    @torch.no_grad()
    def record(cls, model: HookedChatModel, batch: Batch, metric: NormedMetric) -> "Receiver":
        L = model.cfg.n_layers
        names = {f"blocks.{l}.hook_resid_pre" for l in range(L)} | {"ln_final.hook_normalized"}
        out = model.prefill(batch.ids, batch.mask, names=names, record_kv=True, logits="last")
        normed = out.cache["ln_final.hook_normalized"][:, -1]
        idx = torch.arange(batch.n, device=normed.device)
        return cls(batch, [out.cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)], out.kv,
                   default_position_ids(batch.mask), metric(model, normed, idx))


@dataclass
class Edit:
    """Write ``value`` into site ``site`` of block ``layer`` at column ``col`` (head ``head``)."""

    layer: int
    site: str
    col: int
    value: torch.Tensor
    head: int | None = None


@dataclass
class Row:
    """One patched forward for one prompt: start at ``start_layer`` from ``init`` (default: the
    receiver's residual) at columns ``start_col``..T-1 and apply ``edits`` on the way."""

    prompt: int
    start_layer: int
    start_col: int
    edits: list[Edit] = field(default_factory=list)
    init: torch.Tensor | None = None  # [T - start_col, d]
    record_states: bool = False  # keep the residual entering every later layer (trunks)
    states: dict[int, torch.Tensor] = field(default_factory=dict)


def edit_patch(items: list[tuple[int, Edit]]) -> Patch:
    """The one hook applying every (batch row, edit) pair of a site: a :class:`Patch` of them all
    (the edits of one site are all per-head or none is)."""
    heads = [e.head for _, e in items]
    return Patch(torch.tensor([r for r, _ in items]), torch.tensor([e.col for _, e in items]),
                 torch.stack([e.value for _, e in items]), None if heads[0] is None else torch.tensor(heads))


def _is_oom(exc: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors (``torch.OutOfMemoryError`` or a RuntimeError saying so)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def batch_rows(model: HookedChatModel, seq_len: int, max_rows: int | None, keep_states: bool = False) -> int:
    """Rows per cone batch: what fits in free device memory (:func:`~refusal_lab.memory.auto_max_rows`),
    and at most ``max_rows`` when given."""
    from refusal_lab.memory import auto_max_rows

    fit = auto_max_rows(model, seq_len, keep_states=keep_states)
    return fit if max_rows is None else max(1, min(int(max_rows), fit))


@torch.no_grad()
def run_rows(
    model: HookedChatModel,
    receiver: Receiver,
    rows: list[Row],
    metric: NormedMetric,
    max_rows: int | None = None,
    progress: tqdm | None = None,
    on_chunk: Callable[[list[int], torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Metric [len(rows)] of every row, computing only each row's cone.

    Rows run in batches of at most ``max_rows`` (None: as many as fit in the free memory of the
    devices holding the layers, :func:`refusal_lab.memory.auto_max_rows`; a given number is capped
    by that too); when a batch runs out of memory the batch size is halved (and stays halved) and
    the batch retried, with one warning per reduction. ``on_chunk`` is called with the row indices
    and values of every finished batch (checkpointing)."""
    out = torch.empty(len(rows))
    groups: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r.start_col].append(i)
    L, T = model.cfg.n_layers, receiver.batch.T
    size = batch_rows(model, T, max_rows, keep_states=any(r.record_states for r in rows)) if rows else 1
    for p, members in sorted(groups.items()):
        members.sort(key=lambda i: rows[i].start_layer)
        c0, failed_at = 0, None
        while c0 < len(members):
            chunk = members[c0 : c0 + size]
            oom = False
            try:
                vals = _run_group(model, receiver, [rows[i] for i in chunk], p, metric, L, T).cpu()
            except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
                if not _is_oom(exc):
                    raise
                oom = True
            if oom:  # outside the except block, so the failed forward's tensors can be freed
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if len(chunk) <= 1:
                    raise RefusalLabError(
                        "Out of memory even with a single patched row per batch; use --dtype bfloat16, a shorter "
                        "template, fewer objects or a device with more free memory."
                    )
                failed_at = failed_at or len(chunk)
                while size >= len(chunk):  # halve max_rows until the batch really shrinks
                    size //= 2
                continue
            if failed_at is not None:
                warnings.warn(f"out of memory with {failed_at} rows per batch; continuing with {size}",
                              RuntimeWarning, stacklevel=2)
                failed_at = None
            out[chunk] = vals
            if on_chunk is not None:
                on_chunk(chunk, vals)
            if progress is not None:
                progress.update(len(chunk))
            c0 += len(chunk)
    return out


def _run_group(model, receiver: Receiver, rows: list[Row], p: int, metric, L: int, T: int) -> torch.Tensor:
    device = receiver.resid_pre[0].device
    cols = torch.arange(p, T, device=device)
    resid = None
    active: list[int] = []  # indices into rows, in batch order
    prompt_idx = torch.empty(0, dtype=torch.long, device=device)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_layer[r.start_layer].append(i)
    first = min(by_layer)
    for l in range(first, L):
        joining = by_layer.get(l, [])
        if joining:
            # every joining row onto this layer's device (device_map: the cached receiver residual of
            # layer l lives there; a trunk state may have been recorded on another layer's device)
            dev_l = model.adapter.ln1(l).weight.device
            new = torch.stack([
                (rows[i].init if rows[i].init is not None else receiver.resid_pre[l][rows[i].prompt, p:]).to(dev_l)
                for i in joining
            ])
            resid = new if resid is None else torch.cat([resid.to(new.device), new])
            active += joining
            prompt_idx = torch.tensor([rows[i].prompt for i in active], device=device)
        # edits of this layer, by site
        per_site: dict[str, list[tuple[int, Edit]]] = defaultdict(list)
        for pos, i in enumerate(active):
            if rows[i].record_states:
                rows[i].states[l] = resid[pos].clone()
            for e in rows[i].edits:
                if e.layer == l:
                    per_site[f"blocks.{l}.{e.site}"].append((pos, e))
        run = HookRun({name: [edit_patch(items)] for name, items in per_site.items()})
        k, v = receiver.kv[l]
        kv = KVPrefix(prefix={l: (k[prompt_idx.to(k.device), :, :p], v[prompt_idx.to(v.device), :, :p])})
        key_valid = receiver.batch.mask.bool()[prompt_idx.to(receiver.batch.mask.device)]
        position_ids = receiver.position_ids[prompt_idx.to(receiver.position_ids.device)][:, p:]
        if l == L - 1 and T - p > 1 and not any(rows[i].record_states for i in active):
            # the last block: only the last column reaches the metric; the others are only attended
            # to, so they need this block's keys and values, not its attention output or MLP
            keys = KVPrefix(prefix=kv.prefix, record=True)
            model.blocks(resid[:, :-1], run=run, cols=cols[:-1], position_ids=position_ids[:, :-1],
                         key_valid=key_valid[:, :-1], kv=keys, start_layer=l, stop_layer=l + 1, keys_only=True)
            resid, cols, position_ids, kv = resid[:, -1:], cols[-1:], position_ids[:, -1:], KVPrefix(prefix=keys.kv)
        resid = model.blocks(
            resid, run=run, cols=cols, position_ids=position_ids,
            key_valid=key_valid, kv=kv, start_layer=l, stop_layer=l + 1,
        )
    for pos, i in enumerate(active):
        if rows[i].record_states:
            rows[i].states[L] = resid[pos].clone()
    normed = model.adapter.final_norm(resid[:, -1].to(model.adapter.final_norm.weight.device))
    values = metric(model, normed, prompt_idx)
    order = torch.empty(len(rows), dtype=torch.long)
    order[torch.tensor(active)] = torch.arange(len(active))
    return values[order.to(values.device)]


# ---------------------------------------------------------------------------------------- grids
@dataclass
class GridSpec:
    """Which cells a grid has: layers × columns (or layers × heads, patched at ``cols``)."""

    grid: str
    layers: list[int]
    cols: list[int]  # columns for per-position grids; the patched columns for the head grid
    heads: list[int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.layers), len(self.heads) if self.grid == "heads" else len(self.cols))


def source_sites(model: HookedChatModel, spec: GridSpec) -> set[str]:
    site = GRID_SITES[spec.grid]
    return {f"blocks.{l}.{site}" for l in (range(model.cfg.n_layers) if spec.grid.endswith("cumulative") else spec.layers)}


def build_rows(model: HookedChatModel, spec: GridSpec, source: ActivationCache, n_prompts: int):
    """Rows for every (prompt, cell) except cumulative cells (see :func:`cumulative_rows`).

    Returns (rows, index) with index[i] = (prompt, a, b) the cell of row i."""
    site = GRID_SITES[spec.grid]
    rows, index = [], []
    for i in range(n_prompts):
        for a, l in enumerate(spec.layers):
            act = source[f"blocks.{l}.{site}"]
            if spec.grid == "heads":
                for b, h in enumerate(spec.heads):
                    edits = [Edit(l, site, c, act[i, c, h], h) for c in spec.cols]
                    rows.append(Row(i, l, min(spec.cols), edits))
                    index.append((i, a, b))
            elif spec.grid == "resid_post" and l < model.cfg.n_layers - 1:
                # resid_post[l] is resid_pre[l + 1]: start one layer later, skipping block l entirely
                for b, c in enumerate(spec.cols):
                    rows.append(Row(i, l + 1, c, [Edit(l + 1, "hook_resid_pre", c, act[i, c])]))
                    index.append((i, a, b))
            else:
                for b, c in enumerate(spec.cols):
                    rows.append(Row(i, l, c, [Edit(l, site, c, act[i, c])]))
                    index.append((i, a, b))
    return rows, index


@torch.no_grad()
def patch_grid(
    model: HookedChatModel,
    receiver: Receiver,
    source: ActivationCache,
    spec: GridSpec,
    metric: NormedMetric,
    max_rows: int | None = None,
    progress: bool = True,
    checkpoint: Path | str | None = None,
) -> torch.Tensor:
    """Metric per prompt and cell, [n, len(layers), len(cols or heads)], computed by cones.

    With ``checkpoint`` (non-cumulative grids), the values of finished rows are saved there
    atomically after every batch, and rows already saved (by a run of the same grid on the same
    inputs) are skipped; a checkpoint of anything else is ignored and overwritten."""
    n = receiver.batch.n
    if spec.grid.endswith("cumulative"):
        return _cumulative(model, receiver, source, spec, metric, max_rows, progress)
    rows, index = build_rows(model, spec, source, n)
    values = torch.zeros(len(rows))
    done = torch.zeros(len(rows), dtype=torch.bool)
    on_chunk = None
    if checkpoint is not None:
        key = grid_key(model, receiver, source, spec, source_sites(model, spec), metric, len(rows))
        saved = RowCheckpoint(checkpoint, key, spec, len(rows))
        values, done, on_chunk = saved.values, saved.done, saved.save

    pending = [i for i in range(len(rows)) if not done[i]]
    bar = tqdm(total=len(rows), initial=len(rows) - len(pending), desc=f"patch {spec.grid}",
               disable=not progress, leave=False)
    if pending:
        vals = run_rows(model, receiver, [rows[i] for i in pending], metric, max_rows, bar,
                        on_chunk=None if on_chunk is None else (lambda c, v: on_chunk([pending[j] for j in c], v)))
        values[pending] = vals
    bar.close()
    return _scatter(values, index, n, spec)


def _scatter(values: torch.Tensor, index: list[tuple[int, int, int]], n: int, spec: GridSpec) -> torch.Tensor:
    """Place row values at their (prompt, row, col) cells of an [n, *spec.shape] grid."""
    out = torch.empty(n, *spec.shape)
    for v, (i, a, b) in zip(values.tolist(), index):
        out[i, a, b] = v
    return out


def _cumulative(model, receiver, source, spec, metric, max_rows, progress):
    """Cell (l, c): the site patched at layers 0..l at column c. One trunk per (prompt, column)
    patches every layer and records its residual; cell l restarts from the trunk at layer l + 1."""
    site = GRID_SITES[spec.grid]
    n, L = receiver.batch.n, model.cfg.n_layers
    trunks = []
    for i in range(n):
        for c in spec.cols:
            edits = [Edit(l, site, c, source[f"blocks.{l}.{site}"][i, c]) for l in range(L)]
            trunks.append(Row(i, 0, c, edits, record_states=True))
    bar = tqdm(total=len(trunks) + n * len(spec.layers) * len(spec.cols), desc=f"patch {spec.grid}",
               disable=not progress, leave=False)
    final = run_rows(model, receiver, trunks, metric, max_rows, bar)
    rows, index, direct = [], [], {}
    t = 0
    for i in range(n):
        for b, c in enumerate(spec.cols):
            trunk = trunks[t]
            for a, l in enumerate(spec.layers):
                if l == L - 1:
                    direct[(i, a, b)] = float(final[t])
                else:
                    rows.append(Row(i, l + 1, c, [], init=trunk.states[l + 1]))
                    index.append((i, a, b))
            t += 1
    vals = run_rows(model, receiver, rows, metric, max_rows, bar)
    bar.close()
    out = _scatter(vals, index, n, spec)
    for (i, a, b), v in direct.items():
        out[i, a, b] = v
    return out
