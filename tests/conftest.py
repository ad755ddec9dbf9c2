"""Shared fixtures: tiny random models of every architecture, and the real offline model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from refusal_lab.models.hooked import HookedChatModel
from tests.tiny_models import SUPPORTED_TINY, tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=SUPPORTED_TINY, scope="session")
def tiny(request) -> HookedChatModel:
    """A HookedChatModel around a tiny random model, one per supported architecture."""
    return HookedChatModel(tiny_model(request.param), name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def real_model():
    """The offline default model (Qwen2.5-Coder-0.5B-Instruct), loaded once per session."""
    from refusal_lab.models.loading import load_model

    return load_model(None, dtype="float32", device="cpu")


def random_batch(model: HookedChatModel, b: int = 3, T: int = 10, pad: int = 2, seed: int = 0):
    """Random token ids with the first row left-padded by ``pad``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.d_vocab, (b, T), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, :pad] = 0
    return ids, mask


def patch_pair(model: HookedChatModel, T: int = 9, seed: int = 1):
    """(source, receiver) Batches of 3 prompts that differ only at column 4 (the "object"), the
    first row left-padded by 2: the standard input of the patching tests."""
    from refusal_lab.patching.engine import Batch

    g = torch.Generator().manual_seed(seed)
    src = Batch(torch.randint(0, model.cfg.d_vocab, (3, T), generator=g), torch.ones(3, T, dtype=torch.long))
    rec = Batch(src.ids.clone(), src.mask.clone())
    rec.ids[:, 4] = torch.randint(0, model.cfg.d_vocab, (3,), generator=g)
    rec.mask[0, :2] = 0
    src.mask[0, :2] = 0
    return src, rec


def log_odds_metric(refusal_ids):
    """A full-vocabulary metric for the patching tests: the refusal log-odds over ``refusal_ids``
    (:func:`refusal_lab.metrics.refusal_log_odds`) from the final-norm output, as the engine takes it."""
    from refusal_lab.metrics import refusal_log_odds
    from refusal_lab.patching.engine import NormedMetric

    class LogOdds(NormedMetric):
        def __call__(self, model, normed, prompt_idx):
            return self.from_logits(model.adapter.final_logits(normed.to(model.adapter.lm_head.weight.device)), prompt_idx)

        def from_logits(self, logits, prompt_idx):
            return refusal_log_odds(logits, refusal_ids).float()

    return LogOdds()


def patch_setup(model: HookedChatModel, T: int = 9):
    """(receiver record, source cache, metric) for :func:`patch_pair` with logit[3] - logit[7]."""
    from refusal_lab.patching.engine import LogitDiff, Receiver

    src, rec = patch_pair(model, T)
    metric = LogitDiff(3, 7)
    _, source = model.run_with_cache(src.ids, src.mask)
    return Receiver.record(model, rec, metric), source, metric


def prefixed_batch(model, n=5, common=4, seed=0):
    """Left-padded rows that begin with the same ``common`` tokens, then 2..5 tokens of their own."""
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.d_vocab
    head = torch.randint(0, V, (common,), generator=g)
    rows = [torch.cat([head, torch.randint(0, V, (2 + i % 4,), generator=g)]) for i in range(n)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(n, T, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return ids, mask
