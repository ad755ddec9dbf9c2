"""Tests for refusal_lab.metrics against hand computations, with a tiny in-memory tokenizer."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from refusal_lab.errors import PromptError, RefusalLabError
from refusal_lab.metrics import (
    NORMALIZED_METRIC_NOTE,
    RefusalTokens,
    default_refusal_token_ids,
    logit_diff,
    normalise,
    propose_token_pair,
    refusal_log_odds,
    resolve_refusal_tokens,
    resolve_single_token,
)


def _make_tokenizer():
    """Byte-level BPE trained in memory: 'Sorry', 'Sure', 'I', 'As' are single tokens, "I'm" is not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Sorry", "Sure", "I", "As", "Certainly", " bomb", " bomb", "Here"] * 30
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer()


def _id(tok, s):
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    return ids[0]


# ------------------------------------------------------------------------------- token lookup


def test_resolve_single_token(tok):
    assert tok.decode([resolve_single_token(tok, "Sorry")]) == "Sorry"
    assert tok.decode([resolve_single_token(tok, "Sure")]) == "Sure"
    assert tok.decode([resolve_single_token(tok, " bomb")]) == " bomb"


def test_resolve_single_token_multi_token_error_lists_pieces(tok):
    with pytest.raises(PromptError) as ei:
        resolve_single_token(tok, "I'm")
    assert str(ei.value).startswith(""""I'm" is 3 tokens ('I', "'", 'm') under this tokenizer""")
    assert "single-token string such as 'I'" in str(ei.value)
    # 'bomb' without its leading space is several pieces; the error suggests ' bomb'
    with pytest.raises(PromptError, match=r"such as ' bomb'"):
        resolve_single_token(tok, "bomb")
    with pytest.raises(PromptError):
        resolve_single_token(tok, "")


def test_resolve_refusal_tokens(tok):
    rt = resolve_refusal_tokens(tok)
    assert rt == RefusalTokens(_id(tok, "Sorry"), _id(tok, "Sure"), "Sorry", "Sure")
    with pytest.raises(PromptError, match="same token"):
        resolve_refusal_tokens(tok, "Sure", "Sure")


def test_default_refusal_token_ids_keeps_single_tokens(tok):
    ids = default_refusal_token_ids(tok)
    assert ids == sorted({_id(tok, "I"), _id(tok, "Sorry"), _id(tok, "As")})  # "Unfortunately", "I'm": not single
    with pytest.raises(PromptError):
        default_refusal_token_ids(tok, ["I'm", "Unfortunately"])


# ------------------------------------------------------------------------------------ metrics


def test_logit_diff_shapes_and_values():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 50, generator=g)
    rt = RefusalTokens(3, 11, "Sorry", "Sure")
    expected = logits[:, -1, 3] - logits[:, -1, 11]
    assert torch.allclose(logit_diff(logits, rt), expected)
    assert torch.allclose(logit_diff(logits[:, -1], (3, 11)), expected)
    bf = logit_diff(logits.to(torch.bfloat16), rt)
    assert bf.dtype == torch.float32 and bf.shape == (4,)
    with pytest.raises(PromptError, match="shape"):
        logit_diff(torch.zeros(50), rt)


def _naive_log_odds(logits: torch.Tensor, ids) -> torch.Tensor:
    p = torch.softmax(logits.double(), -1)[:, ids].sum(-1)
    return torch.log(p) - torch.log(1 - p)


def test_refusal_log_odds_matches_naive_formula():
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(5, 4, 100, generator=g)
    ids = [7, 3, 3, 42]  # duplicates count once
    got = refusal_log_odds(logits, ids)
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert torch.allclose(got, _naive_log_odds(logits[:, -1], [3, 7, 42]), atol=1e-10)
    # float32 and bfloat16 inputs are upcast
    assert torch.allclose(refusal_log_odds(logits.float(), ids), got)


def test_refusal_log_odds_stable_near_certainty():
    # P(R) = 1 - 2e-100: the naive formula gives +inf, the exact value is 100 - log 2.
    logits = torch.tensor([[100.0, 0.0, 0.0], [-100.0, 0.0, 0.0]])
    assert torch.isinf(_naive_log_odds(logits, [0])[0])
    got = refusal_log_odds(logits, [0])
    assert math.isclose(got[0].item(), 100 - math.log(2), rel_tol=1e-12)
    assert math.isclose(got[1].item(), -100 - math.log(2), rel_tol=1e-12)


def test_refusal_log_odds_errors():
    x = torch.zeros(2, 5)
    with pytest.raises(PromptError, match="empty"):
        refusal_log_odds(x, [])
    with pytest.raises(PromptError, match=r"\[0, 5\)"):
        refusal_log_odds(x, [5])
    with pytest.raises(PromptError, match="whole vocabulary"):
        refusal_log_odds(x, range(5))


