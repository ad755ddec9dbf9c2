"""The attention-pattern site ``blocks.{l}.attn.hook_pattern`` on every tiny architecture (fp32).

References: Hugging Face's own eager attention weights (``output_attentions=True``) on a copy of the
same weights, TransformerLens's ``TransformerBridge`` (booted as in test_transformerlens_parity),
and hand checks of the masks. Each assert states its tolerance; observed maxima are in comments.
"""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_utils import AttentionInterface

from refusal_lab.errors import SiteError
from refusal_lab.models.edits import Replace
from refusal_lab.models.pattern import PATTERN_IMPL
from tests.tiny_models import tiny_model

try:  # tests/ as a package or as rootdir-inserted folder
    from tests.conftest import random_batch
except ImportError:  # pragma: no cover
    from conftest import random_batch

try:  # the bridge's offline boot and its tokenizer folder, shared with the TransformerLens parity tests
    from tests.test_transformerlens_parity import boot_bridge, tokenizer_dir  # noqa: F401
except (ImportError, pytest.skip.Exception):  # pragma: no cover - transformer_lens not installed

    @pytest.fixture
    def tokenizer_dir():
        pytest.skip("transformer_lens is not installed")

PARITY = dict(atol=1e-5, rtol=0.0)  # vs HF eager / the bridge (observed max |diff| <= 6e-7)
REROUTE = dict(atol=1e-6, rtol=0.0)  # an edited sdpa layer runs eager: fp rounding only


def patterns(model, ids, mask, **kw):
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(ids, mask, names=names, **kw)
    return [cache[n] for n in names]


