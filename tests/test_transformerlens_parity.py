"""Our sites against TransformerLens 4.3's ``TransformerBridge`` on the same weights (fp32).

How the bridge is built offline: ``TransformerBridge.boot_transformers(name, hf_model=...,
tokenizer=...)`` wraps an already-constructed HF model and reads its config from the model (no
hub call). Three details matter:

* the bridge *modifies the model it wraps* (swaps submodules, forces eager attention), so it gets
  its own copy built with the same seed (checked to have identical weights);
* models built with ``from_config`` have an empty ``config.architectures``, which the bridge needs
  to pick its adapter (``gemma3_text`` has no fallback): ``hf_config_overrides={"architectures":
  [class name]}`` supplies it;
* ``setup_tokenizer`` re-loads the tokenizer with ``AutoTokenizer.from_pretrained(name_or_path,
  add_bos_token=True)``, so the tokenizer must come from a local folder: a word-level tokenizer
  over the tiny vocabulary is saved to a temp dir and loaded from there.

The bridge runs in its default (raw HF weights) mode: no ``enable_compatibility_mode()``, which
would fold/center weights and change what the residual sites hold. Site names map one to one,
except the norms: TL's ``ln*.hook_normalized`` is x / rms(x) *before* the gain, while ours is the
sublayer input (after the gain), i.e. the bridge's ``ln*.hook_out``; both relations are checked.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from refusal_lab.models.hooked import HookedChatModel  # noqa: E402
from tests.tiny_models import SUPPORTED_TINY, tiny_model  # noqa: E402

try:  # tests/ as a package or as rootdir-inserted folder
    from tests.conftest import random_batch  # noqa: E402
except ImportError:  # pragma: no cover
    from conftest import random_batch  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)  # fp32; ours runs sdpa, the bridge eager (observed max |diff| ~5e-6)

# every tiny architecture, plus Gemma 2 / Llama with an o_proj bias (the bias path of attn_out)
CASES = [(t, {}) for t in SUPPORTED_TINY] + [("gemma2", {"attention_bias": True}), ("llama", {"attention_bias": True})]
IDS = [t + ("-bias" if kw else "") for t, kw in CASES]

# (our site, bridge site) per layer; identical names
SHARED_BLOCK_SITES = (
    "hook_resid_pre",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    vocab = {f"t{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2", bos_token="t3"
    )
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(path)
    return str(path)


def boot_bridge(hf_model, tokenizer_dir: str):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        tokenizer_dir,
        hf_model=hf_model,
        tokenizer=transformers.AutoTokenizer.from_pretrained(tokenizer_dir),
        device="cpu",
        dtype=torch.float32,
        hf_config_overrides={"architectures": [type(hf_model).__name__]},
    )
    bridge.set_use_attn_result(True)  # per-head attn.hook_result
    return bridge


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def runs(request, tokenizer_dir):
    arch, kw = request.param
    ours = HookedChatModel(tiny_model(arch, **kw), name=f"tiny-{arch}")
    theirs = tiny_model(arch, **kw)  # same seed, separate object: the bridge rewires what it wraps
    sd_ours, sd_theirs = ours.hf_model.state_dict(), theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys() and all(torch.equal(sd_ours[k], sd_theirs[k]) for k in sd_ours)
    bridge = boot_bridge(theirs, tokenizer_dir)

    ids, mask = random_batch(ours, b=3, T=10, pad=2)  # row 0 left-padded; T > sliding window (5)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits, cache = ours.run_with_cache(ids, mask)
        b_logits, b_cache = bridge.run_with_cache(ids, attention_mask=mask, position_ids=pos)
    return dict(model=ours, bridge=bridge, logits=logits, cache=cache, b_logits=b_logits, b_cache=b_cache,
                valid=mask.bool())


def test_logits_match_bridge(runs):
    v = runs["valid"]
    torch.testing.assert_close(runs["logits"][v], runs["b_logits"][v], **TOL)  # atol=rtol=2e-5, non-pad


def test_shared_sites_match_bridge(runs):
    model, cache, b_cache, v = runs["model"], runs["cache"], runs["b_cache"], runs["valid"]
    names = ["hook_embed"] + [f"blocks.{l}.{s}" for l in range(model.cfg.n_layers) for s in SHARED_BLOCK_SITES]
    for name in names:
        assert name in b_cache, f"the bridge did not cache {name}"
        ours, theirs = cache[name], b_cache[name]
        assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
        # atol=rtol=2e-5 on non-pad positions
        torch.testing.assert_close(ours[v], theirs[v], **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_attn_out_is_after_gemma_post_norm(runs):
    """The critical Gemma case: attn_out/mlp_out are what joins the residual (after the post-norms),
    as the bridge has them, and differ from the raw o_proj sum (checked so the test can fail)."""
    model, cache, b_cache, v = runs["model"], runs["cache"], runs["b_cache"], runs["valid"]
    if not model.cfg.has_post_norms:
        pytest.skip("no post-attention norm in this architecture")
    for l in range(model.cfg.n_layers):
        name = f"blocks.{l}.hook_attn_out"
        torch.testing.assert_close(cache[name][v], b_cache[name][v], **TOL)
        bias = model.adapter.o_proj(l).bias
        raw = b_cache[f"blocks.{l}.attn.hook_result"].sum(-2) + (bias if bias is not None else 0)
        assert (raw[v] - b_cache[name][v]).abs().max() > 1e-2
        # head_results (post-norm shares) + scaled bias reproduce the bridge's attn_out
        shares = model.head_results(cache, l)
        scaled_bias = bias * model.post_norm_scale(model.adapter.attn_post_norm(l), raw) if bias is not None else 0
        torch.testing.assert_close((shares.sum(-2) + scaled_bias)[v], b_cache[name][v], **TOL)


def test_norm_sites_relation_to_bridge(runs):
    """Ours ln*.hook_normalized == bridge ln*.hook_out == bridge ln*.hook_normalized * gain."""
    model, cache, b_cache, v = runs["model"], runs["cache"], runs["b_cache"], runs["valid"]
    a = model.adapter
    pairs = [("ln_final", a.final_norm)]
    for l in range(model.cfg.n_layers):
        pairs += [(f"blocks.{l}.ln1", a.ln1(l)), (f"blocks.{l}.ln2", a.ln2(l))]
    for prefix, norm in pairs:
        ours = cache[f"{prefix}.hook_normalized"][v]
        torch.testing.assert_close(ours, b_cache[f"{prefix}.hook_out"][v], **TOL)
        gain = a.ln_scale_weight(norm)
        torch.testing.assert_close(ours, (b_cache[f"{prefix}.hook_normalized"] * gain)[v], **TOL)
