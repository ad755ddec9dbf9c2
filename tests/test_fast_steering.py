"""The fast generate-and-judge paths against independent computations, on tiny random models.

* :func:`greedy_decode` with finished rows dropped from a left-padded batch = a per-row, unpadded,
  cache-free greedy loop (one whole forward per token, no early exit), token for token;
* a prefill split at a layer and continued from it = one whole prefill, bit for bit (logits, keys/values);
* :func:`evaluate_settings` (scores from the generation's prefill, shared lower blocks, rows
  leaving the batch, the substring judge's early stop) = the plain loop (a scoring forward, then
  ``model.generate`` with every row kept), per setting; with the batch's common beginning run once
  per setting, to 1e-5 (scores) and token for token;
* :func:`edit_damage` = :func:`edit_kl` and :func:`completion_cross_entropy` per edit (1e-5).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from refusal_lab.models.hooked import HookedChatModel
from refusal_lab.steering.damage import completion_cross_entropy, edit_damage, edit_kl
from refusal_lab.steering.evaluation import SubstringJudge, evaluate_settings, lowest_layer, refusal_log_odds_score
from refusal_lab.steering.interventions import ablation_hooks, addition_hooks
from tests.tiny_models import tiny_model

ARCHS = ("qwen2", "gemma2", "mistral", "gemma3_text")


@pytest.fixture(params=ARCHS, scope="module")
def model(request) -> HookedChatModel:
    return HookedChatModel(tiny_model(request.param, seed=3), name=f"tiny-{request.param}")


@contextlib.contextmanager
def eos_as(model, eos):
    gc = model.hf_model.generation_config
    old = gc.eos_token_id
    gc.eos_token_id = eos
    try:
        yield
    finally:
        gc.eos_token_id = old


def padded_batch(model, pads=(0, 3, 1, 5, 2), T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.d_vocab, (len(pads), T), generator=g)
    mask = torch.ones_like(ids)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
        ids[r, :p] = 0
    return ids, mask


def naive_greedy(model, ids, mask, n, eos, hooks=()):
    """Per row: the unpadded prompt, one whole forward per new token, stop after an eos id."""
    rows = []
    for r in range(ids.shape[0]):
        seq = ids[r][mask[r].bool()]
        out = []
        for _ in range(n):
            tok = int(model(seq[None], fwd_hooks=list(hooks), logits="last")[0].argmax())
            out.append(tok)
            if tok in eos:
                break
            seq = torch.cat([seq, torch.tensor([tok])])
        rows.append(out)
    return rows


def pick_eos(model, ids, mask, n, hooks=()):
    """A token that ends some rows early but not all (so rows really leave the batch)."""
    free = model.generate(ids, mask, max_new_tokens=n, stop_at_eos=False, fwd_hooks=list(hooks))
    for t in range(1, n):
        for r in range(free.shape[0]):
            tok = int(free[r, t])
            if not bool((free == tok).any(1).all()):
                return tok
    return int(free[0, 1])


def test_decode_dropping_finished_rows_equals_naive_per_row_loop(model):
    from refusal_lab.models.generate import greedy_decode

    n = 8
    ids, mask = padded_batch(model)
    hooks = addition_hooks(torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1)), 1, 2.0)
    eos = pick_eos(model, ids, mask, n, hooks)
    with eos_as(model, eos):
        ref = naive_greedy(model, ids, mask, n, [eos], hooks)
        fast = greedy_decode(model, ids, mask, max_new_tokens=n, fwd_hooks=hooks, drop_finished=True, logprobs=True)
        kept = model.generate(ids, mask, max_new_tokens=n, fwd_hooks=hooks)
    assert any(len(r) < n for r in ref) and any(len(r) > 1 for r in ref)  # some rows left early
    width = max(len(r) for r in ref)
    expect = torch.tensor([r + [eos] * (width - len(r)) for r in ref])
    assert torch.equal(fast.tokens, expect), (fast.tokens, expect)  # exact tokens
    assert torch.equal(kept, expect)
    # the prompt logits are the scoring forward's, bit for bit; log-probs are those of the chosen tokens
    assert torch.equal(fast.prompt_logits, model(ids, mask, fwd_hooks=hooks, logits="last"))
    assert fast.logprobs.shape == expect.shape and bool((fast.logprobs <= 0).all())
    lp0 = torch.log_softmax(fast.prompt_logits.double(), -1).gather(-1, expect[:, :1])[:, 0]
    torch.testing.assert_close(fast.logprobs[:, 0], lp0, rtol=0, atol=0)


def test_stop_ends_chosen_rows(model):
    from refusal_lab.models.generate import greedy_decode

    ids, mask = padded_batch(model)
    eos = pick_eos(model, ids, mask, 6)
    with eos_as(model, eos):
        full = greedy_decode(model, ids, mask, max_new_tokens=6, stop_at_eos=False).tokens
        # rows 1 and 3 may stop after their second token; the others run as before
        cut = greedy_decode(model, ids, mask, max_new_tokens=6, stop_at_eos=False, drop_finished=True,
                            stop=lambda rows, toks: torch.tensor([int(r) in (1, 3) and toks.shape[1] >= 2 for r in rows]))
    for r in range(ids.shape[0]):
        if r in (1, 3):
            assert torch.equal(cut.tokens[r, :2], full[r, :2]) and bool((cut.tokens[r, 2:] == eos).all())
        else:
            assert torch.equal(cut.tokens[r], full[r])


@pytest.mark.parametrize("split", [1, 2])
def test_split_prefill_equals_one_prefill(model, split):
    ids, mask = padded_batch(model)
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    hooks = addition_hooks(v, split, 1.5)  # an edit at the split layer
    whole = model.prefill(ids, mask, fwd_hooks=hooks, record_kv=True, logits="last")
    low = model.prefill(ids, mask, record_kv=True, stop_layer=split, logits="none")
    up = model.prefill(ids, mask, fwd_hooks=hooks, record_kv=True, start_layer=split, resid=low.resid, logits="last")
    assert torch.equal(up.logits, whole.logits)
    kv = {**low.kv, **up.kv}
    assert sorted(kv) == sorted(whole.kv)
    for l in kv:
        assert torch.equal(kv[l][0], whole.kv[l][0]) and torch.equal(kv[l][1], whole.kv[l][1])
    with pytest.raises(ValueError):
        model.prefill(ids, mask, stop_layer=split, logits="last")
    with pytest.raises(ValueError):
        model.prefill(ids, mask, start_layer=split, logits="last")


def test_lowest_layer(model):
    v = torch.ones(model.cfg.d_model)
    assert lowest_layer(model, []) == model.cfg.n_layers
    assert lowest_layer(model, addition_hooks(v, 2, 1.0) + addition_hooks(v, 1, 1.0)) == 1
    assert lowest_layer(model, ablation_hooks(model, v)) == 0


# ------------------------------------------------------------------------ with a chat tokenizer

@pytest.fixture(params=("qwen2", "gemma2"), scope="module")
def chat(request, tmp_path_factory):
    from refusal_lab.models.loading import load_model
    from tests.helpers_tiny_chat import make_tiny_chat_model

    folder = make_tiny_chat_model(tmp_path_factory.mktemp("fast"), request.param, seed=1)
    return load_model(str(folder), device="cpu", progress=False)


INSTRUCTIONS = ["Tell me how to make a cake.", "Hi", "Tell me how to make a bomb, please.", "How do I bake bread?",
                "Write a poem about the sea and the sky.", "Sorry", "Tell me a joke", "What is 2 + 2?"]


def plain_loop(model, prompts, hooks, judge, max_new_tokens, batch_size):
    """The generate-and-judge loop before it was made fast: a scoring forward, then ``generate``."""
    from refusal_lab.steering.batching import length_batches

    score = refusal_log_odds_score(model)
    scores = torch.zeros(len(prompts), dtype=torch.float64)
    completions = [None] * len(prompts)
    for idx, ids, mask in length_batches(model, prompts, batch_size):
        scores[idx] = score(model(ids, mask, fwd_hooks=hooks, logits="last")).reshape(-1).to(torch.float64)
        new = model.generate(ids, mask, max_new_tokens=max_new_tokens, fwd_hooks=hooks)
        for i, text in zip(idx, model.tokenizer.batch_decode(new, skip_special_tokens=True)):
            completions[i] = text
    return scores, completions, judge(prompts, completions)


def settings_of(model):
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(4))
    return {"none": [], "add1": addition_hooks(v, 1, 1.0), "add2": addition_hooks(v, 2, -3.0),
            "ablate": ablation_hooks(model, v), "ln": addition_hooks(v, 1, 2.0, "generated")}


def common_substring(completions) -> str:
    """A two-character piece that occurs in many of the completions (so the early stop fires)."""
    from collections import Counter

    c = Counter(t[k:k + 2] for t in completions for k in range(len(t) - 1) if t[k:k + 2].strip())
    return c.most_common(1)[0][0]


@pytest.mark.parametrize("stack,stack_rows", [(True, 1), (True, 160), (False, 160)])
def test_evaluate_settings_equals_the_plain_loop(chat, stack, stack_rows, monkeypatch):
    """Every setting's scores, completions and verdicts are the plain loop's, whether each length
    batch decodes its settings alone (no stacking), stacked per batch (STACK_ROWS = 1) or stacked
    across every batch (the batches' keys and values left-padded to the longest prompt)."""
    import refusal_lab.steering.evaluation as evaluation

    monkeypatch.setattr(evaluation, "STACK_DECODING", stack)
    monkeypatch.setattr(evaluation, "STACK_ROWS", stack_rows)
    monkeypatch.setattr(evaluation, "SHARE_PREFIX", False)  # bit for bit; the shared beginning is tested below
    settings = settings_of(chat)
    n = 6
    ref = {k: plain_loop(chat, INSTRUCTIONS, h, SubstringJudge(), n, 3) for k, h in settings.items()}
    rows = []
    real = evaluation.greedy_decode
    monkeypatch.setattr(evaluation, "greedy_decode", lambda model, ids, mask, **kw: rows.append(ids.shape[0]) or
                        real(model, ids, mask, **kw))
    fast = evaluate_settings(chat, INSTRUCTIONS, settings, max_new_tokens=n, batch_size=3)
    n_stacked = sum(1 for h in settings.values() if evaluation._rows_alike(h))
    if stack:  # one decode of every stacked row, or one per batch
        assert (max(rows) == n_stacked * len(INSTRUCTIONS)) == (stack_rows > n_stacked * len(INSTRUCTIONS) / 2)
    for k, (scores, completions, refused) in ref.items():
        assert torch.equal(fast[k].scores, scores), k  # bit for bit
        assert fast[k].completions == completions, k
        assert fast[k].refused == refused and fast[k].full_texts is None, k
    # a setting alone gives what it gives among others
    alone = evaluate_settings(chat, INSTRUCTIONS, {"add2": settings["add2"]}, max_new_tokens=n, batch_size=3)["add2"]
    assert torch.equal(alone.scores, fast["add2"].scores) and alone.completions == fast["add2"].completions


@pytest.mark.parametrize("stack,stack_rows", [(True, 1), (True, 160), (False, 160)])
def test_settled_verdicts_stop_early_but_verdicts_and_shown_texts_stay(chat, stack, stack_rows, monkeypatch):
    import refusal_lab.steering.evaluation as evaluation

    monkeypatch.setattr(evaluation, "STACK_DECODING", stack)
    monkeypatch.setattr(evaluation, "STACK_ROWS", stack_rows)
    monkeypatch.setattr(evaluation, "SHARE_PREFIX", False)
    settings = settings_of(chat)
    n = 8
    probe = plain_loop(chat, INSTRUCTIONS, [], SubstringJudge(), n, 4)[1]
    judge = SubstringJudge([common_substring(probe)])
    assert chat.tokenizer.clean_up_tokenization_spaces is False
    ref = {k: plain_loop(chat, INSTRUCTIONS, h, judge, n, 4) for k, h in settings.items()}
    shown = {k: 2 for k in settings} | {"ablate": 0}
    fast = evaluate_settings(chat, INSTRUCTIONS, settings, judge=judge, max_new_tokens=n, batch_size=4,
                             full_texts=shown)
    cut = 0
    for k, (scores, completions, refused) in ref.items():
        ev = fast[k]
        assert torch.equal(ev.scores, scores), k
        assert ev.refused == refused, k  # verdicts, hence k and rates, unchanged
        assert ev.completions[: shown[k]] == completions[: shown[k]], k  # the shown texts are whole
        assert ev.samples(shown[k], {}) == [{"instruction": p, "completion": c, "refused": r} for p, c, r in
                                            list(zip(INSTRUCTIONS, completions, refused))[: shown[k]]]
        for mine, whole, r in zip(ev.completions, completions, refused):
            assert whole.startswith(mine) and (mine == whole or r), k  # only refusals are cut, at a prefix
            cut += mine != whole
        assert ev.full_texts == shown[k]
        with pytest.raises(ValueError):
            ev.samples(shown[k] + 1, {})
    assert cut > 0  # the early stop did fire
    # another judge never stops early
    other = evaluate_settings(chat, INSTRUCTIONS, {"none": []}, judge=lambda i, c: judge(i, c), max_new_tokens=n,
                              batch_size=4, full_texts=0)["none"]
    assert other.completions == ref["none"][1] and other.full_texts is None


@pytest.mark.parametrize("stack", [True, False])
def test_shared_beginning_equals_the_plain_loop_to_rounding(chat, stack, monkeypatch):
    """The prompts' common beginning run once per setting (column-free edits only) = the plain loop:
    scores to 1e-5 (float32, other batch shapes), the same completions and verdicts."""
    import refusal_lab.steering.evaluation as evaluation
    from refusal_lab.steering.batching import length_batches

    monkeypatch.setattr(evaluation, "STACK_DECODING", stack)
    settings = {k: v for k, v in settings_of(chat).items() if k != "ln"}  # "generated" counts columns: not shared
    n = 6
    calls = []
    real = evaluation.greedy_decode

    def spy(model, ids, mask, **kw):
        calls.append(mask.clone())
        return real(model, ids, mask, **kw)

    monkeypatch.setattr(evaluation, "greedy_decode", spy)
    fast = evaluate_settings(chat, INSTRUCTIONS, settings, max_new_tokens=n, batch_size=3)
    window = any((w := chat.adapter.sliding_window(l)) is not None and w < 64 for l in range(chat.cfg.n_layers))
    # the beginning did move before the padding (a batch whose mask is not left-padded any more)
    moved = any(not bool((m.cummax(1).values == m).all()) for m in calls)
    assert moved == (not window), (moved, window)
    for k, hooks in settings.items():
        scores, completions, refused = plain_loop(chat, INSTRUCTIONS, hooks, SubstringJudge(), n, 3)
        torch.testing.assert_close(fast[k].scores, scores, rtol=0, atol=1e-5, msg=k)
        assert fast[k].completions == completions, k
        assert fast[k].refused == refused, k
    # a setting that counts columns turns the sharing off for its batches: then bit for bit as before
    mixed = settings | {"ln": settings_of(chat)["ln"]}
    on = evaluate_settings(chat, INSTRUCTIONS, mixed, max_new_tokens=n, batch_size=3)
    monkeypatch.setattr(evaluation, "SHARE_PREFIX", False)
    off = evaluate_settings(chat, INSTRUCTIONS, mixed, max_new_tokens=n, batch_size=3)
    for k in mixed:
        assert torch.equal(on[k].scores, off[k].scores) and on[k].completions == off[k].completions, k
    assert len(list(length_batches(chat, INSTRUCTIONS, 3))) > 1


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("column", [-1, -3])
def test_recorded_residuals_equal_whole_forwards_and_change_nothing(chat, share, column, monkeypatch):
    """``record=(key, layers, column)``: the unedited setting's prompt prefill keeps every prompt's
    ``blocks.{l}.hook_resid_pre`` at ``column`` — below the shared split from the shared lower
    prefill, above it from its own — equal to a whole forward's cache (to 1e-5 with the common
    beginning run once, float32 batch shapes; bit for bit without), in prompt order; scores and
    completions of every setting are those of the same call without recording."""
    import refusal_lab.steering.evaluation as evaluation
    from refusal_lab.prompts import build_instruction_prompts

    monkeypatch.setattr(evaluation, "SHARE_PREFIX", share)
    v = torch.randn(chat.cfg.d_model, generator=torch.Generator().manual_seed(4))
    settings = {"none": [], "add2": addition_hooks(v, 2, -3.0), "add1": addition_hooks(v, 1, 1.0)}  # split at 1
    L = chat.cfg.n_layers
    rec = evaluate_settings(chat, INSTRUCTIONS, settings, max_new_tokens=4, batch_size=3,
                            record=("none", range(L), column))
    plain = evaluate_settings(chat, INSTRUCTIONS, settings, max_new_tokens=4, batch_size=3)
    for k in settings:
        assert torch.equal(rec[k].scores, plain[k].scores) and rec[k].completions == plain[k].completions, k
        assert (rec[k].resid is None) == (k != "none") and plain[k].resid is None
    ids, mask = build_instruction_prompts(chat.tokenizer, INSTRUCTIONS)
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
    cache = chat.prefill(ids, mask, names=names, logits="last").cache
    want = torch.stack([cache[n][:, column] for n in names], 1).to(torch.float64)
    assert rec["none"].resid.shape == (len(INSTRUCTIONS), L, chat.cfg.d_model)
    torch.testing.assert_close(rec["none"].resid, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="record"):
        evaluate_settings(chat, INSTRUCTIONS, settings, max_new_tokens=0, record=("none", range(L), 2))


def test_edit_damage_equals_edit_kl_and_cross_entropy(model):
    ids, mask = padded_batch(model, pads=(0, 3, 1, 5, 2, 0, 4))
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    edits = {"ablation": ablation_hooks(model, v), "addition": addition_hooks(v, 1, 2.0, "all")}
    n = 7
    eos = pick_eos(model, ids, mask, n)
    with eos_as(model, eos):
        fast = edit_damage(model, ids, mask, edits, max_new_tokens=n, batch_size=3)
        for name, hooks in edits.items():
            ce = completion_cross_entropy(model, ids, mask, hooks, max_new_tokens=n, batch_size=3)
            kl = edit_kl(model, ids, mask, hooks, batch_size=3)
            # the same prompts, other batches (the MLP's product over the real columns of each): to rounding
            assert fast[name]["kl"] == pytest.approx(kl, rel=1e-6, abs=1e-9)
            assert fast[name]["n_tokens"] == ce["n_tokens"] < ids.shape[0] * n  # some rows ended early
            for key in ("ce_baseline", "ce_edited"):
                assert fast[name][key] == pytest.approx(ce[key], rel=1e-5, abs=1e-7), (name, key)


def test_edit_damage_shares_the_common_beginning(chat):
    """Chat prompts share the template's beginning: edit_damage runs it once per setting (the
    prompts laid out beginning first), and its KL and cross-entropies still equal the whole-prompt
    edit_kl and completion_cross_entropy to rounding."""
    from refusal_lab.prompts import build_instruction_prompts
    from refusal_lab.steering.evaluation import _shared_start

    ids, mask = build_instruction_prompts(chat.tokenizer, INSTRUCTIONS)
    v = torch.randn(chat.cfg.d_model, generator=torch.Generator().manual_seed(2))
    edits = {"ablation": ablation_hooks(chat, v), "addition": addition_hooks(v, 1, 2.0, "all")}
    horizon = ids.shape[1] + 5
    windows = [chat.adapter.sliding_window(l) for l in range(chat.cfg.n_layers)]
    if all(w is None or w >= horizon for w in windows):  # (a short sliding window forbids the layout)
        assert _shared_start(chat, ids[:4], mask[:4], [[], *edits.values()], horizon) > 0  # it is used
    fast = edit_damage(chat, ids, mask, edits, max_new_tokens=5, batch_size=4)
    for name, hooks in edits.items():
        ce = completion_cross_entropy(chat, ids, mask, hooks, max_new_tokens=5, batch_size=4)
        assert fast[name]["kl"] == pytest.approx(edit_kl(chat, ids, mask, hooks, batch_size=4), rel=1e-4, abs=1e-6)
        assert fast[name]["n_tokens"] == ce["n_tokens"]
        for key in ("ce_baseline", "ce_edited"):
            assert fast[name][key] == pytest.approx(ce[key], rel=1e-5, abs=1e-6), (name, key)


def test_evaluate_many_equals_each_job_alone(chat, monkeypatch):
    """Jobs whose rows decode together (evaluate_many: a sweep's two sides, the evaluation's two
    splits) give each job's own evaluate_settings result: scores bit for bit (the same prefills),
    completions and verdicts equal; their row-alike settings did share decodes."""
    import refusal_lab.steering.evaluation as evaluation
    from refusal_lab.steering.evaluation import evaluate_many

    settings = settings_of(chat)
    first = {k: settings[k] for k in list(settings)[:3]}
    second = {k: settings[k] for k in list(settings)[1:]}
    jobs = [dict(prompts=INSTRUCTIONS[:5], settings=first, batch_size=2, full_texts=1),
            dict(prompts=INSTRUCTIONS[3:], settings=second, batch_size=3, full_texts={k: 2 for k in second})]
    alone = [evaluate_settings(chat, j["prompts"], j["settings"], max_new_tokens=6, batch_size=j["batch_size"],
                               full_texts=j["full_texts"]) for j in jobs]
    rows = []
    real = evaluation.greedy_decode
    monkeypatch.setattr(evaluation, "greedy_decode", lambda model, ids, mask, **kw: rows.append(ids.shape[0]) or
                        real(model, ids, mask, **kw))
    together = evaluate_many(chat, jobs, max_new_tokens=6)
    stacked = [sum(evaluation._rows_alike(h) for h in j["settings"].values()) * len(j["prompts"]) for j in jobs]
    assert max(rows) == sum(stacked)  # one decode held both jobs' row-alike rows
    for got, want in zip(together, alone):
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k].scores, want[k].scores), k
            assert got[k].completions == want[k].completions and got[k].refused == want[k].refused, k
            assert got[k].full_texts == want[k].full_texts, k
