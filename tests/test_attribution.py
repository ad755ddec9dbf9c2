"""Attribution patching is the first-order term of exact patching: for a source that differs
from the receiver by a small perturbation, estimate and exact change agree to O(eps^2)."""

import pytest
import torch

from refusal_lab.models.hooked import ActivationCache
from refusal_lab.models.hooked import HookedChatModel
from tests.tiny_models import SUPPORTED_TINY, tiny_model
from refusal_lab.patching.attribution import (
    agreement, attribution_grid, receiver_gradients, receiver_gradients_qk,
)
from refusal_lab.patching.engine import GRIDS, Batch, GridSpec, LogitDiff, Receiver, patch_grid, source_sites
from refusal_lab.patching.qk_fix import (
    delta_scores, fixed_and_linear, head_writes, qk_fix_correction, qk_states, qk_tangents, recording,
)


def dense_delta_scores(d_cols: torch.Tensor, d_rows: torch.Tensor, cols: list[int]) -> torch.Tensor:
    """[N, b, Hq, T, T] change of the logits from :func:`delta_scores`'s parts: their sum scattered
    into the patched columns (key change) and rows (query change)."""
    N, b, H, T, _ = d_cols.shape
    out = torch.zeros(N, b, H, T, T, dtype=d_cols.dtype, device=d_cols.device)
    c = torch.as_tensor(cols, device=out.device)
    out.index_add_(4, c, d_cols)
    out.index_add_(3, c, d_rows)
    return out


@pytest.fixture(params=SUPPORTED_TINY)
def tiny_saturable(request) -> HookedChatModel:
    """A fresh tiny model per test (the saturation test rescales its weights)."""
    return HookedChatModel(tiny_model(request.param), name=f"tiny-{request.param}")


@pytest.mark.parametrize("grid", GRIDS)
def test_attribution_is_first_order_of_exact(tiny, grid):
    g = torch.Generator().manual_seed(3)
    T = 8
    rec = Batch(torch.randint(0, tiny.cfg.d_vocab, (2, T), generator=g), torch.ones(2, T, dtype=torch.long))
    metric = LogitDiff(3, 7)
    receiver = Receiver.record(tiny, rec, metric)
    cols = [5, 7] if grid == "heads" else [3, 7]
    spec = GridSpec(grid, list(range(tiny.cfg.n_layers)), cols, list(range(tiny.cfg.n_heads)))
    sites = source_sites(tiny, spec)
    acts, grads = receiver_gradients(tiny, rec, sites, metric)
    eps = 1e-4
    source = ActivationCache({s: acts[s] + eps * torch.randn(acts[s].shape, generator=g) for s in sorted(sites)})
    exact = patch_grid(tiny, receiver, source, spec, metric, progress=False) - receiver.baseline[:, None, None]
    est = attribution_grid(tiny, rec, acts, grads, source, spec, receiver.baseline) - receiver.baseline[:, None, None]
    if grid.endswith("cumulative"):
        # AtP's cumulative estimate is the running sum of the single-layer estimates (it ignores that
        # patched later layers cut paths through earlier ones); its first row is single-layer AtP.
        single = GridSpec(grid.replace("_cumulative", ""), spec.layers, cols)
        one = attribution_grid(tiny, rec, acts, grads, source, single, receiver.baseline) - receiver.baseline[:, None, None]
        assert torch.allclose(est, one.cumsum(1), atol=1e-6)
        exact, est = exact[:, :1], est[:, :1]
    # first order: |exact - est| is O(eps^2) while the changes themselves are O(eps)
    assert exact.abs().max() > 1e-5
    assert (exact - est).abs().max() < 0.05 * exact.abs().max() + 1e-6


def test_agreement_of_identical_grids_is_perfect():
    x = torch.randn(4, 5)
    a = agreement(x, x.clone(), k=3)
    assert a["spearman"] == pytest.approx(1.0) and a["top_k_overlap"] == 1.0
    b = agreement(x, -x, k=3)
    assert b["spearman"] == pytest.approx(-1.0)



