"""Weight orthogonalisation equals hook-based directional ablation (tiny models, fp32)."""

import pytest
import torch
import transformers

from refusal_lab.errors import RefusalLabError
from refusal_lab.models.hooked import HookedChatModel
from refusal_lab.models.tiny import tiny_model
from refusal_lab.steering.abliterate import orthogonalize_weights, save_abliterated
from refusal_lab.steering.interventions import ablation_hooks
from tests.conftest import random_batch

PLAIN = ("llama", "qwen2", "qwen3", "mistral")


def _direction(d, seed=7):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


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

    orthogonalize_weights(edited, r)
    save_abliterated(edited, tmp_path / "abl")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "abl"), dtype=torch.float32).eval()
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        got = loaded(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)

    # the direction's component is ~0 at every residual site of the orthogonalised model
    hooked = HookedChatModel(loaded, name=arch)
    _, cache = hooked.run_with_cache(ids, mask)
    ru = (r / r.norm()).to(torch.float32)
    sites = ["hook_embed"] + [f"blocks.{l}.{s}" for l in range(hooked.cfg.n_layers)
                              for s in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")]
    for s in sites:
        assert (cache[s] @ ru).abs().max() < 1e-4, s
    # the unembedding is untouched (tied models are untied first)
    torch.testing.assert_close(loaded.lm_head.weight, ref.adapter.lm_head.weight)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_gemma_post_norms_refused(arch):
    m = HookedChatModel(tiny_model(arch), name=arch)
    before = m.adapter.o_proj(0).weight.clone()
    with pytest.raises(RefusalLabError, match="post-attention/post-MLP RMSNorms"):
        orthogonalize_weights(m, _direction(m.cfg.d_model))
    assert torch.equal(m.adapter.o_proj(0).weight, before)
