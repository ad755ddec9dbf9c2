"""The MLP of a padded batch runs on its real columns only (``forward.real_columns`` /
``forward.packed``): every real column's activations equal those of the plain whole-batch MLP,
on every architecture, in a forward and in a backward."""

from __future__ import annotations

import pytest
import torch

import refusal_lab.models.forward as forward
from tests.conftest import random_batch


def _plain(monkeypatch):
    monkeypatch.setattr(forward, "real_columns", lambda key_valid, resid: None)


def _sites(model):
    return [f"blocks.{l}.{s}" for l in range(model.cfg.n_layers)
            for s in ("hook_resid_pre", "hook_mlp_out", "hook_resid_post")]


def test_packed_mlp_equals_the_whole_batch(tiny, monkeypatch):
    ids, mask = random_batch(tiny, b=3, T=10, pad=4)
    names = _sites(tiny)
    calls = []
    orig = forward.packed
    monkeypatch.setattr(forward, "packed", lambda fn, x, rows: calls.append(rows.numel()) or orig(fn, x, rows))
    with torch.no_grad():
        packed_run = tiny.prefill(ids, mask, names=names, logits="all")
    assert calls and all(n == int(mask.sum()) for n in calls)  # the MLP saw the real columns only
    with monkeypatch.context() as m:
        _plain(m)
        with torch.no_grad():
            plain_run = tiny.prefill(ids, mask, names=names, logits="all")
    real = mask.bool()
    torch.testing.assert_close(packed_run.logits[real], plain_run.logits[real], rtol=1e-5, atol=1e-5)
    for n in names:
        torch.testing.assert_close(packed_run.cache[n][real], plain_run.cache[n][real], rtol=1e-5, atol=1e-5)
        if "mlp_out" in n:
            assert not packed_run.cache[n][~real].any()  # padding columns: no MLP output
    # the real rows' next-token logits are those of each prompt alone (no padding at all)
    for r in range(ids.shape[0]):
        alone = tiny.prefill(ids[r:r + 1][:, real[r]], None, logits="last").logits
        torch.testing.assert_close(packed_run.logits[r, -1], alone[0], rtol=1e-4, atol=1e-5)


def test_no_packing_without_padding_or_under_forward_ad(tiny):
    resid = torch.zeros(2, 5, tiny.cfg.d_model)
    assert forward.real_columns(torch.ones(2, 5, dtype=torch.bool), resid) is None
    assert forward.real_columns(torch.ones(2, 1, dtype=torch.bool), resid[:, :1]) is None  # a decoding step
    kv = torch.ones(2, 5, dtype=torch.bool)
    kv[0, :2] = False
    assert forward.real_columns(kv, resid).tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        assert forward.real_columns(kv, resid) is None


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_packed_mlp_gradient_equals_the_whole_batch(arch, monkeypatch):
    from refusal_lab.models.hooked import HookedChatModel
    from tests.tiny_models import tiny_model

    model = HookedChatModel(tiny_model(arch), name=f"tiny-{arch}")
    ids, mask = random_batch(model, b=3, T=9, pad=3)

    def grad():
        emb = model.hf_model.get_input_embeddings().weight
        emb.requires_grad_(True)
        try:
            out = model.prefill(ids, mask, logits="last").logits
            (g,) = torch.autograd.grad(out[:, 3].sum() - out[:, 7].sum(), emb)
        finally:
            emb.requires_grad_(False)
        return g

    packed_grad = grad()
    with monkeypatch.context() as m:
        _plain(m)
        plain_grad = grad()
    assert packed_grad.abs().sum() > 0
    torch.testing.assert_close(packed_grad, plain_grad, rtol=1e-5, atol=1e-6)
