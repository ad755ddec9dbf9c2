"""What the refusal heads read and do (``refusal_lab.steering.geometry``: :func:`head_reads`,
:func:`head_path_split`, :func:`downstream_ablation`) on tiny random models of every architecture,
each against an independent computation: the reads from a cached ``attn.hook_pattern`` in a loop and,
for GQA, the pattern reproducing ``attn.hook_z`` from each query head's shared key/value head; the
direct effect of a head patch against that head's direct logit attribution; the downstream
ablation against a naive forward with hooks written here."""

from __future__ import annotations

import math

import pytest
import torch

from refusal_lab.steering import geometry as geo
from tests.conftest import patch_pair

TOKENS = (3, 7)
HEADS = [(0, 1), (1, 2)]


def _caches(model, heads=HEADS, T=9):
    src, rec = patch_pair(model, T=T)
    return src, rec, geo.head_caches(model, (src.ids, src.mask), (rec.ids, rec.mask), heads, TOKENS)


def _metric(logits):
    lg = logits[:, -1] if logits.ndim == 3 else logits
    return (lg[:, TOKENS[0]] - lg[:, TOKENS[1]]).to(torch.float64)


def test_reads_equal_the_cached_pattern(tiny):
    src, rec, hc = _caches(tiny)
    queries, keys = [4, -1], [4, 5, 6, 7, 8]
    out = geo.head_reads(tiny, hc, HEADS, queries, keys, seed=0)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(tiny.cfg.n_layers)]
    _, ch = tiny.run_with_cache(src.ids, src.mask, names=names)
    _, cs = tiny.run_with_cache(rec.ids, rec.mask, names=names)
    assert out["keys"] == keys and [r["index"] for r in out["rows"]] == [4, 8] and out["n_pairs"] == 3
    for j, q in enumerate([4, 8]):
        row = out["rows"][j]
        for i, (l, h) in enumerate(HEADS):
            for m, k in enumerate(keys):
                a = [float(ch[f"blocks.{l}.attn.hook_pattern"][p, h, q, k]) for p in range(3)]
                b = [float(cs[f"blocks.{l}.attn.hook_pattern"][p, h, q, k]) for p in range(3)]
                d = [x - y for x, y in zip(a, b)]
                assert math.isclose(row["harmful_mean"][i][m], sum(a) / 3, abs_tol=1e-7)
                assert math.isclose(row["harmless_mean"][i][m], sum(b) / 3, abs_tol=1e-7)
                sa = math.sqrt(sum((x - sum(a) / 3) ** 2 for x in a) / 2)
                assert math.isclose(row["harmful_se"][i][m], sa / math.sqrt(3), abs_tol=1e-7)
                assert math.isclose(row["difference"][i][m], sum(d) / 3, abs_tol=1e-7)
                sd = math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
                assert math.isclose(row["difference_se"][i][m], sd / math.sqrt(3), abs_tol=1e-7)
                lo, hi = row["difference_ci95"][i][m]
                assert lo - 1e-12 <= sum(d) / 3 <= hi + 1e-12
        for m, k in enumerate(keys):  # the head set: each prompt's mean over the heads, then over prompts
            per = [sum(float(ch[f"blocks.{l}.attn.hook_pattern"][p, h, q, k]) for l, h in HEADS) / len(HEADS)
                   for p in range(3)]
            assert math.isclose(row["set_harmful"][m]["mean"], sum(per) / 3, abs_tol=1e-7)
    assert out["per_prompt"]["harmful"].shape == (3, len(HEADS), 2, len(keys))


