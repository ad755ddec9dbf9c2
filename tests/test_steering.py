"""Steering: difference-in-means vectors, activation addition, directional ablation (tiny models)."""

import pytest
import torch

from refusal_lab.steering.damage import completion_cross_entropy, edit_kl, next_token_kl
from refusal_lab.steering.evaluation import REFUSAL_SUBSTRINGS, Judge, SubstringJudge, is_refusal
from refusal_lab.steering.interventions import ablation_hooks, addition_hooks, unit
from refusal_lab.steering.vectors import (
    cached_diff_in_means,
    cached_head_vector,
    diff_in_means,
    diff_in_means_all_layers,
    head_vector,
    load_vector,
    save_vector,
)
from tests.conftest import random_batch

RESID_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


def _two_groups(model):
    a_ids, a_mask = random_batch(model, b=5, T=9, pad=3, seed=1)
    b_ids, b_mask = random_batch(model, b=4, T=9, pad=2, seed=2)
    return a_ids, a_mask, b_ids, b_mask


def test_add_alpha_zero_is_bit_identical(tiny):
    ids, mask = random_batch(tiny)
    v = torch.randn(tiny.cfg.d_model, dtype=torch.float64)
    base = tiny(ids, mask)
    for pos in (None, "all", "from:-2", [3, 5]):
        out = tiny(ids, mask, fwd_hooks=addition_hooks(v, 1, 0.0, pos))
        assert torch.equal(out, base), pos
    assert not torch.equal(tiny(ids, mask, fwd_hooks=addition_hooks(v, 1, 3.0)), base)


def test_addition_positions(tiny):
    ids, mask = random_batch(tiny, T=10, pad=0)  # pad columns attend anywhere: compare real tokens
    v = torch.randn(tiny.cfg.d_model) * 5
    base = tiny(ids, mask)
    out = tiny(ids, mask, fwd_hooks=addition_hooks(v, 1, 1.0, "from:-2"))
    assert torch.equal(out[:, :8], base[:, :8]) and not torch.allclose(out[:, 8:], base[:, 8:])
    out = tiny(ids, mask, fwd_hooks=addition_hooks(v, 1, 1.0, "from:6"))
    assert torch.equal(out[:, :6], base[:, :6]) and not torch.allclose(out[:, 6:], base[:, 6:])
    out = tiny(ids, mask, fwd_hooks=addition_hooks(v, 1, 1.0, [4]))
    assert torch.equal(out[:, :4], base[:, :4]) and not torch.allclose(out[:, 4], base[:, 4])
    with pytest.raises(Exception, match="not understood"):
        addition_hooks(v, 1, 1.0, "sometimes")


def test_generated_only_addition_leaves_prompt_unchanged(tiny):
    ids, mask = random_batch(tiny, T=8)
    v = torch.randn(tiny.cfg.d_model)
    v = v / v.norm() * 50
    hooks = addition_hooks(v, 0, 1.0, "generated")
    # a forward over the prompt is untouched
    assert torch.equal(tiny(ids, mask, fwd_hooks=hooks), tiny(ids, mask))
    # in generation: the first token comes from the prompt pass, so it is the baseline's;
    # later tokens are computed at generated columns, where the vector is added
    base = tiny.generate(ids, mask, max_new_tokens=6, stop_at_eos=False)
    seen = []

    def spy(act, hook):
        seen.append(hook.cols.clone())

    steered = tiny.generate(ids, mask, max_new_tokens=6, stop_at_eos=False,
                            fwd_hooks=[*hooks, ("blocks.0.hook_resid_pre", spy)])
    assert torch.equal(steered[:, 0], base[:, 0])
    assert not torch.equal(steered, base)
    assert seen[0].tolist() == list(range(8)) and [int(c) for s in seen[1:] for c in s] == list(range(8, 13))
    # all-columns addition changes the prompt pass too
    assert not torch.equal(tiny(ids, mask, fwd_hooks=addition_hooks(v, 0, 1.0, "all")), tiny(ids, mask))


