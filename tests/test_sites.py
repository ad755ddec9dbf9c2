"""What every site of :class:`HookedChatModel` means, checked on every tiny architecture (fp32).

References are independent of our site machinery wherever possible: the plain HF forward (with
cumsum position ids, as ``generate`` uses), torch hooks registered directly on HF modules, and
HF ``generate``. Each assert states its tolerance; fp32 throughout.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from refusal_lab.errors import SiteError
from refusal_lab.models.edits import Add, ProjectOut, Replace
from refusal_lab.models.hooked import BLOCK_SITES, HookedChatModel
from tests.tiny_models import tiny_model

try:  # tests/ as a package or as rootdir-inserted folder
    from tests.conftest import random_batch
except ImportError:  # pragma: no cover
    from conftest import random_batch

# Tolerances (fp32, tiny random models, |activations| ~ 1).
EXACT = dict(atol=0.0, rtol=0.0)  # our loop adds tensors itself: the identities must be exact
TIGHT = dict(atol=1e-5, rtol=1e-5)  # same HF modules, different mask/position plumbing
LOGITS = dict(atol=1e-4, rtol=1e-4)  # end-to-end logits against the plain HF forward


def cumsum_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, computed here independently of hooked.py."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def hf_forward(model: HookedChatModel, ids, mask, **kw):
    return model.hf_model(input_ids=ids, attention_mask=mask, position_ids=cumsum_positions(mask), **kw)


def valid(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool()


def hf_capture(model: HookedChatModel, ids, mask, modules: dict[str, torch.nn.Module], pre: bool):
    """Run the plain HF forward and record each module's input (pre=True) or output."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for key, mod in modules.items():
        if pre:
            hook = lambda m, args, key=key: got.__setitem__(key, args[0].detach())  # noqa: E731
            handles.append(mod.register_forward_pre_hook(hook))
        else:
            hook = lambda m, args, out, key=key: got.__setitem__(key, out.detach())  # noqa: E731
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = hf_forward(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    return got, out


@pytest.fixture(params=["llama", "gemma2"], scope="module")
def biased(request) -> HookedChatModel:
    """Tiny models whose o_proj has a bias (none of the default tiny models does)."""
    return HookedChatModel(tiny_model(request.param, attention_bias=True), name=f"tiny-{request.param}-bias")


# ---------------------------------------------------------------------------- residual stream
def test_residual_stream_identities(tiny):
    ids, mask = random_batch(tiny)
    _, cache = tiny.run_with_cache(ids, mask)
    n = tiny.cfg.n_layers
    # hook_embed is what enters block 0: exact
    torch.testing.assert_close(cache["hook_embed"], cache["blocks.0.hook_resid_pre"], **EXACT)
    for l in range(n):
        p = f"blocks.{l}."
        # resid_pre + attn_out == resid_mid, resid_mid + mlp_out == resid_post: exact (atol=0)
        pre, mid, post = cache[p + "hook_resid_pre"], cache[p + "hook_resid_mid"], cache[p + "hook_resid_post"]
        torch.testing.assert_close(pre + cache[p + "hook_attn_out"], mid, **EXACT)
        torch.testing.assert_close(mid + cache[p + "hook_mlp_out"], post, **EXACT)
        if l + 1 < n:
            torch.testing.assert_close(cache[p + "hook_resid_post"], cache[f"blocks.{l + 1}.hook_resid_pre"], **EXACT)


def test_residual_stream_matches_hf_hidden_states(tiny):
    """HF's hidden_states[l] is the input of layer l (hidden_states[0]: scaled embeddings)."""
    ids, mask = random_batch(tiny)
    _, cache = tiny.run_with_cache(ids, mask)
    with torch.no_grad():
        hs = hf_forward(tiny, ids, mask, output_hidden_states=True).hidden_states
    v = valid(mask)
    torch.testing.assert_close(cache["hook_embed"][v], hs[0][v], **EXACT)
    for l in range(tiny.cfg.n_layers):
        # atol=1e-5, rtol=1e-5 on non-pad positions
        torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_pre"][v], hs[l][v], **TIGHT)


def test_norm_sites_are_the_sublayer_inputs(tiny):
    """ln1/ln2.hook_normalized are the exact inputs of attention / the MLP (torch pre-hooks on
    the HF modules during the plain HF forward)."""
    a = tiny.adapter
    ids, mask = random_batch(tiny)
    _, cache = tiny.run_with_cache(ids, mask)
    n = tiny.cfg.n_layers
    # attention's input is q_proj's input; the MLP's input is the MLP module's input
    q_in = {f"blocks.{l}.ln1.hook_normalized": a.attn(l).q_proj for l in range(n)}
    got_q, _ = hf_capture(tiny, ids, mask, q_in, pre=True)
    got_m, _ = hf_capture(tiny, ids, mask, {f"blocks.{l}.ln2.hook_normalized": a.mlp(l) for l in range(n)}, pre=True)
    v = valid(mask)
    for name, ref in {**got_q, **got_m}.items():
        torch.testing.assert_close(cache[name][v], ref[v], **TIGHT)  # atol=1e-5, rtol=1e-5


# ---------------------------------------------------------------------------- attention heads
def _check_head_results(model: HookedChatModel):
    a = model.adapter
    ids, mask = random_batch(model)
    _, cache = model.run_with_cache(ids, mask)
    n = model.cfg.n_layers
    o_out, _ = hf_capture(model, ids, mask, {str(l): a.o_proj(l) for l in range(n)}, pre=False)
    post_in = {}
    if model.cfg.has_post_norms:
        # the Gemma post-attention norm's input, by its HF name, from the plain HF forward
        post_in, _ = hf_capture(model, ids, mask, {str(l): model.hf_model.model.layers[l].post_attention_layernorm
                                                   for l in range(n)}, pre=True)
    v = valid(mask)
    for l in range(n):
        p = f"blocks.{l}."
        result = cache[p + "attn.hook_result"]
        assert result.shape == (*ids.shape, model.cfg.n_heads, model.cfg.d_model)
        bias = a.o_proj(l).bias
        raw = result.sum(-2) + (bias if bias is not None else 0.0)
        # heads + bias == o_proj output (atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(raw[v], o_out[str(l)][v], **TIGHT)
        if not model.cfg.has_post_norms:
            torch.testing.assert_close(raw, cache[p + "hook_attn_out"], **TIGHT)
            torch.testing.assert_close(model.head_results(cache, l), result, **EXACT)
            continue
        # Gemma: the pre-norm sum is post_attention_layernorm's input (atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(raw[v], post_in[str(l)][v], **TIGHT)
        # ... and head_results (post-norm shares) + the scaled bias sum to hook_attn_out.
        norm = model.hf_model.model.layers[l].post_attention_layernorm
        scale = (1.0 + norm.weight) * torch.rsqrt(raw.pow(2).mean(-1, keepdim=True) + norm.eps)  # computed here
        shares = model.head_results(cache, l)
        torch.testing.assert_close(shares, result * scale[..., None, :], **TIGHT)
        scaled_bias = bias * scale if bias is not None else 0.0
        torch.testing.assert_close(shares.sum(-2) + scaled_bias, cache[p + "hook_attn_out"], **TIGHT)
        # pre-norm shares are the raw per-head results
        torch.testing.assert_close(model.head_results(cache, l, after_post_norm=False), result, **EXACT)


def test_head_results_sum_to_attention_output(tiny):
    _check_head_results(tiny)


def test_head_results_with_o_proj_bias(biased):
    assert biased.adapter.o_proj(0).bias is not None
    _check_head_results(biased)


def test_hook_z_is_o_proj_input(tiny):
    """attn.hook_z reshaped to [b, p, h*dh] is the o_proj input from an independent torch
    forward_pre_hook on the HF module (both during the plain HF forward and during ours)."""
    a = tiny.adapter
    n = tiny.cfg.n_layers
    ids, mask = random_batch(tiny)
    mods = {str(l): a.o_proj(l) for l in range(n)}
    got_hf, _ = hf_capture(tiny, ids, mask, mods, pre=True)
    ours_in: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, k=k: ours_in.__setitem__(k, args[0].detach()))
               for k, m in mods.items()]
    try:
        _, cache = tiny.run_with_cache(ids, mask, names=lambda s: s.endswith("attn.hook_z"))
    finally:
        for h in handles:
            h.remove()
    v = valid(mask)
    for l in range(n):
        z = cache[f"blocks.{l}.attn.hook_z"]
        assert z.shape == (*ids.shape, tiny.cfg.n_heads, tiny.cfg.d_head)
        flat = z.reshape(*ids.shape, -1)
        torch.testing.assert_close(flat, ours_in[str(l)], **EXACT)  # same forward: exact
        torch.testing.assert_close(flat[v], got_hf[str(l)][v], **TIGHT)  # plain HF: atol=1e-5, rtol=1e-5