def test_agreement_does_not_rank_rounding_noise_around_zero():
    """Cells that cannot change anything are 0 in AtP and 0 up to fp32 rounding in exact patching
    (the rounding depends on batch shape and CPU): they tie, so ρ and the top-k are the same either way."""
    g = torch.Generator().manual_seed(0)
    exact = torch.cat([torch.randn(12, generator=g), torch.zeros(9)])
    approx = exact + 0.3 * torch.randn(21, generator=g) * (exact != 0)
    noisy = exact + torch.where(exact == 0, 3e-7 * torch.randn(21, generator=g), torch.zeros(21))
    assert agreement(noisy, approx, k=15) == agreement(exact, approx, k=15)
    # a real difference at 1e-3 of the scale is ranked, not snapped
    real = exact + torch.where(exact == 0, 1e-3 * torch.arange(21.0), torch.zeros(21))
    assert agreement(real, approx, k=15)["spearman"] != agreement(exact, approx, k=15)["spearman"]


def test_agreement_does_not_rank_rounding_noise_between_equal_cells():
    """A cumulative grid's consecutive layers are equal up to rounding where the added component
    writes ~nothing: whichever way the rounding orders them (CPU-dependent), ρ and the top-k are the
    same; a gap of 1e-3 of the scale is still ranked."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(14, generator=g)
    approx = base + 0.3 * torch.randn(21, generator=g)[:14]
    approx = torch.cat([approx, approx[:7] + 0.2 * torch.randn(7, generator=g)])
    twin = torch.cat([base, base[:7]])  # cells 14..20 repeat cells 0..6
    up = twin + torch.cat([torch.zeros(14), torch.full((7,), 3e-7)])
    down = twin - torch.cat([torch.zeros(14), torch.full((7,), 3e-7)])
    assert agreement(up, approx, k=10) == agreement(down, approx, k=10) == agreement(twin, approx, k=10)
    apart = twin + torch.cat([torch.zeros(14), torch.full((7,), 1e-3 * float(base.abs().max()))])
    assert agreement(apart, approx, k=10)["spearman"] != agreement(twin, approx, k=10)["spearman"]

# ------------------------------------------------------------------------------------------ AtP*
# The QK fix (refusal_lab.patching.qk_fix): later layers' attention logits are changed to first
# order by the patched head's write into the residual stream, and their softmax is taken exactly.


def _heads_setup(model, T=8, n=2, seed=3, pad=True):
    g = torch.Generator().manual_seed(seed)
    rec = Batch(torch.randint(0, model.cfg.d_vocab, (n, T), generator=g), torch.ones(n, T, dtype=torch.long))
    if pad:
        rec.mask[0, :2] = 0
    return rec, g


def test_atp_star_is_first_order_of_exact(tiny):
    """Tiny perturbation: AtP* = AtP + O(eps^2) = exact + O(eps^2); the QK-fixed and linearised
    contributions through later patterns are each O(eps) and agree to first order."""
    rec, g = _heads_setup(tiny)
    metric = LogitDiff(3, 7)
    receiver = Receiver.record(tiny, rec, metric)
    spec = GridSpec("heads", list(range(tiny.cfg.n_layers)), [5, 7], list(range(tiny.cfg.n_heads)))
    sites = source_sites(tiny, spec)
    acts, grads, attn = receiver_gradients_qk(tiny, rec, sites, metric)
    eps = 1e-4
    source = ActivationCache({s: acts[s] + eps * torch.randn(acts[s].shape, generator=g) for s in sorted(sites)})
    base = receiver.baseline[:, None, None]
    exact = patch_grid(tiny, receiver, source, spec, metric, progress=False) - base
    plain = attribution_grid(tiny, rec, acts, grads, source, spec, receiver.baseline) - base
    star = attribution_grid(tiny, rec, acts, grads, source, spec, receiver.baseline, attention=attn) - base
    scale = exact.abs().max()
    assert scale > 1e-5
    assert (exact - plain).abs().max() < 0.05 * scale + 1e-6
    assert (exact - star).abs().max() < 0.05 * scale + 1e-6
    assert (star - plain).abs().max() < 0.005 * scale + 1e-7
    fixed, linear, corr = qk_fix_correction(tiny, acts, source, attn.records, attn.resid_pre, attn.position_ids,
                                            spec.layers, spec.heads, spec.cols)
    assert linear[:, :-1].abs().max() > 1e-3 * scale  # the paths through later patterns are not vacuous
    assert linear[:, -1].abs().max() == 0  # the last layer has no later layer
    assert (fixed - linear).abs().max() < 1e-3 * linear.abs().max()
    assert torch.equal(corr, fixed - linear)


def test_receiver_gradients_qk_matches_plain_pass(tiny):
    """The recording (eager) attention changes neither activations nor gradients."""
    rec, _ = _heads_setup(tiny)
    metric = LogitDiff(3, 7)
    sites = {f"blocks.{l}.attn.hook_z" for l in range(tiny.cfg.n_layers)}
    a0, g0 = receiver_gradients(tiny, rec, sites, metric)
    a1, g1, attn = receiver_gradients_qk(tiny, rec, sites, metric)
    for s in sites:
        assert torch.allclose(a0[s], a1[s], atol=1e-5) and torch.allclose(g0[s], g1[s], atol=1e-5)
    assert set(attn.records) == set(range(tiny.cfg.n_layers))
    r = attn.records[1]
    H, Hkv, T = tiny.cfg.n_heads, tiny.cfg.n_key_value_heads, rec.T
    assert r.query.shape == (2, H, T, tiny.cfg.d_head) and r.key.shape == (2, Hkv, T, tiny.cfg.d_head)
    assert r.grad_probs.shape == (2, H, T, T) and r.grad_probs.abs().sum() > 0
    assert tiny.hf_model.config._attn_implementation != "refusal_lab_record"  # restored


def _raw_scores(model, rec, layer, hooks):
    """Scaled, pre-soft-cap logits [b, H, T, T] of ``layer`` in a real forward with ``hooks``."""
    with recording(model) as r, torch.no_grad():
        model(rec.ids, rec.mask, fwd_hooks=hooks, logits="last")
    a = r.records[layer]
    k = a.key.repeat_interleave(a.query.shape[1] // a.key.shape[1], 1)
    return (a.query.double() @ k.double().transpose(2, 3)) * a.scaling


def test_delta_scores_match_a_hooked_forward(tiny):
    """Δscores of layer 2 for head h of layer 0 = the derivative of layer 2's real logits when head h's
    z moves along dz while every component between them is frozen (the direct path), by a central
    difference through the full model with hooks: checks the post-norm and ln1 JVPs, q/k norms,
    rotary, GQA, scaling and the scatter into rows/columns."""
    rec, g = _heads_setup(tiny)
    metric = LogitDiff(3, 7)
    cols, l, l2, h = [4, 6], 0, 2, 1
    sites = {f"blocks.{i}.attn.hook_z" for i in range(tiny.cfg.n_layers)}
    acts, _, attn = receiver_gradients_qk(tiny, rec, sites, metric)
    _, cache = tiny.run_with_cache(rec.ids, rec.mask)
    z = acts[f"blocks.{l}.attn.hook_z"]
    dz = torch.randn(z[:, cols].shape, generator=g) * z[:, cols].std()

    def hooks(t):
        def move(x, hook):
            x = x.clone()
            x[:, cols, h] += t * dz[:, :, h]
            return x

        def freeze(name):
            return name, lambda x, hook: cache[name]

        return [(f"blocks.{l}.attn.hook_z", move), freeze(f"blocks.{l}.hook_mlp_out"),
                freeze(f"blocks.{l + 1}.hook_attn_out"), freeze(f"blocks.{l + 1}.hook_mlp_out")]

    t = 1e-2
    fd = (_raw_scores(tiny, rec, l2, hooks(t)) - _raw_scores(tiny, rec, l2, hooks(-t))) / (2 * t)
    dr = head_writes(tiny, l, z[:, cols], dz, [h])  # [1, b, C, d]
    resid = attn.resid_pre[l2]
    cos, sin = tiny.adapter.rotary(resid, attn.position_ids, l2)
    q, k = qk_states(tiny, l2, resid[:, cols], cos[:, cols], sin[:, cols])  # our q/k path = HF's
    assert torch.allclose(q, attn.records[l2].query[:, :, cols], atol=1e-5)
    assert torch.allclose(k, attn.records[l2].key[:, :, cols], atol=1e-5)
    dq, dk = qk_tangents(tiny, l2, resid[:, cols], dr, cos[:, cols], sin[:, cols])
    mine = dense_delta_scores(*delta_scores(attn.records[l2], dq, dk), cols)[0]
    allowed = attn.records[l2].mask.expand_as(fd) > -1e30
    in_c = torch.zeros(rec.T, dtype=torch.bool)
    in_c[cols] = True
    outside = allowed & ~(in_c[:, None] | in_c[None, :])
    assert fd[outside].abs().max() < 1e-4 and mine[outside].abs().max() == 0  # only rows/columns C move
    fd, mine = fd[allowed], mine[allowed]
    assert mine.abs().max() > 1e-2
    assert (fd - mine).abs().max() < 2e-3 * mine.abs().max() + 1e-4, float((fd - mine).abs().max())


@pytest.mark.parametrize("size", [0.3, 30.0])
def test_fixed_contribution_equals_dense_softmax(tiny, size):
    """The closed-form softmax of :func:`fixed_and_linear` (rows outside C change only at the key
    columns C) equals a dense recomputation with HF's eager attention arithmetic (soft-cap, additive
    mask, softmax), also far outside the linear regime (size 30: saturated keys take over); and its
    linear term equals the autograd derivative of that dense recomputation."""
    rec, g = _heads_setup(tiny, T=9)
    metric = LogitDiff(3, 7)
    sites = {f"blocks.{i}.attn.hook_z" for i in range(tiny.cfg.n_layers)}
    _, _, attn = receiver_gradients_qk(tiny, rec, sites, metric)
    r = attn.records[1]
    cols, N = [3, 6], 5
    b, H, T, _ = r.grad_probs.shape
    d_cols = torch.randn(N, b, H, T, len(cols), generator=g, dtype=torch.float64) * size
    d_rows = torch.randn(N, b, H, len(cols), T, generator=g, dtype=torch.float64) * size
    fixed, linear = fixed_and_linear(r, d_cols, d_rows, cols)

    k = r.key.double().repeat_interleave(H // r.key.shape[1], 1)
    raw = (r.query.double() @ k.transpose(2, 3)) * r.scaling
    G = r.grad_probs.double()

    def probs(x):
        if r.softcap:
            x = torch.tanh(x / r.softcap) * r.softcap
        return torch.softmax(x + r.mask.double(), -1)

    dense = dense_delta_scores(d_cols, d_rows, cols)
    want = ((probs(raw + dense) - probs(raw)) * G).sum((2, 3, 4))
    assert torch.allclose(fixed, want, rtol=1e-6, atol=1e-9)
    x = raw.clone().requires_grad_(True)
    (probs(x) * G).sum().backward()
    want_lin = (dense * x.grad).sum((2, 3, 4))
    assert torch.allclose(linear, want_lin, rtol=1e-6, atol=1e-9)
    if size > 1:
        assert (fixed - linear).abs().max() > 0.1 * linear.abs().max()  # far from linear: the test bites


def _saturate(model, layer, alpha):
    """Multiply the layer's attention logits by alpha**2 (q and k by alpha, after any q/k norm)."""
    at = model.adapter.attn(layer)
    with torch.no_grad():
        if hasattr(at, "q_norm"):
            for norm in (at.q_norm, at.k_norm):
                if model.cfg.model_type.startswith("gemma"):  # gain is (1 + w)
                    norm.weight.copy_(alpha * (1 + norm.weight) - 1)
                else:
                    norm.weight.mul_(alpha)
        else:
            for lin in (at.q_proj, at.k_proj):
                lin.weight.mul_(alpha)
                if lin.bias is not None:
                    lin.bias.mul_(alpha)