def query_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, h, q, k] -> [valid queries, h, k]: the rows of real (non-pad) query columns."""
    return x.permute(0, 2, 1, 3)[mask.bool()]


def test_pattern_matches_hf_eager_attention_weights(tiny):
    arch = tiny.cfg.model_type
    hf = tiny_model(arch)  # same seed: the same weights, checked below
    assert all(torch.equal(a, b) for a, b in zip(tiny.hf_model.state_dict().values(), hf.state_dict().values()))
    hf.config._attn_implementation = "eager"
    ids, mask = random_batch(tiny, b=3, T=10, pad=2)  # row 0 left-padded; T > sliding window (5)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                 output_attentions=True).attentions
        ours = patterns(tiny, ids, mask)
    for l, (p, r) in enumerate(zip(ours, ref)):
        assert p.shape == (3, tiny.cfg.n_heads, 10, 10) == r.shape
        torch.testing.assert_close(query_rows(p, mask), query_rows(r, mask), **PARITY, msg=f"layer {l}")


def test_rows_are_distributions_over_allowed_keys(tiny):
    ids, mask = random_batch(tiny, b=3, T=10, pad=2)
    with torch.no_grad():
        ours = patterns(tiny, ids, mask)
    q = torch.arange(10)
    windows = [tiny.adapter.sliding_window(l) for l in range(tiny.cfg.n_layers)]
    if tiny.cfg.model_type == "gemma2":
        assert 5 in windows  # the tiny Gemma 2 has sliding layers, window 5
    for l, p in enumerate(ours):
        allowed = (q[None, :] <= q[:, None])[None] & mask.bool()[:, None, :]  # [b, q, k]: causal, real keys
        if windows[l]:
            allowed &= (q[:, None] - q[None, :] < windows[l])[None]
        allowed = allowed[:, None].expand_as(p)
        rows = mask.bool()[:, None, :, None].expand_as(p)  # real query rows
        assert torch.equal(p[rows & ~allowed], torch.zeros_like(p[rows & ~allowed]))  # exactly 0
        sums = query_rows(p, mask).sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-6, rtol=0.0)


def test_pattern_matches_transformer_bridge(tiny, tokenizer_dir):
    arch = tiny.cfg.model_type
    bridge = boot_bridge(tiny_model(arch), tokenizer_dir)  # its own copy: the bridge rewires what it wraps
    ids, mask = random_batch(tiny, b=3, T=10, pad=2)
    with torch.no_grad():
        ours = patterns(tiny, ids, mask)
        _, b_cache = bridge.run_with_cache(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    for l, p in enumerate(ours):
        theirs = b_cache[f"blocks.{l}.attn.hook_pattern"]
        assert p.shape == theirs.shape
        torch.testing.assert_close(query_rows(p, mask), query_rows(theirs, mask), **PARITY, msg=f"layer {l}")


def test_reading_the_pattern_leaves_everything_else_bitwise_unchanged(tiny):
    ids, mask = random_batch(tiny)
    others = lambda n: not n.endswith("attn.hook_pattern")  # noqa: E731
    with torch.no_grad():
        logits, base = tiny.run_with_cache(ids, mask, names=others)
        logits_p, cache = tiny.run_with_cache(ids, mask, names=True)  # every site, patterns included
        seen = []
        hooks = [(f"blocks.{l}.attn.hook_pattern", lambda p, h: seen.append(h.name)) for l in range(tiny.cfg.n_layers)]
        logits_h, hooked = tiny.run_with_cache(ids, mask, names=others, fwd_hooks=hooks)  # read-only hooks
    assert len(seen) == tiny.cfg.n_layers
    assert torch.equal(logits, logits_p) and torch.equal(logits, logits_h)
    for name, act in base.items():
        assert torch.equal(act, cache[name]) and torch.equal(act, hooked[name]), name


def test_unwatched_runs_never_compute_a_pattern(tiny, monkeypatch):
    calls = []
    real = AttentionInterface._global_mapping[PATTERN_IMPL]
    monkeypatch.setitem(AttentionInterface._global_mapping, PATTERN_IMPL,
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    impl = tiny.hf_model.config._attn_implementation
    ids, mask = random_batch(tiny)
    with torch.no_grad():
        tiny.run_with_cache(ids, mask, names=lambda n: not n.endswith("attn.hook_pattern"))
        assert calls == []
        tiny.run_with_cache(ids, mask, names=["blocks.1.attn.hook_pattern"])
    assert calls == [1] and tiny.hf_model.config._attn_implementation == impl  # one layer, switched back


def test_editing_the_pattern_drives_the_attention_output(tiny):
    """Head 0 of layer 1 made to attend only to its own column: its hook_z there is that column's value."""
    l = 1
    ids, mask = random_batch(tiny, pad=0)
    T = ids.shape[1]

    def diagonal(p, hook):
        p = p.clone()
        p[:, 0] = torch.eye(T, dtype=p.dtype)
        return p

    z = f"blocks.{l}.attn.hook_z"
    with torch.no_grad():
        clean = tiny.prefill(ids, mask, names=[z])
        out = tiny.prefill(ids, mask, names=[z], fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", diagonal)], record_kv=True)
    values = out.kv[l][1]  # [b, kv_heads, T, d_head]; layer 1's input is not affected by its own edit
    torch.testing.assert_close(out.cache[z][:, :, 0], values[:, 0], **REROUTE)
    torch.testing.assert_close(out.cache[z][:, :, 1:], clean.cache[z][:, :, 1:], **REROUTE)  # other heads as before
    assert (out.cache[z][:, :, 0] - clean.cache[z][:, :, 0]).abs().max() > 1e-2
    assert (out.logits - clean.logits).abs().max() > 1e-4


def test_an_in_place_edit_counts_as_an_edit(tiny):
    """A hook that writes into the pattern and returns None drives the layer like one that returns a copy."""
    ids, mask = random_batch(tiny)
    site = "blocks.0.attn.hook_pattern"

    def in_place(p, hook):  # head 0 silenced (a uniform scale would be undone by Gemma's post-norm)
        p[:, 0] = 0.0

    def copy(p, hook):
        p = p.clone()
        p[:, 0] = 0.0
        return p

    with torch.no_grad():
        a = tiny(ids, mask, fwd_hooks=[(site, in_place)])
        b = tiny(ids, mask, fwd_hooks=[(site, copy)])
        clean = tiny(ids, mask)
    assert torch.equal(a, b) and (a - clean).abs().max() > 1e-3


def test_pattern_over_a_cached_prefix_is_the_full_runs_rows(tiny):
    ids, mask = random_batch(tiny, pad=2)
    with torch.no_grad():
        full = patterns(tiny, ids, mask)
        prefix = tiny.prefill(ids[:, :6], mask[:, :6], record_kv=True, logits="none")
        names = [f"blocks.{l}.attn.hook_pattern" for l in range(tiny.cfg.n_layers)]
        rest = tiny.prefill(ids[:, 6:], mask, kv_prefix=prefix.kv, names=names, logits="none").cache
    for l, n in enumerate(names):
        assert rest[n].shape == (3, tiny.cfg.n_heads, 4, 10)
        torch.testing.assert_close(rest[n], full[l][:, :, 6:], **REROUTE)


def test_ready_made_edits_refuse_the_pattern_site(tiny):
    ids, mask = random_batch(tiny)
    edit = Replace(value=torch.zeros(()), positions=[3])
    with pytest.raises(SiteError, match="hook_pattern"):
        tiny(ids, mask, fwd_hooks=[("blocks.0.attn.hook_pattern", edit)])