# ---------------------------------------------------------------------------- logits
def test_ln_final_unembedded_gives_logits(tiny):
    ids, mask = random_batch(tiny)
    logits, cache = tiny.run_with_cache(ids, mask)
    normed = cache["ln_final.hook_normalized"]
    with torch.no_grad():
        ref = tiny.hf_model.lm_head(normed)
    cap = getattr(tiny.hf_model.config, "final_logit_softcapping", None)
    if cap:
        ref = torch.tanh(ref / cap) * cap
    torch.testing.assert_close(logits, ref, **TIGHT)  # atol=1e-5, rtol=1e-5
    # W_U is the TL-oriented unembedding
    torch.testing.assert_close(tiny.W_U, tiny.hf_model.lm_head.weight.T, **EXACT)


def test_logits_match_plain_hf_forward(tiny):
    ids, mask = random_batch(tiny, b=3, T=12, pad=3)
    logits = tiny(ids, mask)
    with torch.no_grad():
        out = hf_forward(tiny, ids, mask, output_hidden_states=True)
    v = valid(mask)
    torch.testing.assert_close(logits[v], out.logits[v], **LOGITS)  # atol=1e-4, rtol=1e-4, non-pad
    last = tiny(ids, mask, logits="last")
    torch.testing.assert_close(last, logits[:, -1], **TIGHT)


