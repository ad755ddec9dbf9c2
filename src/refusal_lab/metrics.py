"""Refusal metrics on next-token logits at the last position.

* :func:`logit_diff`: ``logit[refusal] - logit[compliance]`` (Arditi & Obeso use "Sorry" vs "Sure").
  Linear in the residual stream, so it is what direct logit attribution decomposes.
* :func:`refusal_log_odds`: ``log P(R) - log(1 - P(R))`` with ``P(R)`` the total probability of a
  set of refusal tokens (Arditi et al. 2024 used ``["I"]`` for Llama-style chats). Computed in
  float64 with log-sum-exp, stable for ``P(R)`` near 0 or 1.
* :func:`normalise`: rescales a patched (or steered) metric so that 0 = harmless baseline and
  1 = harmful baseline (see :data:`NORMALIZED_METRIC_NOTE` for how to read it in each direction).
* :func:`propose_token_pair`: the ``auto`` mode, picking the refusal/compliance pair from the model's
  own next-token distributions on the two prompt sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from refusal_lab.errors import PromptError, RefusalLabError

DEFAULT_REFUSAL_STRINGS = ("I", "Sorry", "As", "Unfortunately", "I'm")
"""Candidate first tokens of a refusal; :func:`default_refusal_token_ids` keeps the single-token ones."""

NORMALIZED_METRIC_NOTE = {
    "sufficiency": (
        "harmful -> harmless patching (run the harmless prompt, patch in activations from the "
        "harmful one): 0 = the harmless baseline (patch does nothing), 1 = the patch alone restores "
        "the full harmful (refusing) metric; read the value directly as the fraction restored."
    ),
    "necessity": (
        "harmless -> harmful patching (run the harmful prompt, patch in activations from the "
        "harmless one): the same formula applies, so 1 = unchanged from the harmful baseline "
        "(component not needed) and 0 = refusal fully removed; 1 - value is the fraction removed."
    ),
}
"""How to read :func:`normalise` for the two patching directions."""


# ------------------------------------------------------------------------------- token lookup


def _encode(tokenizer, s: str) -> list[int]:
    return list(tokenizer(s, add_special_tokens=False)["input_ids"])


def _single_id(tokenizer, s: str) -> int | None:
    """The id if ``s`` is exactly one known (non-unk) token, else None."""
    ids = _encode(tokenizer, s)
    if len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None):
        return int(ids[0])
    return None


def _tok_strs(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def resolve_single_token(tokenizer, s: str) -> int:
    """Token id of ``s`` as the first token generated at the start of the assistant turn.

    ``s`` is tokenized on its own without special tokens, which is how each tokenizer starts a
    fresh text: no leading space for byte-level BPEs (Qwen, Llama-3: ``"Sorry"``) and Gemma, the
    SentencePiece dummy-prefix space where the tokenizer adds one (Llama-2: ``"▁Sorry"``). Pass
    ``" Sorry"`` explicitly to get the mid-sentence variant. Raises :class:`PromptError` if ``s``
    is not exactly one token, listing its pieces and single-token alternatives.
    """
    if not isinstance(s, str) or not s:
        raise PromptError(f"The token string must be a non-empty string, got {s!r}.")
    ids = _encode(tokenizer, s)
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) == 1 and (unk is None or ids[0] != unk):
        return int(ids[0])
    if len(ids) == 1:
        raise PromptError(
            f"{s!r} is not in this tokenizer's vocabulary (it maps to the unknown token); choose another string."
        )
    pieces = _fmt(_tok_strs(tokenizer, ids))
    alts = []
    core = s.strip()
    for cand in (core, " " + core, core.capitalize(), " " + core.capitalize(), core.lower(), " " + core.lower()):
        if cand and cand != s and cand not in alts and _single_id(tokenizer, cand) is not None:
            alts.append(cand)
    if ids and not alts:
        first = _tok_strs(tokenizer, ids[:1])[0]
        if first.strip():
            alts.append(first)
    hint = f"use a single-token string such as {' or '.join(repr(a) for a in alts[:3])}" if alts else (
        "use a single-token string (e.g. 'Sorry', 'Sure', 'I')"
    )
    raise PromptError(f"{s!r} is {len(ids)} tokens {pieces} under this tokenizer, not one; {hint}.")


def _fmt(tokens: Sequence[str]) -> str:
    return "(" + ", ".join(repr(t) for t in tokens) + ")"


@dataclass(frozen=True)
class RefusalTokens:
    """The token pair of the logit-difference metric: ``logit[refusal_id] - logit[compliance_id]``."""

    refusal_id: int
    compliance_id: int
    refusal_str: str
    compliance_str: str


def resolve_refusal_tokens(tokenizer, refusal: str = "Sorry", compliance: str = "Sure") -> RefusalTokens:
    """Resolve the refusal/compliance strings to single token ids (see :func:`resolve_single_token`)."""
    r, c = resolve_single_token(tokenizer, refusal), resolve_single_token(tokenizer, compliance)
    if r == c:
        raise PromptError(
            f"{refusal!r} and {compliance!r} are the same token (id {r}); choose two different tokens."
        )
    return RefusalTokens(r, c, refusal, compliance)


def default_refusal_token_ids(tokenizer, strings: Sequence[str] = DEFAULT_REFUSAL_STRINGS) -> list[int]:
    """Sorted ids of the single-token strings among ``strings`` (multi-token ones such as ``"I'm"`` are skipped)."""
    ids = set()
    for s in strings:
        i = _single_id(tokenizer, s)
        if i is not None:
            ids.add(i)
    if not ids:
        raise PromptError(
            f"None of {list(strings)!r} is a single token under this tokenizer; pass refusal token ids explicitly."
        )
    return sorted(ids)


# ------------------------------------------------------------------------------------ metrics


def _last(logits: torch.Tensor) -> torch.Tensor:
    """``[b, vocab]`` from ``[b, vocab]`` or ``[b, T, vocab]`` (last position)."""
    if not isinstance(logits, torch.Tensor):
        logits = torch.as_tensor(logits)
    if logits.ndim == 3:
        return logits[:, -1, :]
    if logits.ndim == 2:
        return logits
    raise PromptError(
        f"Logits must have shape [batch, vocab] or [batch, seq, vocab], got {tuple(logits.shape)}."
    )


def logit_diff(logits: torch.Tensor, tokens: RefusalTokens | tuple[int, int]) -> torch.Tensor:
    """``logit[refusal] - logit[compliance]`` at the last position: ``[b, vocab]``/``[b, T, vocab]`` -> ``[b]``.

    Computed in at least float32 (bf16 logits are upcast) and returned as float32/float64.
    """
    r, c = (tokens.refusal_id, tokens.compliance_id) if isinstance(tokens, RefusalTokens) else tokens
    x = _last(logits)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return x[:, r] - x[:, c]


def refusal_log_odds(logits: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """Log-odds of refusing, ``log P(R) - log(1 - P(R))``, at the last position -> ``[b]`` float64.

    ``P(R)`` is the softmax probability summed over ``refusal_ids``. Both terms share the softmax
    normalizer, so the result is ``logsumexp(logits[R]) - logsumexp(logits[not R])``: exact and
    stable in float64 even when ``P(R)`` rounds to 0 or 1.
    """
    x = _last(logits).to(torch.float64)
    V = x.shape[-1]
    ids = sorted({int(i) for i in refusal_ids})
    if not ids:
        raise PromptError("The refusal token set is empty; give at least one token id.")
    if ids[0] < 0 or ids[-1] >= V:
        raise PromptError(f"Refusal token ids must lie in [0, {V}); got {ids[0] if ids[0] < 0 else ids[-1]}.")
    if len(ids) == V:
        raise PromptError("The refusal token set covers the whole vocabulary, so its log-odds are infinite.")
    in_r = torch.zeros(V, dtype=torch.bool, device=x.device)
    in_r[ids] = True
    return torch.logsumexp(x[:, in_r], dim=-1) - torch.logsumexp(x[:, ~in_r], dim=-1)


def normalise(values, harmless: float, harmful: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(values - harmless) / (harmful - harmless)``: 0 = the harmless baseline, 1 = the harmful one.

    ``values`` is anything :func:`torch.as_tensor` takes (a per-pair grid, a mean, a list of floats);
    the baselines are the two sides' mean metrics. Read in the patching direction of
    :data:`NORMALIZED_METRIC_NOTE`: for sufficiency (harmful -> harmless) the fraction of the refusal
    metric a patch restores, for necessity (harmless -> harmful) 1 = unchanged and 0 = refusal fully
    removed. Equal baselines give inf/nan entries. In float64 unless ``dtype`` says otherwise (a
    grid's mean values stay in their own float32, so that cells tied in float32 — which rank
    statistics such as Spearman see — stay tied).
    """
    return (torch.as_tensor(values, dtype=dtype) - harmless) / (harmful - harmless)