def test_ablation_removes_direction_from_every_residual_site(tiny):
    ids, mask = random_batch(tiny, b=3, T=10, pad=2)
    names = [f"blocks.{l}.{s}" for l in range(tiny.cfg.n_layers) for s in RESID_SITES]
    _, cache = tiny.run_with_cache(ids, mask, names=names)
    # a direction the model really writes: the mean residual at the middle layer plus noise
    mid = cache[f"blocks.{tiny.cfg.n_layers // 2}.hook_resid_mid"].flatten(0, 1).mean(0)
    d = mid.double() + 0.1 * mid.norm() * torch.randn(tiny.cfg.d_model, dtype=torch.float64)
    r = unit(d)
    base_proj = max(float((cache[n].double() @ r).abs().max()) for n in names)
    assert base_proj > 1e-2
    hooks = ablation_hooks(tiny, d)
    assert len(hooks) == 1 + 2 * tiny.cfg.n_layers
    _, cache = tiny.run_with_cache(ids, mask, names=names, fwd_hooks=hooks)
    for n in names:
        x = cache[n].double()
        proj = (x @ r).abs()
        assert bool((proj <= 1e-4 * x.norm(dim=-1)).all()), (n, float(proj.max()))
    if tiny.cfg.model_type.startswith("gemma"):  # the ablation sits after the (random-gain) post-norms
        assert tiny.cfg.has_post_norms and tiny.adapter.attn_post_norm(0) is not None


def test_diff_in_means_matches_naive_loop(tiny):
    a_ids, a_mask, b_ids, b_mask = _two_groups(tiny)
    L = tiny.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + ["blocks.1.hook_mlp_out"]

    def naive_means(ids, mask):
        """Mean of cached activations, one prompt at a time, per site: {name: [T, d] float64}."""
        caches = [tiny.run_with_cache(ids[i : i + 1], mask[i : i + 1], names=names)[1] for i in range(ids.shape[0])]
        return {n: torch.stack([c[n][0].double() for c in caches]).mean(0) for n in names}

    A, B = naive_means(a_ids, a_mask), naive_means(b_ids, b_mask)
    for layer in range(L):
        for pos in (-1, -3):
            v = diff_in_means(tiny, a_ids, a_mask, b_ids, b_mask, layer, position=pos, batch_size=2)
            name = f"blocks.{layer}.hook_resid_pre"
            assert v.dtype == torch.float64 and v.shape == (tiny.cfg.d_model,)
            torch.testing.assert_close(v, A[name][pos] - B[name][pos], rtol=1e-5, atol=1e-5)
    allv = diff_in_means_all_layers(tiny, a_ids, a_mask, b_ids, b_mask, positions=[-3, -2, -1], batch_size=3)
    assert allv.shape == (L, 3, tiny.cfg.d_model) and allv.dtype == torch.float64
    for layer in range(L):
        name = f"blocks.{layer}.hook_resid_pre"
        for k, pos in enumerate([-3, -2, -1]):
            torch.testing.assert_close(allv[layer, k], A[name][pos] - B[name][pos], rtol=1e-5, atol=1e-5)
    mlp = diff_in_means(tiny, a_ids, a_mask, b_ids, b_mask, 1, position=-1, site="hook_mlp_out")
    name = "blocks.1.hook_mlp_out"
    torch.testing.assert_close(mlp, A[name][-1] - B[name][-1], rtol=1e-5, atol=1e-5)