def test_normalise_endpoints_and_types():
    """0 = harmless baseline, 1 = harmful baseline, in float64, for anything torch.as_tensor takes."""
    out = normalise([2.0, 6.0, 3.0], 2.0, 6.0)
    assert out.dtype == torch.float64 and out.tolist() == [0.0, 1.0, 0.25]
    assert normalise(3.0, 2.0, 6.0).item() == 0.25 and normalise(3.0, 2.0, 6.0).shape == ()
    grid = torch.tensor([[1, 3], [2, 5]], dtype=torch.int64)  # per-pair grids of any dtype and shape
    assert torch.equal(normalise(grid, 1, 3), torch.tensor([[0.0, 1.0], [0.5, 2.0]], dtype=torch.float64))
    assert normalise(np.float32(3), 2, 6).item() == 0.25
    # float32 values are widened before subtracting: the float64 formula exactly
    v = torch.tensor([0.1, 0.7], dtype=torch.float32)
    assert torch.equal(normalise(v, 0.3, 0.9), (v.double() - 0.3) / (0.9 - 0.3))
    # necessity direction: the same formula, 1 = unchanged from the harmful baseline
    assert normalise([6.0], 2.0, 6.0).item() == 1.0
    assert set(NORMALIZED_METRIC_NOTE) == {"sufficiency", "necessity"}


def test_normalise_with_equal_baselines_gives_inf_or_nan():
    out = normalise([1.0, 2.0], 2.0, 2.0)
    assert torch.isinf(out[0]) and torch.isnan(out[1])


# ------------------------------------------------------------------------------ auto token pair


def test_propose_token_pair(tok):
    V = len(tok)
    sorry, sure, i_, here = (_id(tok, s) for s in ("Sorry", "Sure", "I", "Here"))
    harmful = torch.zeros(3, 2, V)
    harmless = torch.zeros(3, 2, V)
    # 'I' is likely on both sides (top-1 everywhere) but does not separate them
    harmful[:, -1, i_] = 9.0
    harmless[:, -1, i_] = 9.0
    harmful[:, -1, sorry] = 8.0
    harmless[:, -1, sorry] = 1.0
    harmless[:, -1, sure] = 8.0
    harmful[:, -1, sure] = 2.0
    harmless[:, -1, here] = 7.5
    harmful[:, -1, here] = 6.0
    harmful[:, 0, :] = torch.randn(3, V)  # earlier positions are ignored
    pair, table = propose_token_pair(tok, harmful, harmless, k=3)
    assert pair == RefusalTokens(sorry, sure, "Sorry", "Sure")
    assert len(table) == 6
    chosen = [r for r in table if r["chosen"]]
    assert [(r["side"], r["token"]) for r in chosen] == [("harmful", "Sorry"), ("harmless", "Sure")]
    row = next(r for r in table if r["side"] == "harmful" and r["token"] == "Sorry")
    h = torch.log_softmax(harmful[0, -1].double(), -1)[sorry].item()
    s = torch.log_softmax(harmless[0, -1].double(), -1)[sorry].item()
    assert math.isclose(row["harmful_logprob"], h) and math.isclose(row["diff"], h - s)
    assert set(row) == {"side", "token_id", "token", "harmful_logprob", "harmless_logprob", "diff", "chosen"}


def test_propose_token_pair_identical_sets_is_an_error(tok):
    x = torch.zeros(2, len(tok))
    x[:, 5] = 3.0
    with pytest.raises(PromptError, match="explicitly"):
        propose_token_pair(tok, x, x, k=1)


def test_propose_token_pair_keeps_a_fixed_side(tok):
    """``--refusal Sorry --compliance auto``: the fixed token is kept, only the other side is proposed."""
    V = len(tok)
    sorry, sure, i_, here = (_id(tok, s) for s in ("Sorry", "Sure", "I", "Here"))
    harmful = torch.zeros(3, V)
    harmless = torch.zeros(3, V)
    harmful[:, i_] = 9.0  # the unconstrained refusal proposal would be 'I'
    harmless[:, i_] = 2.0
    harmless[:, sure] = 8.0
    harmless[:, here] = 7.0
    harmful[:, here] = 3.0
    harmful[:, sure] = 1.0
    harmless[:, sorry] = 9.5  # would win the harmless side, but it is the fixed refusal token
    pair, table = propose_token_pair(tok, harmful, harmless, k=3, refusal=(sorry, "Sorry"))
    assert pair == RefusalTokens(sorry, sure, "Sorry", "Sure")
    assert {r["side"] for r in table} == {"harmless"} and sorry not in [r["token_id"] for r in table]
    assert [r["token"] for r in table if r["chosen"]] == ["Sure"]
    pair, table = propose_token_pair(tok, harmful, harmless, k=3, compliance=(sure, "Sure"))
    assert pair.compliance_id == sure and pair.compliance_str == "Sure" and pair.refusal_id == i_
    assert {r["side"] for r in table} == {"harmful"}
    with pytest.raises(RefusalLabError):
        propose_token_pair(tok, harmful, harmless, refusal=(sorry, "Sorry"), compliance=(sure, "Sure"))
