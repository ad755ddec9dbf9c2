"""The run refuses early, with one clear sentence, when its memory estimate exceeds what is free."""

import pytest

from refusal_lab import memory
from refusal_lab.errors import RefusalLabError
from refusal_lab.run.config import RunConfig
from refusal_lab.run.pipeline import Pipeline
from tests.helpers_tiny_chat import make_tiny_chat_model


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from refusal_lab.models.loading import load_model

    return load_model(str(make_tiny_chat_model(tmp_path_factory.mktemp("m"))), dtype="float32", device="cpu")


def test_estimate_grows_with_inputs(chat_model):
    base = memory.estimate_run_memory(chat_model, 7, 20, 64)
    assert base > memory.weight_bytes(chat_model)
    assert memory.estimate_run_memory(chat_model, 14, 20, 64) > base
    assert memory.estimate_run_memory(chat_model, 7, 40, 64) > base
    assert memory.estimate_run_memory(chat_model, 7, 20, 128) > base


def test_too_little_memory_is_a_clear_error(chat_model, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 1024)
    with pytest.raises(RefusalLabError, match=r"needs about .* GiB .* only 0\.0 GiB are free.*--dtype bfloat16"):
        Pipeline(chat_model, RunConfig(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "run_config.json").exists()


def test_real_free_memory_passes(chat_model, tmp_path):
    assert memory.available_memory("cpu") > 0
    Pipeline(chat_model, RunConfig(), tmp_path / "run", progress=False)