def test_head_vector_of_all_heads_is_attn_out_difference(tiny):
    a_ids, a_mask, b_ids, b_mask = _two_groups(tiny)
    layer = 1
    if tiny.adapter.o_proj(layer).bias is not None:
        pytest.skip("o_proj has a bias")
    heads = [(layer, h) for h in range(tiny.cfg.n_heads)]
    hv = head_vector(tiny, a_ids, a_mask, b_ids, b_mask, heads, position=-1, batch_size=2)
    ref = diff_in_means(tiny, a_ids, a_mask, b_ids, b_mask, layer, position=-1, site="hook_attn_out")
    torch.testing.assert_close(hv, ref, rtol=1e-4, atol=1e-5)
    # one head alone is a part of it, and heads add up
    h0 = head_vector(tiny, a_ids, a_mask, b_ids, b_mask, heads[:1], position=-1)
    rest = head_vector(tiny, a_ids, a_mask, b_ids, b_mask, heads[1:], position=-1)
    torch.testing.assert_close(h0 + rest, hv, rtol=1e-5, atol=1e-6)


def test_vectors_from_a_clean_runs_cache_equal_new_forwards(tiny):
    """The steering step reads the object-prompt difference vector and the refusal heads' vector
    from the grids' source caches: equal to diff_in_means / head_vector's own forwards (every
    architecture, Gemma's post-attention norm included), at a column from the start and the end."""
    a_ids, a_mask, b_ids, b_mask = _two_groups(tiny)
    L = tiny.cfg.n_layers
    keep = lambda n: n.endswith(("hook_resid_pre", "attn.hook_z"))  # noqa: E731
    ca = tiny.run_with_cache(a_ids, a_mask, names=keep, logits="none")[1]
    cb = tiny.run_with_cache(b_ids, b_mask, names=keep, logits="none")[1]
    heads = [(0, 1), (L - 1, 0), (L - 1, tiny.cfg.n_heads - 1)]
    for pos in (-1, 2):
        for layer in range(L):
            torch.testing.assert_close(cached_diff_in_means(ca, cb, layer, pos),
                                       diff_in_means(tiny, a_ids, a_mask, b_ids, b_mask, layer, position=pos),
                                       rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(cached_head_vector(tiny, ca, cb, heads, pos),
                                   head_vector(tiny, a_ids, a_mask, b_ids, b_mask, heads, position=pos),
                                   rtol=1e-5, atol=1e-6)


def test_save_load_vector_round_trip(tmp_path):
    v = torch.randn(64, dtype=torch.float64)
    meta = {"model": "tiny-qwen2", "layer": 2, "position": -1, "site": "hook_resid_pre",
            "dataset": {"harmful": "train", "n": 32}}
    path = save_vector(tmp_path / "dir" / "v.safetensors", v, meta)
    w, got = load_vector(path)
    assert torch.equal(w, v) and w.dtype == torch.float64
    for k, val in meta.items():
        assert got[k] == val
    assert got["norm"] == pytest.approx(float(v.norm()))


def test_kl_and_cross_entropy(tiny):
    ids, mask = random_batch(tiny)
    assert edit_kl(tiny, ids, mask, []) == pytest.approx(0.0, abs=1e-9)
    d = torch.randn(tiny.cfg.d_model)
    hooks = ablation_hooks(tiny, d) + addition_hooks(d, 1, 5.0)
    kl = edit_kl(tiny, ids, mask, hooks, batch_size=2)
    assert kl > 0
    with torch.no_grad():  # the mean of the one per-prompt KL, batching aside
        per_prompt = next_token_kl(tiny(ids, mask, logits="last"), tiny(ids, mask, fwd_hooks=hooks, logits="last"))
    assert per_prompt.dtype == torch.float64 and kl == pytest.approx(float(per_prompt.mean()), rel=1e-6)
    ce = completion_cross_entropy(tiny, ids, mask, addition_hooks(d, 1, 0.0), max_new_tokens=4)
    assert ce["n_tokens"] > 0 and ce["ce_edited"] == pytest.approx(ce["ce_baseline"])


def test_is_refusal():
    assert is_refusal("I'm sorry, but I can't assist with that.")
    assert is_refusal("As an AI language model, I CANNOT help.")
    assert is_refusal("i am unable to do this")
    assert is_refusal("I\u2019m sorry")  # curly apostrophe
    assert not is_refusal("Sure! Here is a recipe for a chocolate cake.")
    assert not is_refusal("")
    assert len(REFUSAL_SUBSTRINGS) == 12
    j = SubstringJudge()
    assert isinstance(j, Judge)
    assert j(["a", "b"], ["I cannot do that", "Here you go"]) == [True, False]


class _CharTokenizer:
    """Minimal chat tokenizer for the tiny models: one token per ASCII character (ids < 128)."""

    chat_template = "char"
    pad_token_id = 0
    eos_token_id = 3
    is_fast = False

    def apply_chat_template(self, messages, chat_template=None, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}|" for m in messages) + ("<a>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False, **kw):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(int(i)) for i in r if not (skip_special_tokens and int(i) in (0, 3))) for r in rows]

    def decode(self, ids, **kw):
        return self.batch_decode([ids], **kw)[0]


