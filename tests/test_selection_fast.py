"""The fast direction selection (issue 12) against independent computations on tiny models of every
architecture: the cone addition equals the full-forward addition; the first-order bypass estimate
equals a finite difference; the exhaustive mode reproduces the paper's loop (a naive copy of the
pre-issue-12 selection) exactly; the top-k mode chooses what the exhaustive one does when the top k
hold the winner, and scores only what it says it scored."""

import math

import pytest
import torch

from refusal_lab.metrics import refusal_log_odds
from refusal_lab.steering.damage import next_token_kl
from refusal_lab.steering.interventions import ablation_hooks, addition_hooks, unit
from refusal_lab.steering.selection import (DirectionPolicy, ablation_sites, choose_candidate, first_order_bypass,
                                            select_direction)
from refusal_lab.steering.vectors import diff_in_means_all_layers
from tests.conftest import prefixed_batch, random_batch

POS = (-3, -2, -1)
REFUSAL = list(range(100))


def _splits(model):
    return (random_batch(model, b=4, T=9, seed=1), random_batch(model, b=4, T=9, seed=2),
            random_batch(model, b=3, T=8, seed=3), random_batch(model, b=3, T=8, seed=4))


@torch.no_grad()
def test_cone_addition_equals_full_forward(tiny):
    """prefill(start_layer=l, resid_pre=cached resid_pre[l]) under an addition at layer l equals the
    whole forward under the same addition (to 1e-5; the blocks before l see no edit)."""
    ids, mask = random_batch(tiny, b=3, T=8, seed=5)
    L = tiny.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
    cache = tiny.prefill(ids, mask, names=names, logits="last").cache
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(0))
    for l in range(L):
        hooks = addition_hooks(v, l, 1.5)
        full = tiny(ids, mask, fwd_hooks=hooks, logits="last")
        cone = tiny.prefill(ids, mask, fwd_hooks=hooks, logits="last", start_layer=l,
                            resid=cache[names[l]] if l else None).logits
        torch.testing.assert_close(cone, full, rtol=1e-5, atol=1e-5)


def test_cone_needs_the_residual(tiny):
    ids, mask = random_batch(tiny, b=2, T=6, seed=5)
    with pytest.raises(ValueError, match="resid"):
        tiny.prefill(ids, mask, start_layer=1)


@pytest.mark.parametrize("common", [0, 4])
@pytest.mark.parametrize("model_type,rel,abs_", [("qwen2", 1e-5, 1e-8), ("llama", 1e-5, 1e-8), ("mistral", 1e-5, 1e-8),
                                                ("gemma2", 1e-3, 2e-5)])
