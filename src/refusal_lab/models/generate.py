"""Greedy generation with hooks: a prompt prefill, then one token at a time over the recorded keys/values.

Both the prompt and every new token go through :meth:`HookedChatModel.prefill`, so hooks and edits
apply during generation exactly as in a forward; they see absolute columns (the prompt has columns
0..T-1, new tokens T, T+1, ...), which is how an edit of prompt columns leaves new tokens alone.

:func:`greedy_decode` is the loop; :func:`greedy_generate` (``HookedChatModel.generate``) returns its
tokens. The decode also hands back what callers would otherwise recompute: the prefill's last-column
logits (what a scoring forward of the prompts gives, bit for bit) and, when asked, the log-probability
of each chosen token. With ``drop_finished`` a row that is done leaves the batch (its keys/values
are dropped) instead of decoding padding; ``stop`` lets a caller end rows early (e.g. once a judge's
verdict cannot change). A finished row emits its first eos id from then on, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from refusal_lab.models.forward import default_position_ids
from refusal_lab.models.sites import HookFn

if TYPE_CHECKING:  # pragma: no cover
    from refusal_lab.models.hooked import HookedChatModel, Prefill

StopFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``stop(rows [r], tokens [r, t]) -> bool [r]``: which of the still running rows (their indices in
the batch and their new tokens so far) may end now."""


@dataclass
class Generation:
    """What :func:`greedy_decode` returns."""

    tokens: torch.Tensor  # [b, new] greedy continuation (a finished row repeats its first eos id)
    prompt_logits: torch.Tensor  # [b, vocab] the prompt prefill's last-column logits
    logprobs: torch.Tensor | None = None  # float64 [b, new]: log p(token) of each emitted token (0 after a row ended)


@torch.no_grad()
def greedy_decode(
    model: HookedChatModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    fwd_hooks: Sequence[tuple[str, HookFn]] | Callable[[torch.Tensor], Sequence[tuple[str, HookFn]]] = (),
    stop_at_eos: bool = True,
    drop_finished: bool = False,
    stop: StopFn | None = None,
    prefill: Prefill | None = None,
    logprobs: bool = False,
) -> Generation:
    """Greedy continuation of left-padded prompts with ``fwd_hooks`` applied throughout.

    With ``stop_at_eos`` a row is finished once it emitted an eos id; ``stop`` may end further rows
    (after each step, over the running rows). A finished row emits the first eos id from then on and
    generation ends when every row is finished (or after ``max_new_tokens``). ``drop_finished``
    removes finished rows from the batch (and their keys/values), so hooks then see only the running
    rows: use it with hooks that treat every row alike (no ``batch=`` rows). ``prefill``: the prompt
    prefill already run (``record_kv=True``, ``logits='last'``, the same hooks), e.g. assembled from a
    shared lower-layer prefill; its keys and values move into the decoding's buffers (its ``kv``
    dict is emptied). ``logprobs``: also the float64 log-probability of each emitted token
    under the logits it was chosen from. ``fwd_hooks`` may also be a function of the running rows
    (their batch indices) returning the hooks for them, so that rows can carry different edits and
    still leave the batch."""
    hooks_for = fwd_hooks if callable(fwd_hooks) else (lambda rows: fwd_hooks)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    b, dev = input_ids.shape[0], input_ids.device
    if prefill is None:
        prefill = model.prefill(input_ids, attention_mask, fwd_hooks=hooks_for(torch.arange(b, device=dev)),
                                record_kv=True, logits="last")
    prompt_logits, kv, logits = prefill.logits, prefill.kv, prefill.logits
    all_eos = model.eos_ids()
    eos = all_eos if stop_at_eos else []
    eos_t = torch.as_tensor(eos, device=dev) if eos else None
    fill = torch.as_tensor(all_eos[0] if all_eos else 0, device=dev)  # what a finished row emits
    out = torch.full((b, max(max_new_tokens, 0)), int(fill), dtype=input_ids.dtype, device=dev)
    lp = torch.zeros(b, max(max_new_tokens, 0), dtype=torch.float64) if logprobs else None
    active = torch.arange(b, device=dev)  # batch rows still in the computation
    done = torch.zeros(b, dtype=torch.bool, device=dev)  # over the rows in the computation
    key_valid = attention_mask.bool()
    last_pos = default_position_ids(attention_mask)[:, -1]
    # every layer's keys/values in a buffer with room for the new columns: a step writes its column
    # in place instead of copying the whole cache (and holding it twice)
    length = key_valid.shape[1]
    room = max(max_new_tokens - 1, 0)
    buffers = {}
    for l in list(kv):  # moved out of the prefill's kv dict (emptied), so each layer is held once
        k, v = kv.pop(l)
        bk = k.new_empty(k.shape[0], k.shape[1], length + room, k.shape[3])
        bv = v.new_empty(v.shape[0], v.shape[1], length + room, v.shape[3])
        bk[:, :, :length], bv[:, :, :length] = k, v
        buffers[l] = (bk, bv)
    kv = None
    n_steps = 0
    greedy = None  # the next tokens straight from the step (logits="greedy") when no log-probabilities are wanted
    for t in range(max_new_tokens):
        nxt = (logits.argmax(-1) if greedy is None else greedy).to(dev)  # lm_head may sit on another device
        nxt = torch.where(done, fill, nxt)
        if lp is not None:
            chosen = torch.log_softmax(logits.to(torch.float64), -1).gather(-1, nxt.to(logits.device)[:, None])[:, 0]
            lp[active.cpu(), t] = torch.where(done.to(chosen.device), 0.0, chosen).cpu()
        out[active, t] = nxt
        n_steps = t + 1
        if eos_t is not None:
            done |= torch.isin(nxt, eos_t)
        if stop is not None and not bool(done.all()):
            run = (~done).nonzero().flatten()
            done[run] |= stop(active[run], out[active[run], : t + 1]).to(dev)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        if drop_finished and bool(done.any()):
            keep = (~done).nonzero().flatten()
            active, nxt, done = active[keep], nxt[keep], done[keep]
            key_valid, last_pos = key_valid[keep], last_pos[keep]
            for l, (k, v) in buffers.items():  # layer by layer, so the old buffers go as the new ones come
                buffers[l] = (k[keep.to(k.device)], v[keep.to(v.device)])
        last_pos = last_pos + 1
        key_valid = torch.cat([key_valid, torch.ones(key_valid.shape[0], 1, dtype=torch.bool, device=key_valid.device)], 1)
        step = model.prefill(nxt[:, None], key_valid, fwd_hooks=hooks_for(active), kv_buffer=(buffers, length),
                             position_ids=last_pos[:, None], logits="last" if logprobs else "greedy")
        length += 1
        if logprobs:
            logits = step.logits
        else:
            greedy = step.logits
    return Generation(out[:, :n_steps], prompt_logits, None if lp is None else lp[:, :n_steps])


@torch.no_grad()
def greedy_generate(
    model: HookedChatModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    fwd_hooks: Sequence[tuple[str, HookFn]] = (),
    stop_at_eos: bool = True,
) -> torch.Tensor:
    """Greedy continuation [b, new] of left-padded prompts with ``fwd_hooks`` applied throughout.

    With ``stop_at_eos`` a finished row keeps emitting its first eos id and generation ends when
    every row is finished (:func:`greedy_decode`, every row kept in the batch)."""
    return greedy_decode(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks,
                         stop_at_eos=stop_at_eos).tokens