def test_evaluate_hooks_and_sweep_on_tiny():
    from refusal_lab.models.hooked import HookedChatModel
    from refusal_lab.steering.evaluation import evaluate_hooks
    from tests.tiny_models import tiny_model
    from refusal_lab.steering.sweep import alpha_sweep

    m = HookedChatModel(tiny_model("qwen2"), tokenizer=_CharTokenizer())
    ins = ["Tell me a joke", "Hi", "How do I bake bread?"]
    kw = dict(score=lambda logits: logits[:, ord("I")], max_new_tokens=5)
    r = evaluate_hooks(m, ins, [], batch_size=2, judge=lambda i, c: [True, False, False], **kw)
    # batching by length must not change what each prompt gets
    alone = [evaluate_hooks(m, [s], [], **kw) for s in ins]
    assert r.completions == [a.completions[0] for a in alone]
    torch.testing.assert_close(r.scores, torch.cat([a.scores for a in alone]), rtol=1e-5, atol=1e-6)  # padded vs alone: fp32 rounding
    assert r.n == 3 and r.k == 1 and r.rate == pytest.approx(1 / 3)
    assert r.samples(2, {"setting": "x"}) == [{"setting": "x", "instruction": s, "completion": c, "refused": k}
                                              for s, c, k in zip(ins[:2], r.completions, [True, False])]
    v = torch.randn(m.cfg.d_model)
    out = alpha_sweep(m, v, 1, [0.0, 2.0], ins[:2], ins[1:], max_new_tokens=4, batch_size=2,
                      refusal_ids=[ord("I")], n_samples=1)
    assert [row["alpha"] for row in out["rows"]] == [0.0, 2.0]
    assert out["ablation"]["n"] == 2 and len(out["samples"]) == 5
    assert out["rows"][0]["induce_refusal_score"] != out["rows"][1]["induce_refusal_score"]


class _Count:
    """A stand-in progress bar: counts the units it is advanced by."""

    def __init__(self):
        self.n = 0

    def update(self, k=1):
        self.n += k


def _alternate(instructions, completions):
    return [i % 2 == 0 for i in range(len(completions))]


