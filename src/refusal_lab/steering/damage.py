"""What a steering edit costs on prompts it should leave alone: KL divergence and cross-entropy.

An edit that removes refusal but also scrambles the model's other answers is no finding, so the
direction selection filters candidates on the KL of harmless prompts' next-token distribution,
and the evaluation step reports KL and cross-entropy of the edited model on harmless prompts.

* :func:`next_token_kl`: ``KL(base || edited)`` per prompt from two sets of last-column logits —
  the one KL of the package;
* :func:`edit_kl`: its mean over prompts, running the model without and with the edit;
* :func:`completion_cross_entropy`: cross-entropy of the model's own greedy completions, without
  and with the edit;
* :func:`edit_damage`: both for several edits at once, the unedited work done once: the baseline
  completions, their log-probabilities and the unedited last-column logits all come from one
  greedy decode, and each edit costs one prompt prefill (its KL logits) continued over the
  completions (its cross-entropy), the prompts' common beginning once per setting. Equal to the
  two functions above to float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from refusal_lab.models.generate import greedy_decode
from refusal_lab.steering.batching import tensor_batches
from refusal_lab.steering.evaluation import _prefix_first, _prompt_prefills, _shared_start

__all__ = ["completion_cross_entropy", "edit_damage", "edit_kl", "next_token_kl"]


def next_token_kl(base_logits: torch.Tensor, edited_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(base) || softmax(edited))`` per row of two ``[n, vocab]`` logit tensors, in
    float64: ``[n]``."""
    base = torch.log_softmax(base_logits.to(torch.float64), -1)
    edited = torch.log_softmax(edited_logits.to(torch.float64), -1)
    return (base.exp() * (base - edited)).sum(-1)


@torch.no_grad()
def edit_kl(model, ids: torch.Tensor, mask: torch.Tensor | None, fwd_hooks, batch_size: int = 16) -> float:
    """Mean over prompts of :func:`next_token_kl` at the last column, unedited vs under ``fwd_hooks``."""
    total, n = 0.0, 0
    for i, m in tensor_batches(ids, mask, batch_size, model.device):
        base = model(i, m, logits="last")
        edited = model(i, m, fwd_hooks=list(fwd_hooks), logits="last")
        total += float(next_token_kl(base, edited).sum())
        n += i.shape[0]
    return total / n


@torch.no_grad()
def completion_cross_entropy(model, ids: torch.Tensor, mask: torch.Tensor | None, fwd_hooks,
                             max_new_tokens: int = 32, batch_size: int = 16) -> dict:
    """Cross-entropy (nats/token) of the model's own baseline greedy completions, without and with
    the edit (teacher-forced): ``{"ce_baseline", "ce_edited", "n_tokens"}``. Hooks that depend on
    generation (``positions="generated"``) see one prompt-like pass here; use ``"from:<col>"``."""
    eos = torch.as_tensor(model.eos_ids() or [-1], device=model.device)
    sums = {"ce_baseline": 0.0, "ce_edited": 0.0}
    count = 0
    for i, m in tensor_batches(ids, mask, batch_size, model.device):
        new = model.generate(i, m, max_new_tokens=max_new_tokens)
        # keep tokens up to and including the first EOS
        is_eos = torch.isin(new, eos)
        keep = (is_eos.long().cumsum(1) - is_eos.long()) == 0
        full = torch.cat([i, new], 1)
        fmask = torch.cat([m, keep.long()], 1)
        T = i.shape[1]
        for key, hooks in (("ce_baseline", ()), ("ce_edited", list(fwd_hooks))):
            logits = model(full, fmask, fwd_hooks=hooks)[:, T - 1 : -1].to(torch.float64)
            nll = -torch.log_softmax(logits, -1).gather(-1, new[..., None])[..., 0]
            sums[key] += float((nll * keep).sum())
        count += int(keep.sum())
    return {k: v / max(count, 1) for k, v in sums.items()} | {"n_tokens": count}


@torch.no_grad()
def edit_damage(model, ids: torch.Tensor, mask: torch.Tensor | None, edits: Mapping[str, list],
                max_new_tokens: int = 32, batch_size: int = 16, bar=None) -> dict[str, dict]:
    """:func:`edit_kl` and :func:`completion_cross_entropy` of each edit in ``edits``
    (``{name: fwd_hooks}``): ``{name: {"kl", "ce_baseline", "ce_edited", "n_tokens"}}``.

    The baseline greedy completions are decoded once (finished rows leave the batch); that decode's
    prompt logits are the unedited side of the KL and its token log-probabilities the baseline
    cross-entropy. Per edit, one prompt prefill under the edit gives its last-column logits, and
    the completions continue it over its keys/values (teacher-forced, keys after a row's first
    eos masked as before). Where every edit treats all columns alike, the beginning all prompts of
    a batch share (the chat template's system turn) runs once per setting as a one-row prompt, as
    in :func:`~refusal_lab.steering.evaluation.evaluate_settings` (equal to the whole prompts to
    rounding). The cross-entropy's log-softmax runs one row at a time (a ``[rows, tokens, vocab]``
    float64 tensor would be the step's largest allocation). ``bar.update(2)`` after each edit."""
    eos = torch.as_tensor(model.eos_ids() or [-1], device=model.device)
    kl = {k: 0.0 for k in edits}
    ce = {k: 0.0 for k in edits}
    ce_base, count, n = 0.0, 0, 0
    base = object()  # the unedited setting's key (no edit name can equal it)
    settings = {base: [], **{k: list(v) for k, v in edits.items()}}
    batches = []
    for i, m in tensor_batches(ids, mask, batch_size, model.device):
        P = _shared_start(model, i, m, settings.values(), i.shape[1] + max(max_new_tokens, 0))
        if P:
            i, m = _prefix_first(i, m, P)
        firsts = dict(_prompt_prefills(model, i, m, settings, [], 0, True, P))
        gen = greedy_decode(model, i, m, max_new_tokens=max_new_tokens, drop_finished=True, logprobs=True,
                            prefill=firsts.pop(base))
        new = gen.tokens
        is_eos = torch.isin(new, eos)
        keep = (is_eos.long().cumsum(1) - is_eos.long()) == 0
        ce_base += float((-gen.logprobs * keep.cpu()).sum())
        count += int(keep.sum())
        n += i.shape[0]
        batches.append((m, gen, keep, firsts))
    for name in edits:
        hooks = settings[name]
        for m, gen, keep, firsts in batches:
            new = gen.tokens
            first = firsts.pop(name)
            kl[name] += float(next_token_kl(gen.prompt_logits, first.logits).sum())
            logits = first.logits[:, None]
            if new.shape[1] > 1:
                fmask = torch.cat([m, keep[:, :-1].long()], 1)
                rest = model.prefill(new[:, :-1], fmask, fwd_hooks=hooks, kv_prefix=first.kv, logits="all").logits
                logits = torch.cat([logits, rest], 1)
            del first
            target = new[..., None].to(logits.device)
            for r in range(logits.shape[0]):  # [tokens, vocab] float64 at a time
                nll = -torch.log_softmax(logits[r].to(torch.float64), -1).gather(-1, target[r])[..., 0]
                ce[name] += float((nll * keep[r].to(nll.device)).sum())
        if bar is not None:
            bar.update(2)
    return {k: {"kl": kl[k] / n, "ce_baseline": ce_base / max(count, 1), "ce_edited": ce[k] / max(count, 1),
                "n_tokens": count} for k in edits}