def test_prefill_continues_a_recorded_prefix(tiny):
    """Tokens prefilled over a recorded key/value prefix are the full forward's later columns, and
    their hooks see absolute columns."""
    ids, mask = random_batch(tiny, b=3, T=10, pad=2)
    site, P = "blocks.1.hook_resid_post", 6
    full = tiny.prefill(ids, mask, names=[site])
    head = tiny.prefill(ids[:, :P], mask[:, :P], record_kv=True, logits="none")
    assert head.logits is None and head.cache is None and sorted(head.kv) == list(range(tiny.cfg.n_layers))
    assert head.kv[0][0].shape[2] == P and head.resid.shape == (3, P, tiny.cfg.d_model)
    seen = []
    tail = tiny.prefill(ids[:, P:], mask, kv_prefix=head.kv, names=[site],
                        fwd_hooks=[(site, lambda x, hook: seen.append(hook.cols.tolist()))])
    assert seen == [list(range(P, 10))] and tail.kv == {}
    torch.testing.assert_close(tail.logits, full.logits[:, P:], **TIGHT)  # atol=1e-5, rtol=1e-5
    torch.testing.assert_close(tail.cache[site], full.cache[site][:, P:], **TIGHT)
    ids1 = ids[1:]  # no padding: the mask over prefix and tokens may be left out
    cont = tiny.prefill(ids1[:, P:], kv_prefix=tiny.prefill(ids1[:, :P], record_kv=True, logits="none").kv)
    torch.testing.assert_close(cont.logits, tiny(ids1)[:, P:], **TIGHT)
    last = tiny.prefill(ids, mask, logits="last").logits
    assert torch.equal(last, tiny(ids, mask, logits="last")) and last.shape == (3, tiny.cfg.d_vocab)
    with pytest.raises(ValueError, match="logits"):
        tiny.prefill(ids, mask, logits="first")


def test_eos_ids_are_the_generation_configs_then_the_tokenizers():
    m = HookedChatModel(tiny_model("qwen2"), name="tiny-eos")
    m.hf_model.generation_config.eos_token_id = [5, 7]
    m.tokenizer = type("Tok", (), {"eos_token_id": 7})()
    assert m.eos_ids() == [5, 7]
    m.hf_model.generation_config.eos_token_id = None
    m.tokenizer.eos_token_id = 3
    assert m.eos_ids() == [3]