# ------------------------------------------------------------------------------ auto token pair


def propose_token_pair(
    tokenizer,
    harmful_logits: torch.Tensor,
    harmless_logits: torch.Tensor,
    k: int = 10,
    *,
    refusal: tuple[int, str] | None = None,
    compliance: tuple[int, str] | None = None,
) -> tuple[RefusalTokens, list[dict]]:
    """Propose a refusal/compliance token pair from the model's own next-token distributions.

    From the mean last-position log-probs over each set (``[n, vocab]`` or ``[n, T, vocab]``):
    refusal = the token among the harmful set's top-``k`` with the largest
    ``mean harmful logprob - mean harmless logprob``; compliance = the token among the harmless
    set's top-``k`` with the largest reverse difference. Returns the pair and a candidate table
    (one dict per top-k token: ``side``, ``token_id``, ``token``, ``harmful_logprob``,
    ``harmless_logprob``, ``diff``, ``chosen``).

    ``refusal=(id, str)`` or ``compliance=(id, str)`` fixes that side (``--refusal Sorry
    --compliance auto``): only the other side is proposed (never the fixed token itself) and the
    table lists only the proposed side's candidates.
    """
    fixed = {"harmful": _fixed_token(refusal), "harmless": _fixed_token(compliance)}
    if fixed["harmful"] is not None and fixed["harmless"] is not None:
        raise RefusalLabError("propose_token_pair needs at least one side to propose; both tokens were given.")
    h = torch.log_softmax(_last(harmful_logits).to(torch.float64), dim=-1).mean(0)  # [vocab]
    s = torch.log_softmax(_last(harmless_logits).to(torch.float64), dim=-1).mean(0)
    if h.shape != s.shape:
        raise PromptError(
            f"Harmful and harmless logits have different vocab sizes ({h.shape[0]} vs {s.shape[0]}); "
            "pass logits from the same model."
        )
    k = max(1, min(int(k), h.shape[0]))
    table: list[dict] = []
    chosen: dict[str, int] = {}
    for side, mine, other in (("harmful", h, s), ("harmless", s, h)):
        if fixed[side] is not None:
            chosen[side] = fixed[side][0]
            continue
        other_fixed = fixed["harmless" if side == "harmful" else "harmful"]
        ranked = mine.clone()
        if other_fixed is not None:  # never propose the token fixed for the other side
            ranked[other_fixed[0]] = -torch.inf
        top = torch.topk(ranked, min(k, ranked.shape[0] - (other_fixed is not None))).indices
        diff = (mine - other)[top]
        best = int(top[int(torch.argmax(diff))])
        chosen[side] = best
        for t, d in zip(top.tolist(), diff.tolist()):
            table.append(
                {
                    "side": side,
                    "token_id": int(t),
                    "token": _tok_strs(tokenizer, [t])[0],
                    "harmful_logprob": float(h[t]),
                    "harmless_logprob": float(s[t]),
                    "diff": float(d),
                    "chosen": t == best,
                }
            )
    r, c = chosen["harmful"], chosen["harmless"]
    if r == c:
        raise PromptError(
            "The same token is the best refusal and compliance candidate, so the two prompt sets do "
            "not separate; pass the token pair explicitly (e.g. refusal='Sorry', compliance='Sure')."
        )
    rs, cs = _tok_strs(tokenizer, [r, c])
    if fixed["harmful"] is not None:
        rs = fixed["harmful"][1]
    if fixed["harmless"] is not None:
        cs = fixed["harmless"][1]
    return RefusalTokens(r, c, rs, cs), table


def _fixed_token(x) -> tuple[int, str] | None:
    """``(id, str)`` of a fixed side of :func:`propose_token_pair` (``None``: propose it)."""
    if x is None:
        return None
    i, st = x
    return int(i), str(st)