def test_first_order_estimate_equals_finite_difference(model_type, rel, abs_, common):
    """d/dε of the mean refusal log-odds under partial ablation x -> x - ε (x·r̂) r̂ at every residual
    write, at ε = 0, equals the first-order estimate: central differences at ε = 1e-3 and 2e-3, Richardson-
    extrapolated (truncation error O(ε⁴)), on a float64 model whose RMSNorms compute in float64 too (HF casts them to float32, and
    Gemma 2's eager softmax stays float32: a smaller ε drowns in that rounding); tolerance 1e-5, and
    1e-3 (or 2e-5 absolute) for Gemma 2, whose float32 softmax leaves differences of a few 1e-6
    whatever ε. With ``common`` leading tokens shared by every prompt, the estimate runs them once
    per batch (their gradient summed over the rows); the finite differences run whole prompts."""
    from refusal_lab.models.hooked import HookedChatModel
    from tests.tiny_models import tiny_model

    hf = tiny_model(model_type, dtype=torch.float64)
    for m in hf.modules():
        if type(m).__name__.endswith("RMSNorm"):
            gain = (lambda w: 1.0 + w) if "Gemma" in type(m).__name__ else (lambda w: w)
            eps_ = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
            m.forward = lambda x, m=m, gain=gain, eps_=eps_: gain(m.weight) * (
                x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps_))
    model = HookedChatModel(hf)
    # (Gemma 2 in float64 turns left-padded rows to NaN in HF's own attention: unpadded there)
    ids, mask = random_batch(model, b=3, T=8, seed=7, pad=0 if model_type == "gemma2" else 2)
    if common:  # every row begins with the same tokens, then 3 (Gemma 2: unpadded) or 2..4 of its own
        g = torch.Generator().manual_seed(7)
        head = torch.randint(0, model.cfg.d_vocab, (common,), generator=g)
        own = [3] * 3 if model_type == "gemma2" else [2, 4, 3]
        T = common + max(own)
        ids, mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
        for i, k in enumerate(own):
            ids[i, T - common - k:] = torch.cat([head, torch.randint(0, model.cfg.d_vocab, (k,), generator=g)])
            mask[i, T - common - k:] = 1
        from refusal_lab.models.shared_prefix import SharedPrefix

        assert SharedPrefix.split(ids, mask, 2).prefix_len == common  # the estimate's shared path is taken
    dirs = torch.randn(4, model.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    est, base = first_order_bypass(model, ids, mask, dirs, REFUSAL, batch_size=2)

    def metric(r, eps):
        r = unit(r).to(model.dtype)

        def partial(x, hook):
            return x - eps * (x @ r)[..., None] * r

        with torch.no_grad():
            logits = model(ids, mask, fwd_hooks=[(n, partial) for n in ablation_sites(model)], logits="last")
        return float(refusal_log_odds(logits, REFUSAL).mean())

    assert base == pytest.approx(metric(dirs[0], 0.0), abs=1e-10)
    def central(r, eps):
        return (metric(r, eps) - metric(r, -eps)) / (2 * eps)

    eps = 1e-3
    for c in range(dirs.shape[0]):
        fd = (4 * central(dirs[c], eps) - central(dirs[c], 2 * eps)) / 3  # Richardson: error O(ε⁴)
        assert float(est[c]) - base == pytest.approx(fd, rel=rel, abs=abs_)


@torch.no_grad()
def naive_exhaustive(model, harmful_train, harmless_train, harmful_val, harmless_val, positions, policy):
    """The selection loop as it was before issue 12: three whole forwards per candidate."""
    cands = diff_in_means_all_layers(model, *harmful_train, *harmless_train, positions=positions)
    (hf_ids, hf_mask), (hl_ids, hl_mask) = harmful_val, harmless_val

    def last(ids, mask, hooks):
        return model(ids, mask, fwd_hooks=list(hooks), logits="last").to(torch.float64)

    def lo(ids, mask, hooks):
        return float(refusal_log_odds(last(ids, mask, hooks), REFUSAL).mean())

    base_hl = last(hl_ids, hl_mask, ())
    L = model.cfg.n_layers
    table = []
    for l in range(L):
        for j, p in enumerate(positions):
            r = cands[l, j]
            row = {"layer": l, "position": p, "norm": float(r.norm())}
            if not torch.isfinite(r.norm()) or float(r.norm()) == 0.0:
                table.append(row | {"bypass": math.nan, "induce": math.nan, "kl": math.nan, "kept": False,
                                    "reason": "zero direction"})
                continue
            abl = ablation_hooks(model, r)
            bypass = lo(hf_ids, hf_mask, abl)
            kl = float(next_token_kl(base_hl, last(hl_ids, hl_mask, abl)).mean())
            induce = lo(hl_ids, hl_mask, addition_hooks(r.to(model.dtype), l, policy.induce_alpha))
            reasons = []
            if not kl < policy.kl_max:
                reasons.append(f"kl {kl:.4g} >= kl_max {policy.kl_max:g}")
            if not induce > 0:
                reasons.append(f"induce {induce:.4g} <= 0")
            if not l < policy.max_layer_frac * L:
                reasons.append(f"layer {l} >= max_layer_frac*L = {policy.max_layer_frac * L:g}")
            table.append(row | {"bypass": bypass, "induce": induce, "kl": kl, "kept": not reasons,
                                "reason": "; ".join(reasons) or "kept"})
    base_hl_induce = float(refusal_log_odds(base_hl, REFUSAL).mean())
    best, _, _ = choose_candidate(table, policy.kl_max, policy.max_layer_frac * L, base_hl_induce)
    return table, best


KEYS = ("layer", "position", "norm", "bypass", "induce", "kl", "kept", "reason")


@pytest.mark.parametrize("kl_max", [5.0, 1e-12])
def test_exhaustive_reproduces_the_papers_loop(tiny, kl_max):
    """--exhaustive: every row of the naive loop's table, every key, exactly (induce to 1e-6: it now
    runs in the cone), and the same choice — with filters that keep some and that keep none."""
    policy = DirectionPolicy(kl_max=kl_max, max_layer_frac=0.7, exhaustive=True)
    splits = _splits(tiny)
    res = select_direction(tiny, *splits, positions=POS, refusal_ids=REFUSAL, policy=policy)
    table, best = naive_exhaustive(tiny, *splits, POS, policy)
    assert len(res.table) == len(table)
    for new, old in zip(res.table, table):
        for k in KEYS:
            if k == "induce" and not math.isnan(old[k]):
                assert new[k] == pytest.approx(old[k], rel=1e-6, abs=1e-6)
            elif isinstance(old[k], float) and math.isnan(old[k]):
                assert math.isnan(new[k])
            else:
                assert new[k] == old[k], (k, new, old)
    assert (res.layer, res.position) == (best["layer"], best["position"])
    assert res.agreement["mode"] == "exhaustive"
    assert res.agreement["n_scored"]["bypass"] == sum(1 for r in table if r["reason"] != "zero direction")


def test_top_k_covering_every_candidate_chooses_as_exhaustive(tiny):
    """With top_k >= the eligible candidates, the fast mode scores each one's kl, the bypass of those
    that pass it, and chooses what the exhaustive mode chooses."""
    splits = _splits(tiny)
    kw = dict(kl_max=5.0, max_layer_frac=0.7)
    ex = select_direction(tiny, *splits, positions=POS, refusal_ids=REFUSAL, policy=DirectionPolicy(**kw, exhaustive=True))
    fast = select_direction(tiny, *splits, positions=POS, refusal_ids=REFUSAL, policy=DirectionPolicy(**kw, top_k=99))
    assert (fast.layer, fast.position) == (ex.layer, ex.position)
    # (the fast mode runs the prompts' common beginning once: equal to rounding)
    assert fast.bypass == pytest.approx(ex.bypass, abs=1e-5) and fast.kl == pytest.approx(ex.kl, abs=1e-5)
    assert fast.induce == pytest.approx(ex.induce, abs=1e-5)
    L = tiny.cfg.n_layers
    for f, e in zip(fast.table, ex.table):
        # (the candidates' means too: equal to rounding)
        assert f["bypass_estimate"] == pytest.approx(e["bypass_estimate"], rel=1e-5, abs=1e-6) or (
            math.isnan(f["bypass_estimate"]) and math.isnan(e["bypass_estimate"]))
        if f["layer"] >= 0.7 * L:  # dropped by the layer filter: listed, not scored
            assert math.isnan(f["bypass"]) and not f["kept"] and "not scored" in f["reason"] or f["reason"] == "zero direction"
        elif f["reason"] != "zero direction":
            assert not math.isnan(f["kl"])
            if math.isnan(f["bypass"]):  # rejected by kl: bypass and induce not scored
                assert not e["kl"] < kw["kl_max"] and "not scored (the kl filter already rejects it)" in f["reason"]
            else:
                assert f["bypass"] == pytest.approx(e["bypass"], abs=1e-5)
            if f["kl_prompts"] == splits[3][0].shape[0]:
                assert f["kl"] == pytest.approx(e["kl"], abs=1e-5)
                assert f["kept"] == e["kept"] or math.isnan(f["induce"])  # (past the choice: induce not asked)
            elif not math.isnan(f["kl"]):  # stopped early: a lower bound that already fails
                assert kw["kl_max"] <= f["kl"] <= e["kl"] + 1e-6 and not f["kept"] and not e["kept"]
    kept_fast = [r for r in fast.table if r["kept"]]
    assert len(kept_fast) <= 1 and all(r["bypass"] == fast.bypass for r in kept_fast)


@pytest.mark.parametrize("kl_max", [5.0, 0.05, 1e-3, 1e-12])
def test_lazy_kl_chooses_as_the_policy_on_every_score(tiny, kl_max):
    """KL scored only where it can decide (each stage walked in bypass order) chooses what the policy
    chooses with every candidate's every score, at whichever stage the filters leave."""
    splits = _splits(tiny)
    kw = dict(kl_max=kl_max, max_layer_frac=1.0)
    ex = select_direction(tiny, *splits, positions=POS, refusal_ids=REFUSAL, policy=DirectionPolicy(**kw, exhaustive=True))
    fast = select_direction(tiny, *splits, positions=POS, refusal_ids=REFUSAL, policy=DirectionPolicy(**kw, top_k=99))
    assert (fast.layer, fast.position, fast.stage) == (ex.layer, ex.position, ex.stage)
    assert ex.agreement["top_k_agrees"] is True
    n = fast.agreement["n_scored"]
    assert n["induce"] <= n["bypass"] <= n["kl"] == sum(1 for r in fast.table if r["reason"] != "zero direction")
    for r in fast.table:  # induce only of candidates that pass kl; bypass of those, or of all at the last stage
        if not math.isnan(r["induce"]):
            assert r["kl"] < kl_max and not math.isnan(r["bypass"])
        if not math.isnan(r["bypass"]) and fast.stage != "layer_only":
            assert r["kl"] < kl_max


@pytest.mark.parametrize("kl_max", [0.05, 1e-3, 1e-12])
def test_kl_stopped_once_its_sum_decides_chooses_as_every_prompt(tiny, kl_max, monkeypatch):
    """The top_k mode's KL in chunks of KL_CHUNK prompts, stopped once the sum so far reaches
    kl_max x n (KL >= 0): the same choice, stage and verdicts as scoring every prompt (KL_CHUNK
    larger than the split); a stopped row's kl is a lower bound of the full mean that already fails,
    with kl_prompts < n, and the forwards count only the prompts run."""
    import refusal_lab.steering.selection as selection

    splits = _splits(tiny)
    n = splits[3][0].shape[0]
    pol = DirectionPolicy(kl_max=kl_max, max_layer_frac=1.0, top_k=99)
    monkeypatch.setattr(selection, "KL_CHUNK", 64)
    whole = select_direction(tiny, *splits, positions=POS, refusal_ids=REFUSAL, policy=pol)
    monkeypatch.setattr(selection, "KL_CHUNK", 1)
    lazy = select_direction(tiny, *splits, positions=POS, refusal_ids=REFUSAL, policy=pol)
    assert (lazy.layer, lazy.position, lazy.stage) == (whole.layer, whole.position, whole.stage)
    stopped = 0
    for a, b in zip(lazy.table, whole.table):
        assert a["kept"] == b["kept"] and math.isnan(a["kl"]) == math.isnan(b["kl"])
        if math.isnan(a["kl"]):
            continue
        assert b["kl_prompts"] == n and (a["kl"] < kl_max) == (b["kl"] < kl_max)
        if a["kl_prompts"] < n:
            stopped += 1
            assert kl_max <= a["kl"] <= b["kl"] + 1e-7 and "a lower bound" in a["reason"]
        else:
            assert a["kl"] == pytest.approx(b["kl"], rel=1e-5, abs=1e-7)
    if kl_max <= 1e-3:
        assert stopped > 0  # the early stop fired
    n_kl = sum(r["kl_prompts"] for r in lazy.table if not math.isnan(r["kl"]))
    assert lazy.agreement["n_forwards"]["kl"] == n_kl


def test_top_k_scores_only_the_top_k(tiny):
    splits = _splits(tiny)
    res = select_direction(tiny, *splits, positions=POS, refusal_ids=REFUSAL,
                           policy=DirectionPolicy(kl_max=5.0, max_layer_frac=1.0, top_k=2))
    scored = [r for r in res.table if not math.isnan(r["kl"])]
    eligible = [r for r in res.table if r["reason"] != "zero direction"]
    by_est = sorted(eligible, key=lambda r: r["bypass_estimate"])
    assert len(scored) == min(2, len(eligible))  # the top 2 by estimate, nothing else
    assert {(r["layer"], r["position"]) for r in scored} == {(r["layer"], r["position"]) for r in by_est[:2]}
    assert res.agreement["chosen_in_top_k"] is True
    assert res.agreement["n_scored"]["kl"] == len(scored)
    assert res.agreement["n_scored"]["bypass"] == sum(1 for r in res.table if not math.isnan(r["bypass"]))
    assert res.agreement["mode"] == "top_k" and res.agreement["top_k"] == 2


def test_selection_keeps_its_per_prompt_scores_and_train_rows(tiny):
    """``per_prompt``: the harmful val log-odds unedited and with the chosen direction ablated (equal to
    whole forwards; the ablated mean is the table's bypass bit for bit) and, in the top_k mode, the
    train residuals at the chosen site (equal to whole forwards; their mean difference is the
    direction bit for bit). The exhaustive mode keeps no train rows."""
    from refusal_lab.steering.geometry import column_activations
    from refusal_lab.steering.selection import _row_mean

    splits = _splits(tiny)
    res = select_direction(tiny, *splits, positions=POS, refusal_ids=REFUSAL, policy=DirectionPolicy(kl_max=5.0))
    pp = res.per_prompt
    assert float(pp["harmful_ablated"].mean()) == res.bypass
    assert math.isclose(float(pp["harmful_baseline"].mean()), res.baseline["harmful"], rel_tol=1e-6, abs_tol=1e-6)
    val = splits[2]
    for key, hooks in (("harmful_baseline", []), ("harmful_ablated", ablation_hooks(tiny, res.direction))):
        want = refusal_log_odds(tiny(*val, fwd_hooks=hooks, logits="last"), REFUSAL).to(torch.float64)
        torch.testing.assert_close(pp[key], want, rtol=1e-5, atol=1e-5)
    site = [f"blocks.{res.layer}.hook_resid_pre"]
    for side, (ids, mask) in (("harmful", splits[0]), ("harmless", splits[1])):
        torch.testing.assert_close(pp[f"train_{side}"], column_activations(tiny, ids, mask, site, res.position)[:, 0],
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(_row_mean(pp["train_harmful"]) - _row_mean(pp["train_harmless"]), res.direction)
    ex = select_direction(tiny, *splits, positions=POS, refusal_ids=REFUSAL,
                          policy=DirectionPolicy(kl_max=5.0, exhaustive=True))
    assert set(ex.per_prompt) == {"harmful_baseline", "harmful_ablated"}
    assert float(ex.per_prompt["harmful_ablated"].mean()) == ex.bypass


def test_the_estimates_backward_batch_changes_no_choice(tiny, monkeypatch):
    """The first-order estimate runs its backward over GRADIENT_BATCH prompts at a time (the step's
    peak memory): a sum over prompts, so one prompt per backward gives the same estimates (to float64
    rounding of fp32 gradients: 1e-6) and the same table, choice and scores as one batch of all."""
    import refusal_lab.steering.selection as selection

    splits = _splits(tiny)
    runs = {}
    for gb in (1, 16):
        monkeypatch.setattr(selection, "GRADIENT_BATCH", gb)
        runs[gb] = select_direction(tiny, *splits, positions=POS, refusal_ids=REFUSAL,
                                    policy=DirectionPolicy(kl_max=5.0, top_k=3))
    one, all_ = runs[1], runs[16]
    est = lambda r: torch.tensor([row["bypass_estimate"] for row in r.table], dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(est(one), est(all_), rtol=1e-6, atol=1e-6, equal_nan=True)
    assert (one.layer, one.position) == (all_.layer, all_.position)
    assert [r["reason"] for r in one.table] == [r["reason"] for r in all_.table]
    torch.testing.assert_close(one.per_prompt["harmful_baseline"], all_.per_prompt["harmful_baseline"],
                               rtol=1e-6, atol=1e-6)


def test_policy_top_k_must_be_positive():
    from refusal_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="top_k"):
        DirectionPolicy(top_k=0)


@torch.no_grad()
def test_shared_prefix_equals_whole_forward(tiny):
    """The common beginning run once (one row, its keys and values reused) gives the whole forward's
    last-column logits, unedited, under directional ablation and under an addition at every column."""
    from refusal_lab.models.shared_prefix import SharedPrefix

    ids, mask = prefixed_batch(tiny)
    sp = SharedPrefix.split(ids, mask, batch_size=2)
    assert sp.prefix_len == 4 and [b[0] for b in sp.batches] == [[0, 1], [2, 3], [4]]
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(3))
    for hooks in ([], ablation_hooks(tiny, v), addition_hooks(v, 1, 2.0)):
        torch.testing.assert_close(sp.last_logits(tiny, hooks), tiny(ids, mask, fwd_hooks=hooks, logits="last"),
                                   rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_shared_prefix_batch_by_batch_equals_last_logits(tiny):
    """iter_last_logits (the edited prefix once, then batch by batch, as the KL scoring stops early)
    gives last_logits' rows bit for bit, in batch order."""
    from refusal_lab.models.shared_prefix import SharedPrefix

    ids, mask = prefixed_batch(tiny)
    sp = SharedPrefix.split(ids, mask, batch_size=2)
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(4))
    for hooks in ([], ablation_hooks(tiny, v)):
        got = list(sp.iter_last_logits(tiny, hooks))
        assert [idx for idx, _ in got] == [[0, 1], [2, 3], [4]]
        assert torch.equal(torch.cat([x for _, x in got]), sp.last_logits(tiny, hooks))


@torch.no_grad()
def test_shared_prefix_cone_equals_whole_forward(tiny):
    """An addition at layer l run only from l (the unedited residuals there recorded once, prefix and
    batches) gives the whole forward's last-column logits, at every layer; so does the recording
    run itself, unedited."""
    from refusal_lab.models.shared_prefix import SharedPrefix

    ids, mask = prefixed_batch(tiny)
    sp = SharedPrefix.split(ids, mask, batch_size=2)
    L = tiny.cfg.n_layers
    base, cone = sp.record(tiny, range(L))
    torch.testing.assert_close(base, tiny(ids, mask, logits="last"), rtol=1e-5, atol=1e-5)
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(5))
    for l in range(L):
        hooks = addition_hooks(v, l, 1.5)
        torch.testing.assert_close(sp.last_logits(tiny, hooks, cone=cone, start_layer=l),
                                   tiny(ids, mask, fwd_hooks=hooks, logits="last"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cone"):
        sp.last_logits(tiny, [], start_layer=1)


@torch.no_grad()
def test_shared_prefix_mean_resid_equals_diff_in_means_inputs(tiny):
    """The prefix-sharing mean of resid_pre at columns counted from each row's end equals the whole
    forward's (mean_activations), every layer, with a column inside the common prefix too."""
    from refusal_lab.models.shared_prefix import SharedPrefix
    from refusal_lab.steering.vectors import mean_activations

    ids, mask = prefixed_batch(tiny)
    sp = SharedPrefix.split(ids, mask, batch_size=2)
    L = tiny.cfg.n_layers
    pos = [-3, -2, -1]  # the shortest row has 2 own tokens: -3 lies in the prefix
    ref = mean_activations(tiny, ids, mask, [f"blocks.{l}.hook_resid_pre" for l in range(L)], pos, batch_size=2)
    torch.testing.assert_close(sp.mean_resid(tiny, range(L), pos), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        sp.mean_resid(tiny, [0], [0])


@torch.no_grad()
def test_shared_prefix_row_resid_equals_column_activations(tiny):
    """Each row's resid_pre at a column from its end (the geometry step's per-prompt activations)
    equals the whole left-padded forward's, every layer, a column inside the common prefix too."""
    from refusal_lab.models.shared_prefix import SharedPrefix
    from refusal_lab.steering.geometry import column_activations

    ids, mask = prefixed_batch(tiny)
    sp = SharedPrefix.split(ids, mask, batch_size=2)
    L = tiny.cfg.n_layers
    sites = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
    got = sp.row_resid(tiny, range(L), [-3, -1])
    assert got.shape == (ids.shape[0], L, 2, tiny.cfg.d_model) and got.dtype == torch.float64
    for j, q in enumerate((-3, -1)):
        torch.testing.assert_close(got[:, :, j], column_activations(tiny, ids, mask, sites, q, batch_size=2),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sp.row_resid(tiny, [1], [-1])[:, 0, 0], got[:, 1, 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="negative"):
        sp.row_resid(tiny, [0], [0])


def test_shared_prefix_without_a_common_beginning(tiny):
    from refusal_lab.models.shared_prefix import SharedPrefix

    ids, mask = random_batch(tiny, b=3, T=7, seed=9)
    ids[1, -7:] = (ids[0, -7:] + 1) % tiny.cfg.d_vocab  # rows differ from their first real token
    sp = SharedPrefix.split(ids, mask, batch_size=8)
    with torch.no_grad():
        torch.testing.assert_close(sp.last_logits(tiny), tiny(ids, mask, logits="last"), rtol=1e-5, atol=1e-5)


def test_top_k_fallback_relaxes_among_the_top_k(tiny):
    """Nothing passes (kl_max ~ 0): the top_k mode scores kl of its k candidates only, then (the
    layer-only stage) their bypass, and the policy's fallback chooses among them; induce, which no
    stage left can ask, is not scored; the exhaustive mode says whether that agrees."""
    splits = _splits(tiny)
    kw = dict(kl_max=1e-12, max_layer_frac=1.0, top_k=2)
    res = select_direction(tiny, *splits, positions=POS, refusal_ids=REFUSAL, policy=DirectionPolicy(**kw))
    scored = [r for r in res.table if not math.isnan(r["bypass"])]
    assert len(scored) == 2 and all(not math.isnan(r["kl"]) and math.isnan(r["induce"]) for r in scored)
    assert res.stage == "layer_only"
    assert res.fallback and "All 2 candidate directions" in res.fallback
    assert res.bypass == min(r["bypass"] for r in scored)
    ex = select_direction(tiny, *splits, positions=POS, refusal_ids=REFUSAL, policy=DirectionPolicy(**kw, exhaustive=True))
    assert ex.agreement["top_k_agrees"] == ((ex.layer, ex.position) == (res.layer, res.position))
