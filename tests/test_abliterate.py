"""Weight orthogonalisation vs hook-based directional ablation (tiny models, fp32).

Llama/Qwen/Mistral: the orthogonalised model equals hook ablation exactly. Gemma 2/3 (post-norms):
the direction is removed exactly from every residual write (oblique projector P = I - D⁻¹r (Dr)ᵀ on
o_proj/down_proj), and each sublayer write equals hook ablation's times rms(x)/rms(Px).
"""

import pytest
import torch
import transformers

from refusal_lab.errors import RefusalLabError
from refusal_lab.models.hooked import HookedChatModel
from tests.tiny_models import tiny_model
from refusal_lab.steering.abliterate import orthogonalize_weights, save_abliterated
from refusal_lab.steering.interventions import ablation_hooks
from tests.conftest import random_batch

PLAIN = ("llama", "qwen2", "qwen3", "mistral")
GEMMA = ("gemma2", "gemma3_text")
RESID_SITES = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")


def _direction(d, seed=7):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gemma(arch, seed=0):
    """A tiny Gemma with an o_proj bias and every norm weight random (checked non-trivial)."""
    hf = tiny_model(arch, seed=seed, attention_bias=True)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                assert p.std() > 0.15, name  # gain 1 + w far from the identity
    return HookedChatModel(hf, name=arch)


def _sites(model):
    return ["hook_embed"] + [f"blocks.{l}.{s}" for l in range(model.cfg.n_layers) for s in RESID_SITES]


def _load_plain(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _logits(hf, ids, mask):
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


@pytest.mark.parametrize("arch", PLAIN)
@pytest.mark.parametrize("tied", [False, True])
def test_orthogonalised_equals_hook_ablation(arch, tied, tmp_path):
    kw = {"tie_word_embeddings": True} if tied else {}
    ref = HookedChatModel(tiny_model(arch, **kw), name=arch)
    edited = HookedChatModel(tiny_model(arch, **kw), name=arch)
    ids, mask = random_batch(ref, b=3, T=10, pad=2)
    r = _direction(ref.cfg.d_model)
    with torch.no_grad():
        want = ref(ids, mask, fwd_hooks=ablation_hooks(ref, r))
        base = ref(ids, mask)
    assert (want - base).abs().max() > 1e-3  # the ablation does something

    report = orthogonalize_weights(edited, r)
    assert report.exact
    save_abliterated(edited, tmp_path / "abl")
    loaded = _load_plain(tmp_path / "abl")
    got = _logits(loaded, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)

    # the direction's component is ~0 at every residual site of the orthogonalised model
    hooked = HookedChatModel(loaded, name=arch)
    _, cache = hooked.run_with_cache(ids, mask)
    ru = (r / r.norm()).to(torch.float32)
    for s in _sites(hooked):
        assert (cache[s] @ ru).abs().max() < 1e-4, s
    # the unembedding is untouched (tied models are untied first)
    torch.testing.assert_close(loaded.lm_head.weight, ref.adapter.lm_head.weight)


# ------------------------------------------------------------------------------- Gemma 2/3


@pytest.mark.parametrize("arch", GEMMA)
def test_gemma_saved_model_has_no_direction_at_any_residual_site(arch, tmp_path):
    """(a) The saved folder loads with plain transformers; every residual site's component along r
    is ~0 relative to the activation norm; the (tied) unembedding is untouched."""
    ref, edited = _gemma(arch), _gemma(arch)
    assert ref.hf_model.config.tie_word_embeddings  # Gemma ties: untying must keep lm_head
    ids, mask = random_batch(ref, b=3, T=10, pad=2)
    r = _direction(ref.cfg.d_model)
    ru = (r / r.norm()).to(torch.float32)
    _, base_cache = ref.run_with_cache(ids, mask)
    assert max(float((base_cache[s] @ ru).abs().max()) for s in _sites(ref)) > 1e-2  # r is there to remove

    report = orthogonalize_weights(edited, r)
    assert not report.exact and "rms(x)/rms(Px)" in report.note
    save_abliterated(edited, tmp_path / "abl")
    loaded = _load_plain(tmp_path / "abl")
    assert not loaded.config.tie_word_embeddings
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded, ids, mask)[real], edited(ids, mask)[real], atol=1e-5, rtol=0)

    hooked = HookedChatModel(loaded, name=arch)
    _, cache = hooked.run_with_cache(ids, mask)
    for s in _sites(hooked):
        act = cache[s][real]
        rel = (act @ ru).abs() / act.norm(dim=-1).clamp(min=1e-6)
        assert rel.max() < 1e-4, (s, float(rel.max()))
    torch.testing.assert_close(loaded.lm_head.weight, ref.adapter.lm_head.weight)