def test_the_pattern_behind_the_reads_reproduces_hook_z_per_gqa_group(tiny):
    """GQA: query head h reads key/value head h // (n_heads / n_kv); ``hook_z`` = pattern · V of that group."""
    src, _, hc = _caches(tiny)
    H = tiny.cfg.n_heads
    attn = tiny.hf_model.model.layers
    for l, h in HEADS:
        sa = attn[l].self_attn
        d_head = sa.head_dim
        n_kv = sa.v_proj.out_features // d_head
        assert n_kv < H  # the tiny configs use GQA
        _, cache = tiny.run_with_cache(src.ids, src.mask, names=[f"blocks.{l}.ln1.hook_normalized",
                                                                 f"blocks.{l}.attn.hook_z"])
        x = cache[f"blocks.{l}.ln1.hook_normalized"]
        v = sa.v_proj(x).view(*x.shape[:2], n_kv, d_head)  # [b, k, kv, d_head]
        pattern = hc.caches["harmful"][f"blocks.{l}.attn.hook_pattern"][:, h]  # [b, q, k]
        z = torch.einsum("bqk,bkd->bqd", pattern, v[:, :, h // (H // n_kv)])
        real = src.mask.bool()
        torch.testing.assert_close(z[real], cache[f"blocks.{l}.attn.hook_z"][:, :, h][real], atol=1e-5, rtol=0)
        reads = geo.head_reads(tiny, hc, [(l, h)], [-1], list(range(9)))
        torch.testing.assert_close(torch.tensor(reads["rows"][0]["harmful_mean"][0], dtype=torch.float64),
                                   pattern[:, -1].to(torch.float64).mean(0), atol=1e-7, rtol=0)


def _readout(model):
    """(g ⊙ (W_U[:, r] − W_U[:, c]), eps) from the HF modules: the final norm's gain (Gemma: 1 + w)."""
    hf = model.hf_model
    norm = hf.model.norm
    g = norm.weight.to(torch.float64)
    if model.cfg.model_type.startswith("gemma"):
        g = 1.0 + g
    w = hf.lm_head.weight.to(torch.float64)
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
    return g * (w[TOKENS[0]] - w[TOKENS[1]]), eps


def _hand_head_write(model, cache, l, h, c):
    """Head h's write at column c from ``attn.hook_result`` (Gemma: through the post-attention norm's
    gain and the rms of the heads' sum, as that run's attn_out got it)."""
    result = cache[f"blocks.{l}.attn.hook_result"][:, c].to(torch.float64)  # [b, H, d]
    if not model.cfg.model_type.startswith("gemma"):
        return result[:, h]
    norm = model.hf_model.model.layers[l].post_attention_layernorm
    raw = result.sum(1)
    scale = (1.0 + norm.weight.to(torch.float64)) / (raw.square().mean(-1, keepdim=True) + norm.eps).sqrt()
    return (result * scale[:, None])[:, h]


@pytest.mark.parametrize("head", [(0, 1), (1, 3), (2, 0)])
def test_direct_effect_is_the_difference_of_the_heads_dla(tiny, head):
    """A one-head patch at the last column: direct effect = DLA(harmful head) − DLA(harmless head), both
    through the receiving (harmless) run's final-norm scale, to 1e-5."""
    src, rec, hc = _caches(tiny, [head])
    out = geo.head_path_split(tiny, hc, [head], [-1], seed=0)
    L, last = tiny.cfg.n_layers, 8
    keep = lambda n: n.endswith(("hook_result", "hook_resid_post", "hook_attn_out", "hook_z"))  # noqa: E731
    logits_h, ch = tiny.run_with_cache(src.ids, src.mask, names=keep)
    logits_s, cs = tiny.run_with_cache(rec.ids, rec.mask, names=keep)
    readout, eps = _readout(tiny)
    final = cs[f"blocks.{L - 1}.hook_resid_post"][:, last].to(torch.float64)
    inv_rms = 1.0 / (final.square().mean(-1, keepdim=True) + eps).sqrt()
    l, h = head
    dla = {side: (_hand_head_write(tiny, c, l, h, last) * inv_rms) @ readout for side, c in (("h", ch), ("s", cs))}
    direct = dla["h"] - dla["s"]
    assert out["last_patched"] and out["cols"] == [last]
    assert torch.allclose(out["per_pair"]["direct"], direct, atol=1e-5, rtol=0)
    assert math.isclose(out["direct"]["mean"], float(direct.mean()), abs_tol=1e-5)

    def set_z(act, hp):
        act = act.clone()
        act[:, last, h] = ch[f"blocks.{l}.attn.hook_z"][:, last, h]
        return act

    patched = _metric(tiny(rec.ids, rec.mask, fwd_hooks=[(f"blocks.{l}.attn.hook_z", set_z)]))
    total = patched - _metric(logits_s)
    assert torch.allclose(out["per_pair"]["total"], total, atol=1e-5, rtol=0)
    assert math.isclose(out["indirect"]["mean"], float((total - direct).mean()), abs_tol=1e-5)
    if not tiny.cfg.model_type.startswith("gemma"):
        # no post-attention norm: the patched run's own attn_out change at the head's layer is the head's
        # write change, and frozen downstream it reaches the logits as the direct effect
        _, cp = tiny.run_with_cache(rec.ids, rec.mask, names=[f"blocks.{l}.hook_attn_out"],
                                    fwd_hooks=[(f"blocks.{l}.attn.hook_z", set_z)])
        delta = (cp[f"blocks.{l}.hook_attn_out"] - cs[f"blocks.{l}.hook_attn_out"])[:, last].to(torch.float64)
        assert torch.allclose((delta * inv_rms) @ readout, direct, atol=1e-5, rtol=0)


def test_a_patch_away_from_the_last_column_has_no_direct_effect(tiny):
    _, _, hc = _caches(tiny)
    out = geo.head_path_split(tiny, hc, HEADS, [4], seed=0)
    assert not out["last_patched"] and out["direct"]["mean"] == 0.0
    assert math.isclose(out["indirect"]["mean"], out["total"]["mean"], abs_tol=1e-12)


@pytest.mark.parametrize("hl", [0, 1])
def test_downstream_ablation_equals_a_naive_forward(tiny, hl):
    """Against whole forwards with hand hooks; heads in layer 1 make every patched forward a cone run
    (blocks 1.. from the cached clean residual) and the ablated ones start after the heads' layer."""
    heads, cols = [(hl, 1), (hl, 3)], [4, 8]
    src, rec, hc = _caches(tiny, heads)
    v = torch.randn(tiny.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = geo.downstream_ablation(tiny, hc, heads, cols, v, seed=0)
    r = v / v.norm()
    _, ch = tiny.run_with_cache(src.ids, src.mask, names=lambda n: n.endswith("attn.hook_z"))

    def project_out(act, hp):
        x = act.to(torch.float64)
        return (x - (x @ r)[..., None] * r).to(act.dtype)

    def set_z(act, hp):
        act = act.clone()
        for c in cols:
            for _, h in heads:
                act[:, c, h] = ch[f"blocks.{hl}.attn.hook_z"][:, c, h]
        return act

    abl = [(f"blocks.{l}.{s}", project_out) for l in range(hl + 1, tiny.cfg.n_layers)
           for s in ("hook_attn_out", "hook_mlp_out")]
    patch = [(f"blocks.{hl}.attn.hook_z", set_z)]
    res = [(f"blocks.{hl + 1}.hook_resid_pre", project_out), *abl]  # the residual after the heads' layer too
    m = {k: _metric(tiny(rec.ids, rec.mask, fwd_hooks=hooks)) for k, hooks in
         (("clean", []), ("patched", patch), ("clean_abl", abl), ("patched_abl", patch + abl),
          ("clean_res", res), ("patched_res", patch + res))}
    gap = _metric(tiny(src.ids, src.mask)) - m["clean"]
    effect, effect_abl = m["patched"] - m["clean"], m["patched_abl"] - m["clean_abl"]
    assert out["n_sites"] == len(abl) and out["after_layer"] == hl and out["n_pairs"] == 3
    assert torch.allclose(out["per_pair"]["effect"], effect, atol=1e-5, rtol=0)
    assert torch.allclose(out["per_pair"]["effect_ablated"], effect_abl, atol=1e-4, rtol=0)
    assert math.isclose(out["sufficiency"], float(effect.mean() / gap.mean()), rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(out["fraction_removed"], 1 - float(effect_abl.mean() / effect.mean()),
                        rel_tol=1e-3, abs_tol=1e-4)
    lo, hi = out["fraction_removed_ci95"]
    assert lo <= hi
    effect_res = m["patched_res"] - m["clean_res"]
    x = out["residual"]
    assert x["n_sites"] == len(res)
    assert torch.allclose(out["per_pair"]["effect_ablated_residual"], effect_res, atol=1e-4, rtol=0)
    assert math.isclose(x["sufficiency_ablated"], float(effect_res.mean() / gap.mean()), rel_tol=1e-3, abs_tol=1e-4)
    assert math.isclose(x["fraction_removed"], 1 - float(effect_res.mean() / effect.mean()), rel_tol=1e-3, abs_tol=1e-4)
    assert x["fraction_removed_ci95"][0] <= x["fraction_removed_ci95"][1]


def test_heads_in_the_last_layer_ablate_nothing(tiny):
    last = tiny.cfg.n_layers - 1
    _, _, hc = _caches(tiny, [(last, 0)])
    out = geo.downstream_ablation(tiny, hc, [(last, 0)], [4], torch.ones(tiny.cfg.d_model), seed=0)
    assert out["n_sites"] == 0 and out["effect_ablated"]["mean"] == out["effect"]["mean"]
    assert out["residual"]["n_sites"] == 0 and out["residual"]["effect_ablated"]["mean"] == out["effect"]["mean"]
    assert out["fraction_removed"] == 0.0 or math.isnan(out["fraction_removed"])
