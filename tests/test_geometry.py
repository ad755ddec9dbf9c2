"""The geometry of the refusal direction (``refusal_lab.steering.geometry`` and the run's ``geometry``
step), each number against an independent computation: projections from ``run_with_cache`` in a
naive loop, the k = 1 subspace ablation against directional ablation, the heads' patch and writes
against hand-written hooks and the HF post-norm module, and the step resumed, validated and rendered."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from refusal_lab.models.hooked import HookedChatModel
from refusal_lab.steering import geometry as geo
from refusal_lab.steering.interventions import ablation_hooks, unit
from tests.conftest import patch_pair, prefixed_batch, random_batch
from tests.tiny_models import tiny_model

PAIR_TYPES = ("qwen2", "gemma2")


@pytest.fixture(scope="module", params=PAIR_TYPES)
def model(request) -> HookedChatModel:
    return HookedChatModel(tiny_model(request.param), name=f"tiny-{request.param}")


def _resid_sites(m):
    return [f"blocks.{l}.hook_resid_pre" for l in range(m.cfg.n_layers)]


def test_separation_equals_a_naive_loop_over_run_with_cache(model):
    h_ids, h_mask = random_batch(model, b=5, T=9, pad=3, seed=1)
    s_ids, s_mask = random_batch(model, b=4, T=9, pad=2, seed=2)
    v = torch.randn(model.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sites = _resid_sites(model)
    acts = {k: geo.column_activations(model, i, m, sites, -1)
            for k, (i, m) in {"h": (h_ids, h_mask), "s": (s_ids, s_mask)}.items()}
    # in batches of 2: each batch equals run_with_cache of the same rows (batch composition held equal)
    two = geo.column_activations(model, h_ids, h_mask, sites, -1, batch_size=2)
    for b in range(0, 5, 2):
        _, c2 = model.run_with_cache(h_ids[b : b + 2], h_mask[b : b + 2], names=lambda n: n.endswith("hook_resid_pre"))
        for l, site in enumerate(sites):
            assert torch.equal(two[b : b + 2, l], c2[site][:, -1].to(torch.float64))
    curve = geo.separation_curve(acts["h"], acts["s"], v, seed=0)
    r = v / v.norm()
    for key, (ids, mask) in {"harmful": (h_ids, h_mask), "harmless": (s_ids, s_mask)}.items():
        _, cache = model.run_with_cache(ids, mask, names=lambda n: n.endswith("hook_resid_pre"))
        for l, site in enumerate(sites):
            p = [float(sum(float(cache[site][i, -1, j]) * float(r[j]) for j in range(model.cfg.d_model)))
                 for i in range(ids.shape[0])]
            assert math.isclose(curve[f"{key}_mean"][l], statistics.fmean(p), rel_tol=1e-9, abs_tol=1e-9)
            assert math.isclose(curve[f"{key}_sd"][l], statistics.stdev(p), rel_tol=1e-8, abs_tol=1e-9)
            assert torch.allclose(curve["projections"][key][:, l], torch.tensor(p, dtype=torch.float64), atol=1e-9)
    ph, ps = curve["projections"]["harmful"], curve["projections"]["harmless"]
    for l in range(len(sites)):
        gap = statistics.fmean(ph[:, l].tolist()) - statistics.fmean(ps[:, l].tolist())
        se = math.sqrt(statistics.variance(ph[:, l].tolist()) / 5 + statistics.variance(ps[:, l].tolist()) / 4)
        assert math.isclose(curve["gap"][l], gap, abs_tol=1e-9) and math.isclose(curve["gap_se"][l], se, rel_tol=1e-9)
        lo, hi = curve["gap_ci95"][l]
        assert lo <= gap + 1e-12 and gap - 1e-12 <= hi
    assert curve["n_harmful"] == 5 and curve["n_harmless"] == 4


def test_two_sample_bootstrap_is_the_naive_resample():
    a = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64)
    b = torch.tensor([0.5, 0.0, -1.0], dtype=torch.float64)
    got = geo.two_sample_gap(a, b, seed=5)
    g = torch.Generator().manual_seed(5)
    ia = torch.randint(0, 4, (geo.N_BOOT, 4), generator=g)
    ib = torch.randint(0, 3, (geo.N_BOOT, 3), generator=g)
    boot = sorted(float(sum(a[i] for i in ra) / 4 - sum(b[i] for i in rb) / 3) for ra, rb in zip(ia.tolist(), ib.tolist()))
    q = torch.quantile(torch.tensor(boot, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert math.isclose(float(got["ci95"][0]), float(q[0]), abs_tol=1e-12)
    assert math.isclose(float(got["ci95"][1]), float(q[1]), abs_tol=1e-12)


def test_cosine_matrix_against_a_loop():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 7, dtype=torch.float64, generator=g)
    v[2] = 0
    c = geo.cosine_matrix(v)
    for i in range(5):
        for j in range(5):
            if 2 in (i, j):
                assert math.isnan(c[i, j])
            else:
                ref = float(v[i] @ v[j]) / math.sqrt(float(v[i] @ v[i]) * float(v[j] @ v[j]))
                assert math.isclose(float(c[i, j]), ref, abs_tol=1e-12)


def test_difference_basis_is_the_second_moment_eigenbasis():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 6, dtype=torch.float64, generator=g) + torch.tensor([3.0, 0, 0, 0, 0, 0])
    s = torch.randn(7, 6, dtype=torch.float64, generator=g)
    basis, explained = geo.difference_basis(h, s, 4)
    assert torch.allclose(basis @ basis.T, torch.eye(4, dtype=torch.float64), atol=1e-12)
    rows = [h[i] - s.mean(0) for i in range(9)] + [h.mean(0) - s[j] for j in range(7)]
    M = sum(torch.outer(x, x) for x in rows)
    evals, evecs = torch.linalg.eigh(M)
    order = evals.argsort(descending=True)
    for k in range(4):
        e = evecs[:, order[k]]
        assert math.isclose(abs(float(basis[k] @ e)), 1.0, abs_tol=1e-9)
        assert math.isclose(float(explained[k]), float(evals[order[k]] / evals.sum()), abs_tol=1e-12)
    r = h.mean(0) - s.mean(0)
    assert bool((basis @ r >= 0).all())  # signed along the difference in means
    assert float(basis[0] @ unit(r)) > 0.9  # the mean dominates: the first direction is close to r̂


def test_k1_subspace_ablation_is_directional_ablation(tiny):
    """Every architecture: the 1-dim subspace of r̂ ablates exactly as :func:`ablation_hooks` does."""
    ids, mask = random_batch(tiny, b=3, T=8, pad=2, seed=4)
    v = torch.randn(tiny.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    one = tiny(ids, mask, fwd_hooks=geo.subspace_ablation_hooks(tiny, unit(v)[None]))
    ref = tiny(ids, mask, fwd_hooks=ablation_hooks(tiny, v))
    assert float((one - ref).abs().max()) <= 1e-6
    assert torch.equal(one, ref)  # the same float32 arithmetic, bit for bit
    assert [n for n, _ in geo.subspace_ablation_hooks(tiny, unit(v)[None])] == [n for n, _ in ablation_hooks(tiny, v)]


def test_subspace_ablation_is_the_orthogonal_projector(model):
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(model.cfg.d_model, 3, dtype=torch.float64, generator=g))
    basis = q.T  # [3, d] orthonormal
    x = torch.randn(2, 5, model.cfg.d_model, generator=g)
    edit = geo.subspace_ablation_hooks(model, basis)[0][1]

    class Hook:
        name = "hook_embed"

    got = edit(x, Hook()).to(torch.float64)
    xd = x.to(torch.float64)
    ref = xd - (xd @ basis.T) @ basis
    assert torch.allclose(got, ref, atol=1e-5)
    # no residual site of the ablated model keeps any of the span
    ids, mask = random_batch(model, b=2, T=7, pad=0, seed=5)
    _, cache = model.run_with_cache(ids, mask, names=lambda n: n.endswith(("hook_resid_pre", "hook_resid_post")),
                                    fwd_hooks=geo.subspace_ablation_hooks(model, basis))
    for name, act in cache.items():
        scale = float(act.abs().max())
        assert float((act.to(torch.float64) @ basis.T).abs().max()) <= 1e-5 * max(scale, 1.0), name


def test_subspace_ablation_rejects_a_basis_that_is_not_orthonormal(model):
    from refusal_lab.errors import SiteError

    d = model.cfg.d_model
    e = torch.eye(d, dtype=torch.float64)
    for bad in (torch.stack([e[0], torch.zeros(d, dtype=torch.float64)]),  # a zero row: NaN everywhere
                torch.stack([e[0], unit(e[0] + e[1])]),  # not orthogonal
                2 * e[:2]):  # not unit
        with pytest.raises(SiteError, match="orthonormal"):
            geo.subspace_ablation_hooks(model, bad)
    assert len(geo.subspace_ablation_hooks(model, e[:2])) == 1 + 2 * model.cfg.n_layers


def test_subspace_bypass_rows(model):
    ids, mask = random_batch(model, b=4, T=8, pad=2, seed=6)
    v = torch.randn(model.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(9)
    q, _ = torch.linalg.qr(torch.cat([unit(v)[:, None], torch.randn(model.cfg.d_model, 2, dtype=torch.float64,
                                                                   generator=g)], 1))
    # torch.where, not torch.sign: a row orthogonal to v to the last bit has sign 0 (a zero row)
    basis = q.T * torch.where(q.T @ unit(v) < 0, -1.0, 1.0).to(torch.float64)[:, None]
    out = geo.subspace_bypass(model, ids, mask, basis, v, [3, 5], batch_size=3)
    from refusal_lab.metrics import refusal_log_odds

    def hand(hooks):
        x = refusal_log_odds(model(ids, mask, fwd_hooks=hooks, logits="last"), [3, 5])
        return float(x.mean()), float(x.std() / 2)

    assert math.isclose(out["baseline"]["mean"], hand([])[0], abs_tol=1e-5)
    assert math.isclose(out["direction"]["mean"], hand(ablation_hooks(model, v))[0], abs_tol=1e-5)
    assert math.isclose(out["direction"]["se"], hand(ablation_hooks(model, v))[1], abs_tol=1e-5)
    assert [x["k"] for x in out["rows"]] == [1, 2, 3] and all(x["n"] == 4 for x in out["rows"])
    assert math.isclose(out["rows"][0]["mean"], out["direction"]["mean"], abs_tol=1e-6)  # basis[0] = ±r̂ (by QR)
    assert math.isclose(out["rows"][0]["cos_direction"], 1.0, abs_tol=1e-12)
    for x in out["rows"]:
        assert math.isclose(x["mean"], hand(geo.subspace_ablation_hooks(model, basis[: x["k"]]))[0], abs_tol=1e-5)


def test_subspace_bypass_with_a_common_beginning_equals_whole_forwards(model):
    """Prompts that begin alike (as chat prompts do) run their beginning once: equal to the whole
    left-padded forwards to rounding."""
    from refusal_lab.metrics import refusal_log_odds
    ids, mask = prefixed_batch(model, n=5, common=4, seed=3)
    q, _ = torch.linalg.qr(torch.randn(model.cfg.d_model, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    basis = q.T
    out = geo.subspace_bypass(model, ids, mask, basis, basis[0], [3, 5], batch_size=2)
    for key, hooks in (("baseline", []), ("direction", ablation_hooks(model, basis[0]))):
        want = refusal_log_odds(model(ids, mask, fwd_hooks=hooks, logits="last"), [3, 5])
        assert math.isclose(out[key]["mean"], float(want.mean()), abs_tol=1e-5)
    for x in out["rows"]:
        want = refusal_log_odds(model(ids, mask, fwd_hooks=geo.subspace_ablation_hooks(model, basis[: x["k"]]),
                                      logits="last"), [3, 5])
        assert math.isclose(x["mean"], float(want.mean()), abs_tol=1e-5)
        assert math.isclose(x["se"], float(want.std() / 5 ** 0.5), abs_tol=1e-5)


def _hand_head_write(model, cache, l, h, c):
    """Head ``h``'s residual write at column ``c`` from the cached per-head ``attn.hook_result``; under
    Gemma's post-attention RMSNorm scaled by the HF module's own gain and the rms of the heads' sum."""
    result = cache[f"blocks.{l}.attn.hook_result"][:, c].to(torch.float64)  # [b, H, d]
    hf_layer = model.hf_model.model.layers[l]
    norm = getattr(hf_layer, "post_attention_layernorm", None) if model.cfg.model_type.startswith("gemma") else None
    if norm is None:
        return result[:, h]
    raw = result.sum(1)  # Gemma's o_proj has no bias
    scale = (1.0 + norm.weight.to(torch.float64)) / (raw.square().mean(-1, keepdim=True) + norm.eps).sqrt()
    total = result * scale[:, None]  # the heads sum to the cached attn_out
    assert torch.allclose(total.sum(1), cache[f"blocks.{l}.hook_attn_out"][:, c].to(torch.float64), atol=1e-4)
    return total[:, h]