@pytest.mark.parametrize("arch", GEMMA)
def test_gemma_edit_is_the_oblique_projector(arch):
    """(b) o_proj/down_proj (weight and bias) become P W with P = I - D⁻¹ r (D r)ᵀ, D = diag(1 + w),
    built here from the raw norm weights; P is an idempotent projector with rᵀ D P = 0."""
    ref, edited = _gemma(arch), _gemma(arch)
    r = _direction(ref.cfg.d_model, seed=3)
    orthogonalize_weights(edited, r)
    ru = r / r.norm()
    I = torch.eye(ref.cfg.d_model, dtype=torch.float64)
    layers = ref.hf_model.model.layers
    for l, layer in enumerate(layers):
        for lin, norm in (("self_attn.o_proj", layer.post_attention_layernorm),
                          ("mlp.down_proj", layer.post_feedforward_layernorm)):
            D = torch.diag(1.0 + norm.weight.detach().double())
            P = I - torch.linalg.solve(D, ru)[:, None] @ (D @ ru)[None, :]
            torch.testing.assert_close(P @ P, P, atol=1e-12, rtol=0)
            assert (ru @ D @ P).abs().max() < 1e-12
            W = layers[l].get_submodule(lin).weight.double()
            W_new = edited.hf_model.model.layers[l].get_submodule(lin).weight.double()
            torch.testing.assert_close(W_new, P @ W, atol=1e-6, rtol=0)
            b = layers[l].get_submodule(lin).bias
            if b is not None:
                b_new = edited.hf_model.model.layers[l].get_submodule(lin).bias.double()
                torch.testing.assert_close(b_new, P @ b.double(), atol=1e-6, rtol=0)
    assert layers[0].self_attn.o_proj.bias is not None  # the bias path was exercised
    # embedding rows: the ordinary orthogonal projection (the sqrt(d) scale commutes with it)
    E = ref.hf_model.model.embed_tokens.weight.double()
    torch.testing.assert_close(edited.hf_model.model.embed_tokens.weight.double(),
                               E - torch.outer(E @ ru, ru), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", GEMMA)
def test_gemma_sublayer_write_is_rescaled_hook_ablation(arch):
    """(c) Same sublayer inputs in both models (resid_pre and resid_mid of every layer pinned to fixed
    random tensors): the edited write equals the hook-ablated write × rms(x)/rms(Px), where x is the
    original o_proj/down_proj output and rms includes the norm's eps."""
    ref, edited = _gemma(arch), _gemma(arch)
    r = _direction(ref.cfg.d_model, seed=5)
    orthogonalize_weights(edited, r)
    ru64 = r / r.norm()
    ids, mask = random_batch(ref, b=2, T=8, pad=2)
    g = torch.Generator().manual_seed(11)
    L, d = ref.cfg.n_layers, ref.cfg.d_model
    pins = {f"blocks.{l}.{s}": torch.randn(2, 8, d, generator=g) for l in range(L)
            for s in ("hook_resid_pre", "hook_resid_mid")}
    pin_hooks = [(n, (lambda t: lambda act, hook: t)(t)) for n, t in pins.items()]

    def unpacked(o):  # the MLP runs on the real columns only, as one [1, n, d] sequence (forward.packed)
        if o.shape[:2] == mask.shape:
            return o
        full = o.new_zeros(mask.numel(), o.shape[-1])
        full[mask.reshape(-1).bool()] = o[0]
        return full.view(*mask.shape, -1)

    def run(model):
        raw = {}
        handles = []
        for l in range(L):
            layer = model.hf_model.model.layers[l]
            for key, mod in ((f"{l}.attn", layer.self_attn.o_proj), (f"{l}.mlp", layer.mlp.down_proj)):
                handles.append(mod.register_forward_hook(
                    lambda m, i, o, key=key: raw.__setitem__(key, unpacked(o.detach()))))
        try:
            names = [f"blocks.{l}.{s}" for l in range(L) for s in ("hook_attn_out", "hook_mlp_out")]
            with torch.no_grad():
                _, cache = model.run_with_cache(ids, mask, names=names, fwd_hooks=pin_hooks)
        finally:
            for h in handles:
                h.remove()
        return raw, cache

    raw0, out0 = run(ref)
    raw1, out1 = run(edited)
    real = mask.bool()
    for l in range(L):
        layer = ref.hf_model.model.layers[l]
        for kind, site, norm in (("attn", "hook_attn_out", layer.post_attention_layernorm),
                                 ("mlp", "hook_mlp_out", layer.post_feedforward_layernorm)):
            x = raw0[f"{l}.{kind}"].double()
            D = 1.0 + norm.weight.double()
            Px = x - (x @ (D * ru64))[..., None] * (ru64 / D)
            torch.testing.assert_close(raw1[f"{l}.{kind}"].double()[real], Px[real], atol=1e-5, rtol=1e-5)
            out = out0[f"blocks.{l}.{site}"].double()
            hooked = out - (out @ ru64)[..., None] * ru64
            rms = lambda t: (t.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()  # noqa: E731
            ratio = rms(x) / rms(Px)
            assert (ratio - 1).abs()[real].max() > 1e-4  # the rescaling is really there
            want = hooked * ratio
            got = out1[f"blocks.{l}.{site}"].double()
            torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", GEMMA)
def test_gemma_logits_close_to_hook_ablation(arch):
    """(d) End to end, logits differ from hook ablation only by the accumulated RMS rescaling: print
    the max deviation next to the ablation's own effect and bound it loosely."""
    ref, edited = _gemma(arch), _gemma(arch)
    ids, mask = random_batch(ref, b=3, T=10, pad=2)
    r = _direction(ref.cfg.d_model)
    report = orthogonalize_weights(edited, r)
    real = mask.bool()
    with torch.no_grad():
        base = ref(ids, mask)[real]
        hook = ref(ids, mask, fwd_hooks=ablation_hooks(ref, r))[real]
        got = edited(ids, mask)[real]
    effect = float((hook - base).abs().max())
    dev = float((got - hook).abs().max())
    agree = float((got.argmax(-1) == hook.argmax(-1)).float().mean())
    print(f"\n{arch}: max |logit(edited) - logit(hook ablation)| = {dev:.4f}; "
          f"ablation effect max |hook - base| = {effect:.4f}; top-1 agreement {agree:.2f}; "
          f"max |P| = {report.max_projector_norm:.2f}")
    assert effect > 0.1
    assert dev < 0.3 * effect


@pytest.mark.parametrize("arch", GEMMA)
def test_gemma_zero_gain_refused_before_any_edit(arch):
    m = _gemma(arch)
    with torch.no_grad():
        m.hf_model.model.layers[1].post_feedforward_layernorm.weight[5] = -1.0  # gain 1 + w = 0
    before = {k: v.clone() for k, v in m.hf_model.state_dict().items()}
    with pytest.raises(RefusalLabError, match=r"layer 1's post_mlp_norm: its gain entry 5 is 0 \(near 0\)"):
        orthogonalize_weights(m, _direction(m.cfg.d_model))
    for k, v in m.hf_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_wrong_d_model_refused():
    m = HookedChatModel(tiny_model("qwen2"), name="qwen2")
    with pytest.raises(RefusalLabError, match="d_model is 64"):
        orthogonalize_weights(m, torch.ones(32))
