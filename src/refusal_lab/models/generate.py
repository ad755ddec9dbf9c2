"""Greedy generation with hooks: a prompt prefill, then one token at a time over the recorded keys/values.

Both the prompt and every new token go through :meth:`HookedChatModel.prefill`, so hooks and edits
apply during generation exactly as in a forward; they see absolute columns (the prompt has columns
0..T-1, new tokens T, T+1, ...), which is how an edit of prompt columns leaves new tokens alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from refusal_lab.models.forward import default_position_ids
from refusal_lab.models.sites import HookFn

if TYPE_CHECKING:  # pragma: no cover
    from refusal_lab.models.hooked import HookedChatModel


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
    every row is finished."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    b = input_ids.shape[0]
    step = model.prefill(input_ids, attention_mask, fwd_hooks=fwd_hooks, record_kv=True, logits="last")
    logits = step.logits
    eos = model.eos_ids()
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    out = []
    key_valid = attention_mask.bool()
    last_pos = default_position_ids(attention_mask)[:, -1]
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
        last_pos = last_pos + 1
        key_valid = torch.cat([key_valid, torch.ones(b, 1, dtype=torch.bool, device=key_valid.device)], 1)
        step = model.prefill(nxt[:, None], key_valid, fwd_hooks=fwd_hooks, kv_prefix=step.kv, record_kv=True,
                             position_ids=last_pos[:, None], logits="last")
        logits = step.logits
    return torch.stack(out, 1)