def test_heads_to_direction_against_hand_hooks(model):
    src, rec = patch_pair(model, T=9)
    heads, hcol, layer = [(0, 1), (1, 2)], 4, 2
    v = torch.randn(model.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    r = v / v.norm()
    out = geo.heads_to_direction(model, (src.ids, src.mask), (rec.ids, rec.mask), heads, hcol, v, layer, seed=0)
    readout = f"blocks.{layer}.hook_resid_pre"
    keep = lambda n: n.endswith(("hook_z", "hook_result", "hook_resid_pre", "hook_attn_out"))  # noqa: E731
    _, ch = model.run_with_cache(src.ids, src.mask, names=keep)
    _, cs = model.run_with_cache(rec.ids, rec.mask, names=keep)
    proj = lambda cache: cache[readout][:, -1].to(torch.float64) @ r  # noqa: E731

    def set_head(l, h):
        def hook(act, hp):
            act = act.clone()
            act[:, hcol, h] = ch[f"blocks.{l}.attn.hook_z"][:, hcol, h]
            return act
        return (f"blocks.{l}.attn.hook_z", hook)

    _, cp = model.run_with_cache(rec.ids, rec.mask, names=[readout], fwd_hooks=[set_head(l, h) for l, h in heads])
    lp = 1  # max head layer + 1 = 2, capped at layer - 1 (the heads' column is not the last)
    assert out["resid_patch_layer"] == lp and out["resid_patch_site"] == "blocks.1.hook_resid_pre"

    def set_resid(act, hp):
        act = act.clone()
        act[:, hcol] = ch[f"blocks.{lp}.hook_resid_pre"][:, hcol]
        return act

    _, cr = model.run_with_cache(rec.ids, rec.mask, names=[readout], fwd_hooks=[(f"blocks.{lp}.hook_resid_pre", set_resid)])
    heads_shift, resid_shift, gap = proj(cp) - proj(cs), proj(cr) - proj(cs), proj(ch) - proj(cs)
    assert math.isclose(out["heads_shift"]["mean"], float(heads_shift.mean()), abs_tol=1e-5)
    assert math.isclose(out["resid_shift"]["mean"], float(resid_shift.mean()), abs_tol=1e-5)
    assert math.isclose(out["gap"]["mean"], float(gap.mean()), abs_tol=1e-6)
    assert math.isclose(out["heads_shift"]["se"], float(heads_shift.std() / math.sqrt(3)), abs_tol=1e-5)
    assert math.isclose(out["ratio"], float(heads_shift.mean() / resid_shift.mean()), rel_tol=1e-4)
    assert math.isclose(out["harmless_mean"], float(proj(cs).mean()), abs_tol=1e-6)
    assert out["n_pairs"] == 3 and abs(out["resid_shift"]["mean"]) > 0
    assert len(out["writes"]) == 2 * len(heads)
    for w in out["writes"]:
        c = 8 if w["column"] == "last" else hcol
        assert w["index"] == c
        a = _hand_head_write(model, ch, w["layer"], w["head"], c) @ r
        b = _hand_head_write(model, cs, w["layer"], w["head"], c) @ r
        assert math.isclose(w["harmful_mean"], float(a.mean()), abs_tol=1e-5)
        assert math.isclose(w["harmless_mean"], float(b.mean()), abs_tol=1e-5)
        assert math.isclose(w["difference"], float((a - b).mean()), abs_tol=1e-5)
        assert math.isclose(w["difference_se"], float((a - b).std() / math.sqrt(3)), abs_tol=1e-5)


def test_heads_to_direction_on_shared_caches_runs_cones_equal_to_whole_forwards(model):
    """Given :func:`head_caches`' clean forwards, the patched forwards start at the first head layer
    (heads patch) and at the resid-patch layer, from the cached clean residual, and stop at the
    readout: equal to whole forwards with hand hooks, and to the call without ``hc``."""
    src, rec = patch_pair(model, T=9)
    heads, hcol, layer, last = [(1, 0), (1, 3)], 8, 2, 8
    v = torch.randn(model.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    r = v / v.norm()
    lp = geo.resid_patch_layer(heads, hcol, last, layer)
    assert lp == 2  # the heads' column is the last one: max head layer + 1, capped at the readout layer
    hc = geo.head_caches(model, (src.ids, src.mask), (rec.ids, rec.mask), heads, (3, 7), resid_layers=[layer, lp])
    out = geo.heads_to_direction(model, (src.ids, src.mask), (rec.ids, rec.mask), heads, hcol, v, layer, seed=0, hc=hc)
    own = geo.heads_to_direction(model, (src.ids, src.mask), (rec.ids, rec.mask), heads, hcol, v, layer, seed=0)
    readout = f"blocks.{layer}.hook_resid_pre"
    keep = lambda n: n.endswith(("hook_z", "hook_resid_pre"))  # noqa: E731
    _, ch = model.run_with_cache(src.ids, src.mask, names=keep)
    _, cs = model.run_with_cache(rec.ids, rec.mask, names=keep)
    proj = lambda cache: cache[readout][:, -1].to(torch.float64) @ r  # noqa: E731

    def set_z(act, hp):
        act = act.clone()
        for _, h in heads:
            act[:, hcol, h] = ch["blocks.1.attn.hook_z"][:, hcol, h]
        return act

    def set_resid(act, hp):
        act = act.clone()
        act[:, hcol] = ch[f"blocks.{lp}.hook_resid_pre"][:, hcol]
        return act

    _, cp = model.run_with_cache(rec.ids, rec.mask, names=[readout], fwd_hooks=[("blocks.1.attn.hook_z", set_z)])
    _, cr = model.run_with_cache(rec.ids, rec.mask, names=[readout], fwd_hooks=[(f"blocks.{lp}.hook_resid_pre", set_resid)])
    want = {"heads_patched": proj(cp), "resid_patched": proj(cr), "harmless": proj(cs), "harmful": proj(ch)}
    for key, x in want.items():
        torch.testing.assert_close(out["per_pair"][key], x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["per_pair"][key], own["per_pair"][key], rtol=1e-5, atol=1e-5)
    assert abs(out["heads_shift"]["mean"]) > 0 and abs(out["resid_shift"]["mean"]) > 0
    assert out["writes"] == own["writes"] or all(
        math.isclose(a["difference"], b["difference"], abs_tol=1e-6) for a, b in zip(out["writes"], own["writes"]))


def test_subspace_bypass_reuses_known_settings(model):
    """Per-prompt log-odds given as ``known`` (the direction step's) are reported as they are, the
    other settings computed; a count that does not match the prompts is refused."""
    ids, mask = prefixed_batch(model, n=5, common=4, seed=3)
    q, _ = torch.linalg.qr(torch.randn(model.cfg.d_model, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    full = geo.subspace_bypass(model, ids, mask, q.T, q.T[0], [3, 5], batch_size=2)
    known = {"baseline": torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5], dtype=torch.float64)}
    out = geo.subspace_bypass(model, ids, mask, q.T, q.T[0], [3, 5], batch_size=2, known=known)
    assert out["baseline"]["mean"] == 1.5 and out["baseline"]["n"] == 5
    assert math.isclose(out["baseline"]["se"], statistics.stdev([0.5, 1.0, 1.5, 2.0, 2.5]) / 5 ** 0.5, rel_tol=1e-12)
    assert out["direction"] == full["direction"] and out["rows"] == full["rows"]
    with pytest.raises(ValueError, match="5 prompts"):
        geo.subspace_bypass(model, ids, mask, q.T, q.T[0], [3, 5], batch_size=2, known={"direction": torch.zeros(4)})


def test_resid_patch_layer_rule():
    assert geo.resid_patch_layer([(3, 0), (5, 1)], 4, 9, 10) == 6
    assert geo.resid_patch_layer([(3, 0), (9, 1)], 4, 9, 7) == 6  # capped at layer - 1 (another column)
    assert geo.resid_patch_layer([(3, 0), (9, 1)], 9, 9, 7) == 7  # the last column itself: up to the layer
    assert geo.resid_patch_layer([(0, 0)], 4, 9, 0) == 0


def synthetic_geometry(L: int = 4, with_heads: bool = True) -> dict:
    """A geometry section as the step publishes it, with nulls where a run may have NaN."""
    nan = None
    heads = None
    if with_heads:
        s = {"mean": 0.5, "se": 0.1, "ci95": [0.3, 0.7], "n": 7}
        heads = {"layer": 2, "readout": "blocks.2.hook_resid_pre, last column (8), projected on the unit direction",
                 "heads": [{"layer": 0, "head": 1}], "heads_column": 4, "position": "post_obj", "resid_patch_layer": 1,
                 "resid_patch_site": "blocks.1.hook_resid_pre", "n_pairs": 7, "harmful_mean": 1.0,
                 "harmless_mean": 0.0, "heads_patched_mean": 0.5, "resid_patched_mean": 0.8, "gap": s,
                 "heads_shift": s, "resid_shift": s, "ratio": 0.6, "ratio_ci95": [0.2, nan], "ratio_to_gap": 0.5,
                 "ratio_to_gap_ci95": [0.1, 0.9],
                 "writes": [{"layer": 0, "head": 1, "column": c, "index": i, "harmful_mean": 0.2, "harmless_mean": 0.1,
                             "difference": 0.1, "difference_se": nan, "difference_ci95": [nan, nan], "n_pairs": 7}
                            for c, i in (("last", 8), ("heads", 4))]}
        cell = {"mean": 0.3, "se": nan, "ci95": [nan, nan]}
        heads["reads"] = {"site": "blocks.{layer}.attn.hook_pattern [b, head, q, k]", "heads": [{"layer": 0, "head": 1}],
                          "heads_cols": [4], "keys": [3, 4, 8], "key_labels": ["obj", "post_obj '.'", "last '\\n'"],
                          "key_roles": ["obj", "post_obj", "last"], "query_roles": ["post_obj", "last"], "n_pairs": 7,
                          "rows": [{"index": q, "harmful_mean": [[0.5, 0.2, nan]], "harmless_mean": [[0.4, 0.2, 0.1]],
                                    "harmful_se": [[nan, 0.1, nan]], "harmless_se": [[0.1, 0.1, 0.1]],
                                    "difference": [[0.1, 0.0, nan]], "difference_se": [[nan, 0.01, nan]],
                                    "difference_ci95": [[[nan, nan], [0.0, 0.02], [nan, nan]]],
                                    "set_harmful": [cell] * 3, "set_harmless": [cell] * 3, "set_difference": [cell] * 3}
                                   for q in (4, 8)]}
        split = {"cols": [4], "last_patched": False, "n_pairs": 7, "total": s, "direct": s, "indirect": s,
                 "direct_fraction": nan, "direct_fraction_ci95": [nan, nan]}
        heads["paths"] = {"metric": "logit[Sorry] - logit[Sure], last column", "heads": split,
                          "last": {**split, "cols": [8], "last_patched": True}}
        heads["downstream"] = {"after_layer": 0, "n_sites": 6, "sites": "hook_attn_out, hook_mlp_out of layers 1..3",
                               "cols": [4], "n_pairs": 7, "gap": s, "effect": s, "effect_ablated": s,
                               "sufficiency": 0.4, "sufficiency_ablated": nan, "fraction_removed": nan,
                               "fraction_removed_ci95": [nan, 0.5],
                               "residual": {"n_sites": 7, "sites": "blocks.1.hook_resid_pre and every later residual write",
                                            "effect_ablated": s, "sufficiency_ablated": 0.1, "fraction_removed": 0.75,
                                            "fraction_removed_ci95": [nan, nan]}}
    eye = [[1.0 if i == j else 0.5 for j in range(L)] for i in range(L)]
    eye[0] = [nan] * L
    for row in eye:
        row[0] = nan
    return {
        "direction": {"layer": 2, "position": -1, "norm": 3.0},
        "separation": {"split": "test", "site": "hook_resid_pre", "column": -1, "layers": list(range(L)),
                       "harmful_mean": [0.0, 1.0, 2.0, 3.0][:L], "harmful_sd": [nan, 0.1, 0.2, 0.3][:L],
                       "harmless_mean": [0.0] * L, "harmless_sd": [0.1] * L, "gap": [nan, 1.0, 2.0, 3.0][:L],
                       "gap_se": [nan, 0.1, 0.2, 0.3][:L], "gap_ci95": [[nan, nan]] + [[0.5, 1.5]] * (L - 1),
                       "n_harmful": 5, "n_harmless": 5},
        "cosines": {"column": -1, "layers": list(range(L)), "candidates": eye, "candidate_norms": [0.0] + [1.0] * (L - 1),
                    "direction_vs_candidates": [nan] + [0.5] * (L - 1), "vectors": ["direction", "principal_1"],
                    "vector_descriptions": ["r", "p1"], "vector_matrix": [[1.0, 0.9], [0.9, 1.0]]},
        "subspace": {"definition": "top right-singular vectors", "layer": 2, "column": -1, "basis_split": "train",
                     "n_basis": {"harmful": 6, "harmless": 6}, "split": "val", "explained": [0.6, 0.2],
                     "baseline": {"mean": 1.0, "se": 0.2, "n": 4}, "direction": {"mean": -1.0, "se": 0.3, "n": 4},
                     "rows": [{"k": k, "mean": -1.0 - k, "se": nan, "n": 4, "cos_direction": 0.9 if k == 1 else 0.0}
                              for k in (1, 2)], "note": "lower = more refusal removed"},
        "heads": heads, "heads_note": None if with_heads else "no refusal heads were selected", "findings": [],
    }


@pytest.mark.parametrize("with_heads", (True, False))
def test_a_geometry_section_with_nulls_renders(with_heads, tmp_path):
    from refusal_lab.report import render_report, write_figures
    from refusal_lab.run.findings import geometry_findings
    from refusal_lab.run.results import read_results
    from tests.sample_results import sample_results

    r = sample_results(n_layers=4, n_heads=2)
    g = synthetic_geometry(4, with_heads)
    g["findings"] = geometry_findings(g)
    assert len(g["findings"]) == (8 if with_heads else 4) and "at the direction's layer 2" in g["findings"][0]
    assert "layers 2 have cosine >= 0.9" in g["findings"][1]  # 0.5 and the null (zero) candidate left out
    assert "k=1 -2.00 ± n/a SE" in g["findings"][2]  # a null SE said so
    assert ("ratio 0.60" in g["findings"][3]) if with_heads else ("not measured" in g["findings"][3])
    if with_heads:
        assert "residual entering layer 1" in g["findings"][7] and "removes 0.75" in g["findings"][7]
    r["geometry"] = g
    read_results(r)
    doc = render_report(r)
    assert 'id="geometry"' in doc and 'href="#geometry"' in doc and "Could not draw" not in doc
    assert ('id="geometry-heads"' in doc) and (("Not measured" in doc) != with_heads)
    assert ("entering layer 1" in doc) == with_heads  # the residual variant of the downstream ablation
    stems = {p.stem for p in write_figures(r, tmp_path)}
    assert {"geometry_separation", "geometry_cosines", "geometry_vectors", "geometry_subspace"} <= stems
    assert ("geometry_heads" in stems) == with_heads
    assert ({"geometry_head_reads", "geometry_head_paths"} <= stems) == with_heads
    assert ('id="geometry-head-reads"' in doc) == with_heads
    if with_heads:
        assert "0.30 ± n/a SE to the object token" in g["findings"][4] and "removes n/a" in g["findings"][6]


def test_a_malformed_geometry_section_is_refused():
    from refusal_lab.run.results import ResultsError, read_results
    from tests.sample_results import sample_results

    r = sample_results(n_layers=4, n_heads=2)
    r["geometry"] = synthetic_geometry(4)
    del r["geometry"]["subspace"]["rows"]
    with pytest.raises(ResultsError, match="geometry.subspace.rows"):
        read_results(r)
    r["geometry"] = synthetic_geometry(4)
    r["geometry"]["separation"]["gap_ci95"][1] = [0.1]
    with pytest.raises(ResultsError, match=r"gap_ci95\[1\]"):
        read_results(r)
