"""The greedy unembedding (models/greedy_head.py): bfloat16 bounds, float32 logits of the candidates
only — always the float32 argmax, where plain bfloat16 is not; and greedy decoding gives the same
tokens with it as without it, on every architecture."""

from __future__ import annotations

import pytest
import torch

from refusal_lab.models import greedy_head
from refusal_lab.models.greedy_head import CertifiedArgmax
from refusal_lab.models.hooked import HookedChatModel
from tests.tiny_models import SUPPORTED_TINY, tiny_model


def near_ties(seed: int = 0, vocab: int = 4000, d: int = 64, rows: int = 32):
    """An unembedding and inputs where, in every row, a runner-up trails the best logit by 1e-3:
    far above float32 rounding, far below what bfloat16 resolves."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, d, generator=g) * 0.5
    h = torch.randn(rows, d, generator=g) * 8
    for r in range(rows):
        a, b = 2 * r + 1, 2 * r + 2
        logits = w @ h[r]
        top = float(logits.max())
        hn = h[r] / h[r].norm()
        w[a] += (top + 1.0 - float(w[a] @ h[r])) / float(h[r].norm()) * hn  # a leads by ~1
        w[b] = w[a] - (1e-3 / float(h[r].norm())) * hn  # b trails a by 1e-3
        if r % 2:  # and half the time b is the winner
            w[a], w[b] = w[b].clone(), w[a].clone()
    return w, h


def test_certified_argmax_is_the_exact_argmax_where_bfloat16_is_not():
    w, h = near_ties()
    exact = (h.double() @ w.double().T).argmax(-1)
    got = CertifiedArgmax(w)(h)
    assert torch.equal(got, exact)
    assert torch.equal(got, torch.nn.functional.linear(h, w).argmax(-1))  # float32's answer too
    plain_bf16 = torch.nn.functional.linear(h.bfloat16(), w.bfloat16()).float().argmax(-1)
    assert not torch.equal(plain_bf16, exact)  # the bound is what makes it exact


def cancelling(seed: int = 0, vocab: int = 4000, d: int = 1024, rows: int = 8):
    """Large inputs and rows whose products cancel: logits of spread ~0.1 where bfloat16's error is
    ~1, so the bfloat16 ranking is noise and only the bound finds the winner."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, d, generator=g) * 0.3
    m = torch.randn(d, generator=g)
    m = m / m.norm()
    w = w - (w @ m)[:, None] * m[None]
    h = m[None] * 100 + torch.randn(rows, d, generator=g) * 0.01
    return w, h


def test_certified_argmax_where_bfloat16_ranks_at_random(monkeypatch):
    w, h = cancelling()
    exact = (h.double() @ w.double().T).argmax(-1)
    assert torch.equal(CertifiedArgmax(w)(h), exact)
    assert not torch.equal(torch.nn.functional.linear(h.bfloat16(), w.bfloat16()).float().argmax(-1), exact)
    monkeypatch.setattr(greedy_head, "SAFETY", 0.0)  # without the error bound it would be wrong
    assert not torch.equal(CertifiedArgmax(w)(h), exact)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0, 1e4])
def test_certified_argmax_on_random_rows(scale):
    g = torch.Generator().manual_seed(int(scale * 10) % 1000)
    w = torch.randn(3000, 48, generator=g)
    h = torch.randn(40, 48, generator=g) * scale
    assert torch.equal(CertifiedArgmax(w)(h), (h.double() @ w.double().T).argmax(-1))


def test_certified_argmax_falls_back_on_non_finite_rows_and_flat_logits():
    w = torch.randn(2000, 32)
    h = torch.randn(4, 32)
    h[1, 3] = float("nan")
    h[2] = float("inf")
    want = torch.nn.functional.linear(h, w).argmax(-1)
    assert torch.equal(CertifiedArgmax(w)(h), want)
    flat = torch.zeros(3, 32)  # every logit 0: every token a candidate, more than MAX_CANDIDATES allow
    w_big = torch.randn(greedy_head.MAX_CANDIDATES, 32)
    assert torch.equal(CertifiedArgmax(w_big)(flat), torch.zeros(3, dtype=torch.long))


def test_certified_argmax_keeps_leading_dimensions():
    w, h = near_ties(rows=6)
    got = CertifiedArgmax(w)(h.reshape(2, 3, -1))
    assert got.shape == (2, 3) and torch.equal(got.reshape(-1), (h.double() @ w.double().T).argmax(-1))


@pytest.mark.parametrize("arch", SUPPORTED_TINY)
def test_greedy_decoding_same_tokens_with_and_without_it(arch, monkeypatch):
    """generate() through prefill(logits='greedy') takes the certified head wherever it applies (forced
    here, so a CPU without native bfloat16 tests it too), and the tokens are those of the plain path."""
    model = HookedChatModel(tiny_model(arch, seed=5), name=f"tiny-{arch}")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.cfg.d_vocab, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    monkeypatch.setattr(greedy_head, "native_bf16", lambda: True)
    applies = CertifiedArgmax.applicable(model.adapter)
    assert applies == (not getattr(model.adapter.config, "final_logit_softcapping", None)
                       and model.adapter.lm_head.bias is None)
    fast = model.generate(ids, mask, max_new_tokens=12, stop_at_eos=False)
    assert (model._greedy_head is not None) == applies
    monkeypatch.setenv("REFUSAL_LAB_LINEAR", "torch")
    assert not CertifiedArgmax.applicable(model.adapter)
    plain = model.generate(ids, mask, max_new_tokens=12, stop_at_eos=False)
    assert torch.equal(fast, plain)


def test_greedy_tokens_follow_edited_weights(monkeypatch):
    """An in-place edit of the unembedding (abliteration edits weights) rebuilds the bfloat16 copy."""
    monkeypatch.setattr(greedy_head, "native_bf16", lambda: True)
    model = HookedChatModel(tiny_model("qwen2", seed=2), name="tiny-qwen2")
    if not CertifiedArgmax.applicable(model.adapter):
        pytest.skip("the certified head does not apply to this tiny model")
    h = torch.randn(3, model.cfg.d_model)
    first = model.greedy_tokens(h)
    w = model.adapter.lm_head.weight
    with torch.no_grad():
        w[first] *= -1  # the winners now lose
    again = model.greedy_tokens(h)
    assert torch.equal(again, model.adapter.final_logits(h).argmax(-1)) and not torch.equal(again, first)