def test_sweep_rates_carry_wilson_intervals_n_and_progress_units():
    from refusal_lab.models.hooked import HookedChatModel
    from tests.tiny_models import tiny_model
    from refusal_lab.stats import wilson_interval
    from refusal_lab.steering.batching import n_batches
    from refusal_lab.steering.evaluation import evaluate_hooks, refusal_log_odds_score
    from refusal_lab.steering.sweep import alpha_sweep, sweep_units

    m = HookedChatModel(tiny_model("qwen2"), tokenizer=_CharTokenizer())
    ins = ["Tell me a joke", "Hi", "How do I bake bread?"]
    bar = _Count()
    score = refusal_log_odds_score(m, [ord("I")])
    r = evaluate_hooks(m, ins, [], judge=_alternate, score=score, max_new_tokens=2, batch_size=2, bar=bar)
    assert (r.k, r.n, r.rate) == (2, 3, pytest.approx(2 / 3))
    assert r.ci95 == list(wilson_interval(2, 3)) and bar.n == n_batches(3, 2) == 2
    r = evaluate_hooks(m, ins, [], score=score, batch_size=2, max_new_tokens=0)  # scores only
    assert r.k is None and r.ci95 is None and r.rate is None and r.samples(3, {}) == []
    assert r.scores.shape == (3,) and r.score == pytest.approx(float(r.scores.mean()))

    bar = _Count()
    out = alpha_sweep(m, torch.randn(m.cfg.d_model), 1, [0.0, 2.0], ins[:2], ins, judge=_alternate,
                      refusal_ids=[ord("I")], max_new_tokens=2, batch_size=2, n_samples=1, bar=bar)
    assert bar.n == sweep_units(2, 2, 3, 2) == 2 * (1 + 2) + 2
    for row in out["rows"]:
        assert (row["induce_n"], row["suppress_n"]) == (2, 3) == (row["n_harmless"], row["n_harmful"])
        assert row["induce_refusal_rate"] == 0.5 and row["induce_refusal_rate_ci95"] == list(wilson_interval(1, 2))
        assert row["suppress_refusal_rate_ci95"] == list(wilson_interval(2, 3))
    ab = out["ablation"]
    assert ab["n"] == 3 and ab["refusal_rate_ci95"] == list(wilson_interval(2, 3))
    assert all(0 <= lo <= ab["refusal_rate"] <= hi <= 1 for lo, hi in [ab["refusal_rate_ci95"]])


def test_object_sweep_standard_errors_and_intervals():
    """Object sweeps: SE of the metric over the objects, the normalised SE = SE / |gap|, Wilson
    interval and n of the refusal fraction; one progress unit per (alpha, side)."""
    from refusal_lab.models.hooked import HookedChatModel
    from tests.tiny_models import tiny_model
    from refusal_lab.stats import mean_se, wilson_interval
    from refusal_lab.steering.interventions import addition_hooks
    from refusal_lab.steering.sweep import object_alpha_sweep

    m = HookedChatModel(tiny_model("llama"), tokenizer=_CharTokenizer())
    batches = {"harmful": random_batch(m, b=3, T=7, seed=5), "harmless": random_batch(m, b=4, T=7, seed=6)}
    objects = {"harmful": ["a", "b", "c"], "harmless": ["d", "e", "f", "g"]}
    metric = lambda logits: logits[:, 5] - logits[:, 9]  # noqa: E731
    v = torch.randn(m.cfg.d_model)
    kw = dict(metric_fn=metric, harmful_mean=1.5, harmless_mean=-0.5, judge=_alternate)
    bar = _Count()
    out = object_alpha_sweep(m, v, 1, [0.0, 4.0], batches, objects, max_new_tokens=2, n_samples=1, bar=bar, **kw)
    assert bar.n == 2 * 2
    assert [(x["side"], x["alpha"], x["object"], x["refused"]) for x in out["samples"]] == [
        ("harmless", 0.0, "d", True), ("harmful", 0.0, "a", True), ("harmless", 4.0, "d", True),
        ("harmful", -4.0, "a", True)]
    for row in out["rows"]:
        for side, sign, n in (("harmless", 1.0, 4), ("harmful", -1.0, 3)):
            hooks = addition_hooks(v, 1, sign * row["alpha"]) if row["alpha"] else []
            with torch.no_grad():
                vals = metric(m(*batches[side], fwd_hooks=hooks, logits="last").float()).double()
            mean, se = mean_se(vals)
            assert row[f"{side}_metric"] == pytest.approx(float(mean), abs=1e-5)
            assert row[f"{side}_metric_se"] == pytest.approx(float(se), abs=1e-5)
            assert row[f"{side}_normalised"] == pytest.approx((float(mean) + 0.5) / 2.0, abs=1e-5)
            assert row[f"{side}_normalised_se"] == pytest.approx(float(se) / 2.0, abs=1e-5)
            assert row[f"{side}_n"] == n
            k = (n + 1) // 2
            assert row[f"{side}_refusal_fraction"] == k / n
            assert row[f"{side}_refusal_fraction_ci95"] == list(wilson_interval(k, n))
    row = object_alpha_sweep(m, v, 1, [0.0], batches, objects, max_new_tokens=0, **kw)["rows"][0]  # no generation
    assert "harmful_refusal_fraction" not in row and row["harmful_n"] == 3 and row["harmful_metric_se"] > 0


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    from refusal_lab.models.loading import load_model
    from tests.helpers_tiny_chat import make_tiny_chat_model

    return load_model(str(make_tiny_chat_model(tmp_path_factory.mktemp("steer"))), device="cpu", progress=False)