def test_identity_hooks_leave_logits_bit_identical(tiny):
    ids, mask = random_batch(tiny)
    base = tiny(ids, mask)
    names = tiny.hook_names()
    assert len(names) == 2 + len(BLOCK_SITES) * tiny.cfg.n_layers
    seen: list[str] = []

    def identity(x, hook):
        seen.append(hook.name)
        return x

    out = tiny(ids, mask, fwd_hooks=[(n, identity) for n in names])
    assert torch.equal(out, base)  # bit-identical
    assert sorted(seen) == sorted(names)  # every site fired exactly once

    c = tiny.cfg
    shapes = {"attn.hook_z": (c.n_heads, c.d_head), "attn.hook_result": (c.n_heads, c.d_model)}
    g = torch.Generator().manual_seed(1)
    adds = []
    for n in names:
        if n.endswith("attn.hook_pattern"):  # [b, h, q, k]: edits refuse it (tests/test_attention_pattern.py)
            continue
        shape = next((s for k, s in shapes.items() if n.endswith(k)), (c.d_model,))
        adds.append((n, Add(vector=torch.randn(shape, generator=g), alpha=0.0)))
    with tiny.hooks(adds):
        out = tiny(ids, mask)
    assert torch.equal(out, base)  # bit-identical


# ---------------------------------------------------------------------------- edits
def test_replace_one_position_changes_only_that_row_and_later_columns(tiny):
    ids, mask = random_batch(tiny, b=3, T=10, pad=2)
    other, _ = random_batch(tiny, b=3, T=10, pad=0, seed=7)
    site = "blocks.1.hook_resid_pre"
    _, other_cache = tiny.run_with_cache(other, torch.ones_like(other), names=[site])
    base = tiny(ids, mask)
    row, col = 1, 4
    value = other_cache[site][row, col]
    edit = Replace(positions=[col], batch=[row], value=value)
    patched, cache = tiny.run_with_cache(ids, mask, names=[site], fwd_hooks=[(site, edit)])
    torch.testing.assert_close(cache[site][row, col], value, **EXACT)  # the patch is in place
    others = [r for r in range(ids.shape[0]) if r != row]
    torch.testing.assert_close(patched[others], base[others], atol=1e-6, rtol=0)  # other rows: unchanged
    torch.testing.assert_close(patched[row, :col], base[row, :col], atol=1e-6, rtol=0)  # earlier columns too
    diff = (patched[row, col:] - base[row, col:]).abs().amax(-1)
    assert (diff > 1e-3).all(), f"columns >= {col} should change, max |dlogit| per column: {diff}"


def test_project_out_removes_the_direction(tiny):
    ids, mask = random_batch(tiny)
    direction = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(3))
    r = direction / direction.norm()
    site = "blocks.1.hook_resid_post"
    _, before = tiny.run_with_cache(ids, mask, names=[site])
    cols = [5, 6, 9]
    edit = ProjectOut(direction=direction, positions=cols)
    _, after = tiny.run_with_cache(ids, mask, names=[site], fwd_hooks=[(site, edit)])
    x0, x1 = before[site], after[site]
    proj = x1[:, cols] @ r
    assert proj.abs().max() < 1e-5 * x0.norm(dim=-1).max(), proj  # ~0, relative to |x|
    assert (x0[:, cols] @ r).abs().max() > 1e-2  # it was not ~0 before
    # what was removed is exactly the component along r (atol=1e-5)
    torch.testing.assert_close(x0[:, cols] - x1[:, cols], (x0[:, cols] @ r)[..., None] * r, **TIGHT)
    rest = [c for c in range(ids.shape[1]) if c not in cols]
    torch.testing.assert_close(x1[:, rest], x0[:, rest], **EXACT)  # other columns untouched


# ---------------------------------------------------------------------------- errors
def test_bad_site_names_raise_site_error(tiny):
    ids, mask = random_batch(tiny, b=1, T=4, pad=0)
    n = tiny.cfg.n_layers
    with pytest.raises(SiteError, match=r"'blocks\.0\.hook_nonsense' is not a site.*hook_resid_pre"):
        tiny.run_with_cache(ids, mask, names=["blocks.0.hook_nonsense"])
    with pytest.raises(SiteError, match="is not a site"):
        tiny(ids, mask, fwd_hooks=[("resid_pre", lambda x, h: x)])
    with pytest.raises(SiteError, match=rf"Layer {n} is out of range.*layers 0\.\.{n - 1}"):
        tiny(ids, mask, fwd_hooks=[(f"blocks.{n}.hook_resid_pre", lambda x, h: x)])
    with pytest.raises(SiteError, match=r"Layer 99 is out of range"):
        with tiny.hooks([("blocks.99.hook_attn_out", lambda x, h: x)]):
            pass
    assert tiny._ctx_hooks == []  # a refused context adds nothing