def test_qk_fix_rescues_saturated_attention(tiny_saturable):
    """A constructed saturated case: the last layer's logits are scaled up until the last query attends
    to one key only (the runner-up key c is ``target`` behind), then each head of the layer before
    is patched at c with a small z change that lifts c's logit above the leader by a margin. The
    attention flips, which exact patching sees; plain AtP sees p(1 - p) ~ 0 and misses it; AtP*
    recomputes the softmax and gets it."""
    m = tiny_saturable
    L, H, dh = m.cfg.n_layers, m.cfg.n_heads, m.cfg.d_head
    T, l, target, margin = 9, L - 2, 6.0, 3.0
    g = torch.Generator().manual_seed(5)
    many = Batch(torch.randint(0, m.cfg.d_vocab, (64, T), generator=g), torch.ones(64, T, dtype=torch.long))
    metric = LogitDiff(3, 7)
    name = f"blocks.{l}.attn.hook_z"
    cap = m.hf_model.config.attn_logit_softcapping if m.cfg.model_type == "gemma2" else None
    capf = (lambda x: cap * torch.tanh(torch.as_tensor(x) / cap)) if cap else (lambda x: torch.as_tensor(x))

    def last_row(batch):
        _, _, attn = receiver_gradients_qk(m, batch, {name}, metric)
        r = attn.records[L - 1]
        k = r.key.repeat_interleave(H // r.key.shape[1], 1)
        raw = ((r.query @ k.transpose(2, 3)) * r.scaling)[:, :, T - 1].double()  # [b, H, T]
        return raw.masked_fill(r.mask[:, :, T - 1] < -1e30, float("nan"))

    # choose (prompt, query head, key c) with the smallest logit gap; the scale alpha**2 makes it `target`
    raw = last_row(many)
    best = None
    for b in range(len(raw)):
        for h1 in range(H):
            s = raw[b, h1]
            top = int(torch.nan_to_num(s, nan=-1e30).argmax())
            for c in range(T - 1):
                if c == top or torch.isnan(s[c]) or s[top] - s[c] <= 0:
                    continue
                a2 = target / float(s[top] - s[c])
                if cap:  # keep the scaled logits where the soft-cap still separates them
                    a2 = next((x for x in torch.logspace(-1, 4, 400).tolist()
                               if capf(x * s[top]) - capf(x * s[c]) >= target), None)
                    if a2 is None or a2 * float(torch.nan_to_num(s, nan=0).abs().max()) > 0.8 * cap:
                        continue
                if best is None or 1 / a2 < best[0]:
                    best = (1 / a2, b, h1, c, a2)
    _, b0, h1, c, a2 = best
    _saturate(m, L - 1, a2**0.5)
    rec = Batch(many.ids[b0:b0 + 1], many.mask[b0:b0 + 1])
    s = last_row(rec)[0, h1]
    top = int(torch.nan_to_num(s, nan=-1e30).argmax())
    want = float(s[top] - s[c]) + margin
    if cap:  # the raw logit c needs so that its capped value leads by the margin
        want = float(cap * torch.atanh((capf(s[top]) + margin) / cap) - s[c])

    receiver = Receiver.record(m, rec, metric)
    spec = GridSpec("heads", [l], [c], list(range(H)))
    acts, grads, attn = receiver_gradients_qk(m, rec, source_sites(m, spec), metric)
    r = attn.records[L - 1]
    assert r.grad_probs is not None
    p = torch.softmax(capf(torch.nan_to_num(s, nan=-1e30)), -1)
    assert p[top] > 0.99  # saturated
    # the z change of each head that moves the first-order logit (T-1, c) of query head h1 by `want`
    z_r = acts[name][:, [c]]
    resid = attn.resid_pre[L - 1]
    cos, sin = m.adapter.rotary(resid, attn.position_ids, L - 1)
    src = acts[name].clone()
    for h in range(H):
        basis = torch.zeros(dh, 1, 1, H, dh)
        basis[torch.arange(dh), :, 0, h, torch.arange(dh)] = 1
        dr = torch.cat([head_writes(m, l, z_r, basis[i], [h]) for i in range(dh)])
        dq, dk = qk_tangents(m, L - 1, resid[:, [c]], dr, cos[:, [c]], sin[:, [c]])
        j = delta_scores(r, dq, dk)[0][:, 0, h1, T - 1, 0]
        src[0, c, h] += (want * j / (j @ j)).float()
    source = ActivationCache({name: src})
    base = receiver.baseline[:, None, None]
    exact = patch_grid(m, receiver, source, spec, metric, progress=False) - base
    plain = attribution_grid(m, rec, acts, grads, source, spec, receiver.baseline) - base
    star = attribution_grid(m, rec, acts, grads, source, spec, receiver.baseline, attention=attn) - base
    err_plain, err_star = (exact - plain).abs().mean(), (exact - star).abs().mean()
    assert exact.abs().mean() > 5e-3
    assert err_plain > 0.5 * exact.abs().mean()  # plain AtP is badly wrong
    assert err_star < 0.5 * err_plain, (float(err_star), float(err_plain))


def test_run_reports_atp_star_for_heads_beside_plain_atp(tmp_path):
    """A tiny run: the head grid's attribution is AtP* with plain AtP beside it; other grids stay AtP."""
    import json

    from refusal_lab.cli import main
    from tests.helpers_tiny_chat import make_tiny_chat_model

    model = make_tiny_chat_model(tmp_path / "models")
    out, config = tmp_path / "run", tmp_path / "config.json"
    config.write_text(json.dumps({"generate_tokens": 0}))
    assert main(["run", "--model", str(model), "--out", str(out), "--quiet", "--grids", "resid_pre,heads",
                 "--config", str(config)]) == 0
    r = json.loads((out / "results.json").read_text())
    p = r["patching"]
    assert p["attribution"]["heads"]["variant"] == "AtP*" and p["attribution"]["resid_pre"]["variant"] == "AtP"
    heads = p["agreement"]["heads"]
    assert heads["variant"] == "AtP*" and heads["plain"]["variant"] == "AtP"
    for a in (heads, heads["plain"], p["agreement"]["resid_pre"]):
        assert -1 <= a["spearman"] <= 1 and 0 <= a["top_k_overlap"] <= 1
    star, plain = torch.tensor(p["attribution"]["heads"]["values"]), torch.tensor(p["attribution"]["heads"]["values_plain"])
    assert star.shape == plain.shape == torch.tensor(p["heads"]["values"]).shape
    assert torch.isfinite(star).all() and not torch.equal(star, plain)
    assert torch.equal(star[-1], plain[-1])  # the last layer has no later pattern to fix
    assert any("AtP*" in f and "plain AtP" in f for f in r["findings"])


@pytest.mark.real_model
def test_atp_star_on_the_real_model(real_model, tmp_path):
    """Qwen2.5-Coder-0.5B, the replication's prompts: AtP and AtP* against exact patching of the
    head grid (harmful -> harmless at post_obj). Both are computed and finite; the Spearman numbers
    are printed (no claim that AtP* wins)."""
    import time

    from refusal_lab.metrics import normalise
    from refusal_lab.run.config import RunConfig
    from refusal_lab.run.folder import RunFolder
    from refusal_lab.run.inputs import RunInputs
    from refusal_lab.run.step import RunContext
    from refusal_lab.run.steps import attribution, patch

    cfg = RunConfig(grids=["heads"], generate_tokens=0)
    rep = RunInputs(real_model, cfg)
    n = 2  # of the 7 pairs: the exact grid (24 x 14 heads) costs ~20 CPU-seconds a pair
    rep.batches = {side: Batch(b.ids[:n], b.mask[:n]) for side, b in rep.batches.items()}
    ctx = RunContext(rep, RunFolder(tmp_path / "run", cfg), progress=False)
    t0 = time.perf_counter()
    exact = torch.as_tensor(patch.compute(ctx, "heads", "sufficiency")["per_pair"])
    t1 = time.perf_counter()
    attr = attribution.compute(ctx)["heads"]
    t2 = time.perf_counter()
    star, plain = torch.as_tensor(attr["per_pair"]), torch.as_tensor(attr["per_pair_plain"])
    assert exact.shape == star.shape == plain.shape == (n, 24, 14)
    assert torch.isfinite(star).all() and torch.isfinite(plain).all() and not torch.equal(star, plain)
    s_mean = float(rep.receiver("harmless").baseline.mean())
    h_mean = float(rep.receiver("harmful").baseline.mean())
    e, s, p = (normalise(x, s_mean, h_mean).mean(0) for x in (exact, star, plain))
    a_star, a_plain = agreement(e, s), agreement(e, p)
    err = lambda x: float((x - exact).abs().mean())  # noqa: E731
    print(f"\nheads grid, {exact.shape[0]} pairs: exact {t1 - t0:.1f}s, AtP + AtP* {t2 - t1:.1f}s\n"
          f"AtP  vs exact: Spearman {a_plain['spearman']:.3f}, top-10 overlap {a_plain['top_k_overlap']:.2f}, "
          f"mean |error| {err(plain):.4f}\n"
          f"AtP* vs exact: Spearman {a_star['spearman']:.3f}, top-10 overlap {a_star['top_k_overlap']:.2f}, "
          f"mean |error| {err(star):.4f}")
    assert -1 <= a_star["spearman"] <= 1 and -1 <= a_plain["spearman"] <= 1