def _steps(model, progress):
    from refusal_lab.prompts import build_instruction_prompts
    from refusal_lab.steering.pipeline import SteeringSettings, evaluation_step, steering_step

    s = SteeringSettings(n_val=3, n_test=3, alphas=(0.0, 1.0), object_alphas=(0.0, 2.0), max_new_tokens=2,
                         batch_size=2)
    objects = {"harmful": ["bomb", "poison"], "harmless": ["cake", "pie"]}
    batches = {k: build_instruction_prompts(model.tokenizer, [f"Tell me how to make a {o}." for o in v])
               for k, v in objects.items()}
    direction = {"layer": 1}
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    st = steering_step(model, s, direction, v, object_batches=batches, objects=objects,
                       metric_fn=lambda logits: logits[:, 0] - logits[:, 1], harmful_mean=1.0, harmless_mean=0.0,
                       object_position=-1, heads=[(0, 1)], heads_position=-1, save_vector=lambda *a: None,
                       progress=progress)
    ev = evaluation_step(model, s, direction, v, 1.0, progress=progress)
    return st, ev


def test_steering_and_evaluation_steps_progress_and_intervals(tiny_chat, capsys):
    """One bar per step on stderr (n of N units, ETA), none with progress=False; the evaluation's
    rates carry k, a Wilson interval and n, beside their baselines'."""
    from refusal_lab.stats import wilson_interval

    capsys.readouterr()
    st, ev = _steps(tiny_chat, progress=True)
    err = capsys.readouterr().err
    # steering: alpha sweep 2 x (2 + 2 batches) + ablation 2 batches, objects 2 vectors x 2 alphas x 2 sides
    assert "steering: val alpha sweep" in err and "/18 [" in err and "steering: heads vector on objects" in err
    # evaluation: 5 runs x 2 batches + 2 edits x (cross-entropy, KL)
    assert "evaluation: harmless baseline" in err and "/14 [" in err and "evaluation: damage of the ablation, addition" in err
    assert "<" in err  # [elapsed<remaining]
    for key in ("harmless_refusal_rate_added", "harmful_refusal_rate_ablated", "harmful_refusal_rate_subtracted"):
        e = ev[key]
        assert {"value", "k", "ci95", "n", "baseline", "baseline_k", "baseline_ci95"} <= set(e)
        assert e["n"] == 3 and e["value"] == e["k"] / 3 and e["baseline"] == e["baseline_k"] / 3
        assert e["ci95"] == list(wilson_interval(e["k"], 3))
        assert e["baseline_ci95"] == list(wilson_interval(e["baseline_k"], 3))
    assert set(st["objects"]) == {"difference", "heads"}
    assert "harmful_normalised_se" in st["objects"]["heads"]["rows"][1]
    assert "induce_refusal_rate_ci95" in st["instructions"]["rows"][0]

    st2, ev2 = _steps(tiny_chat, progress=False)
    assert capsys.readouterr().err == ""
    assert ev2["harmful_refusal_rate_ablated"] == ev["harmful_refusal_rate_ablated"]  # the bar changes nothing