def test_bad_heads_raise_site_error(tiny):
    ids, mask = random_batch(tiny, b=1, T=4, pad=0)
    h = tiny.cfg.n_heads
    assert tiny.check_head(h - 1) == h - 1
    with pytest.raises(SiteError, match=rf"Head {h} is out of range.*heads 0\.\.{h - 1}"):
        tiny.check_head(h)
    with pytest.raises(SiteError, match=r"Head -1 is out of range"):
        tiny.check_head(-1)
    # an edit of one head validates the head when it runs
    bad = Add(vector=torch.zeros(tiny.cfg.d_head), head=h)
    with pytest.raises(SiteError, match=rf"Head {h} is out of range"):
        tiny(ids, mask, fwd_hooks=[("blocks.0.attn.hook_z", bad)])
    # ... and refuses a site that has no head axis
    with pytest.raises(SiteError, match="head"):
        tiny(ids, mask, fwd_hooks=[("blocks.0.hook_resid_pre", Add(vector=torch.zeros(tiny.cfg.d_model), head=0))])


def test_a_hook_returning_a_wrong_shape_raises_site_error(tiny):
    ids, mask = random_batch(tiny, b=1, T=4, pad=0)
    with pytest.raises(SiteError, match="returned shape"):
        tiny(ids, mask, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, h: x[..., :3])])


# ---------------------------------------------------------------------------- generation
N_NEW = 8


def test_generate_matches_hf_greedy(tiny):
    ids, _ = random_batch(tiny, b=1, T=7, pad=0, seed=5)
    ours = tiny.generate(ids, max_new_tokens=N_NEW, stop_at_eos=False)
    gc = GenerationConfig(do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                          eos_token_id=None, pad_token_id=0, bos_token_id=None)
    with torch.no_grad():
        ref = tiny.hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    ref = ref[:, ids.shape[1]:]
    assert ref.shape[1] == N_NEW
    assert torch.equal(ours, ref), (ours, ref)  # exact tokens


def test_generate_with_left_padding_equals_unpadded(tiny):
    g = torch.Generator().manual_seed(11)
    short = torch.randint(0, tiny.cfg.d_vocab, (1, 5), generator=g)
    long = torch.randint(0, tiny.cfg.d_vocab, (1, 9), generator=g)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    batch = tiny.generate(ids, mask, max_new_tokens=N_NEW, stop_at_eos=False)
    alone_short = tiny.generate(short, max_new_tokens=N_NEW, stop_at_eos=False)
    alone_long = tiny.generate(long, max_new_tokens=N_NEW, stop_at_eos=False)
    assert torch.equal(batch[0], alone_short[0]), (batch[0], alone_short[0])  # exact tokens
    assert torch.equal(batch[1], alone_long[0]), (batch[1], alone_long[0])
    # the padded forward's last-position logits equal the unpadded ones (atol=1e-5)
    torch.testing.assert_close(tiny(ids, mask, logits="last")[0], tiny(short, logits="last")[0], **TIGHT)


def test_generate_stops_at_eos(tiny):
    """With stop_at_eos, finished rows keep emitting eos and generation ends when all are done."""
    ids, _ = random_batch(tiny, b=1, T=6, pad=0, seed=5)
    free = tiny.generate(ids, max_new_tokens=N_NEW, stop_at_eos=False)
    eos = int(free[0, 2])
    old = tiny.hf_model.generation_config.eos_token_id
    tiny.hf_model.generation_config.eos_token_id = eos
    try:
        out = tiny.generate(ids, max_new_tokens=N_NEW, stop_at_eos=True)
    finally:
        tiny.hf_model.generation_config.eos_token_id = old
    first = int((free[0] == eos).nonzero()[0])
    assert torch.equal(out[0], free[0, : first + 1])


def test_edits_take_their_value_first(tiny):
    """The module docstring's usage, ``Add(v, alpha=..., positions=...)``, works as written."""
    v = torch.randn(tiny.cfg.d_model)
    add = Add(v, alpha=4.0, positions=[3])
    assert add.vector is v and add.positions == [3] and add.alpha == 4.0
    assert ProjectOut(v).direction is v and Replace(v, batch=[0]).value is v
    ids, mask = random_batch(tiny, b=2, T=6, pad=0)
    site = "blocks.0.hook_resid_pre"
    _, base = tiny.run_with_cache(ids, mask, names=[site])
    _, cache = tiny.run_with_cache(ids, mask, names=[site], fwd_hooks=[(site, add)])
    expected = base[site].clone()
    expected[:, 3] += 4.0 * v
    torch.testing.assert_close(cache[site], expected, **EXACT)
