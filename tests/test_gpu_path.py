"""The GPU/scale path, tested on the CPU where it can be:

* batch sizes from free memory: pure arithmetic on given free-memory numbers (the devices' free
  memory is mocked, not the model);
* loading goes straight to the target dtype/device (no whole-model ``.to()``/``.float()`` copy);
* bfloat16 end to end (patch grids, DLA, attribution, generation, a whole tiny run) against
  float32, loosely: metrics are float32 whatever the model's dtype;
* device maps: a dict ``device_map`` and accelerate's device-alignment hooks (what a multi-GPU
  ``device_map='auto'`` load attaches) give the single-device numbers. CPU machines have one
  device, so layers really on different devices are only tested by
  :func:`test_multi_gpu_device_map` (needs >= 2 CUDA devices, skipped otherwise) and
  :func:`test_cuda_bf16_matches_cpu_fp32` (needs CUDA).
"""

from __future__ import annotations

import pytest
import torch

from refusal_lab import memory
from refusal_lab.dla import direct_logit_attribution
from refusal_lab.models.hooked import HookedChatModel
from tests.tiny_models import tiny_model
from refusal_lab.patching import engine
from refusal_lab.patching.attribution import attribution_grid, receiver_gradients
from refusal_lab.patching.engine import GRIDS, GridSpec, LogitDiff, Receiver, patch_grid, source_sites
from tests.conftest import log_odds_metric, patch_pair
from tests.helpers_tiny_chat import make_tiny_chat_model
from tests.numeric import assert_tensors_close

GiB = 1024**3


# ------------------------------------------------------------------------------ batch sizes
@pytest.fixture(scope="module")
def qwen_tiny():
    return HookedChatModel(tiny_model("qwen2"), name="tiny-qwen2")


def test_row_bytes_arithmetic(qwen_tiny):
    m, T = qwen_tiny, 10
    c = m.cfg
    inter = m.hf_model.config.intermediate_size
    per_col = (5 * c.d_model + (c.n_heads + 2 * c.n_key_value_heads) * c.d_head + 3 * c.n_heads * c.d_head
               + 3 * inter + 2 * c.n_heads * T + 4 * c.n_key_value_heads * c.d_head)
    assert memory.row_activation_bytes(m, T) == 2 * (4 * T * per_col + 24 * c.d_vocab)
    states = memory.row_activation_bytes(m, T, keep_states=True)
    assert states - memory.row_activation_bytes(m, T) == 2 * 4 * T * c.n_layers * c.d_model
    assert memory.row_activation_bytes(m, 2 * T) > 2 * memory.row_activation_bytes(m, T) - 2 * 24 * c.d_vocab * 2


def test_rows_that_fit_is_arithmetic():
    assert memory.rows_that_fit(None, 1000) == 256  # unknown free memory: the old default
    assert memory.rows_that_fit(0, 1000) == 1  # never below one row (OOM halving reports the rest)
    assert memory.rows_that_fit(10_000, 1000) == 5  # half of the free memory
    assert memory.rows_that_fit(10_000, 1000, fraction=1.0) == 10
    assert memory.rows_that_fit(10 * GiB, 1000) == memory.MAX_AUTO_ROWS
    # a Gemma-2-9B-sized row (27 MB at T = 40 in bf16) on a 24 GB card with ~4 GB left: 74 rows
    assert memory.rows_that_fit(4 * 10**9, 27 * 10**6) == 74


def test_auto_max_rows_uses_the_least_free_device(qwen_tiny, monkeypatch):
    m, T = qwen_tiny, 12
    per_row = memory.row_activation_bytes(m, T)
    assert memory.auto_max_rows(m, T, free_bytes=40 * per_row) == 20
    assert memory.auto_max_rows(m, T, free_bytes=40 * per_row, keep_states=True) < 20
    # layers on two devices: the one with less free memory decides
    monkeypatch.setattr(memory, "model_devices", lambda model: [torch.device("cuda", 0), torch.device("cuda", 1)])
    free = {0: 100 * per_row, 1: 8 * per_row}
    monkeypatch.setattr(memory, "available_memory", lambda dev: free[torch.device(dev).index])
    assert memory.auto_max_rows(m, T) == 4
    monkeypatch.setattr(memory, "available_memory", lambda dev: None)
    assert memory.auto_max_rows(m, T) == 256


def test_cuda_free_memory_counts_the_allocators_unused_cache(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (3 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 2 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: GiB // 2)
    assert memory.available_memory(torch.device("cuda", 0)) == 3 * GiB + GiB + GiB // 2


def test_engine_batches_follow_free_memory(qwen_tiny, monkeypatch):
    """max_rows=None sizes batches from free memory; a given max_rows is capped by it; values unchanged."""
    m = qwen_tiny
    src, rec = patch_pair(m)
    metric = LogitDiff(3, 7)
    _, source = m.run_with_cache(src.ids, src.mask)
    receiver = Receiver.record(m, rec, metric)
    spec = GridSpec("resid_pre", [0, 1, 2], [4, 5, 8])
    ref = patch_grid(m, receiver, source, spec, metric, max_rows=3, progress=False)

    sizes = []
    real = engine._run_group

    def spy(model, receiver, rows, *a, **k):
        sizes.append(len(rows))
        return real(model, receiver, rows, *a, **k)

    monkeypatch.setattr(engine, "_run_group", spy)
    per_row = memory.row_activation_bytes(m, rec.T)
    monkeypatch.setattr(memory, "available_memory", lambda dev: 6 * per_row)  # half of it: 3 rows
    got = patch_grid(m, receiver, source, spec, metric, progress=False)
    assert max(sizes) == 3
    assert_tensors_close(got, ref)  # batches sized from free memory: to fp32 rounding
    sizes.clear()
    got = patch_grid(m, receiver, source, spec, metric, max_rows=256, progress=False)
    assert max(sizes) == 3
    assert_tensors_close(got, ref)
    assert engine.batch_rows(m, rec.T, 2) == 2


# ------------------------------------------------------------------------------------ loading
@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("gpu_path"))


def test_load_goes_straight_to_dtype_and_device(chat_folder, monkeypatch):
    """No whole-model .to()/.float()/.half()/.bfloat16() after loading: transformers reads the
    weights straight into the requested dtype on the requested device (device_map={'': device})."""
    import transformers

    from refusal_lab.models.loading import load_model

    calls = []
    for name in ("to", "float", "half", "bfloat16", "cuda"):
        real = getattr(torch.nn.Module, name)

        def guard(self, *a, _real=real, _name=name, **k):
            if isinstance(self, transformers.PreTrainedModel):
                calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.nn.Module, name, guard)
    seen = {}
    real_fp = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *a, **k):
        seen.update(k)
        return real_fp(cls, *a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    m = load_model(str(chat_folder), dtype="bfloat16", device="cpu")
    assert calls == []
    assert seen["device_map"] == {"": torch.device("cpu")} and seen["dtype"] == torch.bfloat16
    assert {p.dtype for p in m.hf_model.parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------------------- bfloat16
def _pair_models(model_type: str):
    return (HookedChatModel(tiny_model(model_type), name=f"tiny-{model_type}"),
            HookedChatModel(tiny_model(model_type, dtype=torch.bfloat16), name=f"tiny-{model_type}-bf16"))


@pytest.mark.parametrize("model_type", ["qwen2", "gemma2"])
def test_bfloat16_grids_dla_attribution_match_float32(model_type):
    """Every exact grid, DLA and attribution in bf16 agree with fp32 loosely; outputs are float32."""
    m32, m16 = _pair_models(model_type)
    out = {}
    for m in (m32, m16):
        src, rec = patch_pair(m)
        metric = LogitDiff(3, 7)
        _, source = m.run_with_cache(src.ids, src.mask)
        receiver = Receiver.record(m, rec, metric)
        assert receiver.baseline.dtype == torch.float32
        grids = {}
        for g in GRIDS:
            spec = GridSpec(g, list(range(m.cfg.n_layers)), [4, 6] if g == "heads" else [4, 5, 8],
                            list(range(m.cfg.n_heads)))
            grids[g] = patch_grid(m, receiver, source, spec, metric, progress=False)
            assert grids[g].dtype == torch.float32 and torch.isfinite(grids[g]).all()
        spec = GridSpec("attn_out", list(range(m.cfg.n_layers)), [4, 5, 8])
        acts, grads = receiver_gradients(m, rec, source_sites(m, spec), metric)
        attr = attribution_grid(m, rec, acts, grads, source, spec, receiver.baseline)
        dla = direct_logit_attribution(m, rec.ids, rec.mask, 3, 7)
        assert dla.components.dtype == torch.float32 and dla.heads.dtype == torch.float32
        logodds = log_odds_metric([3, 5])(m, m.adapter.final_norm(receiver.resid_pre[0][:, -1]), torch.arange(3))
        assert logodds.dtype == torch.float32
        out[m.cfg.dtype] = dict(grids=grids, attr=attr, dla=dla, baseline=receiver.baseline)
    a, b = out["float32"], out["bfloat16"]
    scale = float(a["baseline"].abs().max()) + 1.0
    tol = 0.1 * scale  # bf16 keeps ~3 significant digits through 3 random layers
    assert (a["baseline"] - b["baseline"]).abs().max() < tol
    for g in GRIDS:
        assert (a["grids"][g] - b["grids"][g]).abs().max() < tol, g
    assert (a["attr"] - b["attr"]).abs().max() < tol
    assert (a["dla"].components - b["dla"].components).abs().max() < tol
    # in bf16 too the DLA components sum to the logit difference, up to the bf16 rounding of the
    # residual stream itself (~0.1 % of the components' total size here; < 1e-6 in fp32)
    d = b["dla"]
    assert torch.allclose(d.components.sum(1), d.logit_diff, atol=1e-2 * float(d.components.abs().sum(1).max()))
    d = a["dla"]
    assert torch.allclose(d.components.sum(1), d.logit_diff, atol=1e-5)


def test_bfloat16_generation_runs_and_mostly_agrees():
    m32, m16 = _pair_models("qwen2")
    ids = torch.randint(0, m32.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    g32 = m32.generate(ids, mask, max_new_tokens=6, stop_at_eos=False)
    g16 = m16.generate(ids, mask, max_new_tokens=6, stop_at_eos=False)
    assert g16.shape == g32.shape and g16.device == ids.device
    assert bool((g16[:, 0] == g32[:, 0]).all())  # the first greedy token survives bf16 rounding


def test_bfloat16_whole_run_matches_float32(chat_folder, tmp_path):
    """A whole tiny run in bf16: same shapes, float32 numbers close to the fp32 run."""
    from refusal_lab.models.loading import load_model
    from refusal_lab.run.config import RunConfig
    from refusal_lab.run.pipeline import Pipeline

    res = {}
    for dt in ("float32", "bfloat16"):
        m = load_model(str(chat_folder), dtype=dt, device="cpu")
        cfg = RunConfig(dtype=dt, grids=["resid_pre", "attn_out_cumulative", "heads"], generate_tokens=4)
        res[dt] = Pipeline(m, cfg, tmp_path / dt, progress=False).run()
    a, b = res["float32"]["patching"], res["bfloat16"]["patching"]
    for g in ("resid_pre", "attn_out_cumulative", "heads"):
        va, vb = torch.as_tensor(a[g]["values"]), torch.as_tensor(b[g]["values"])
        assert va.shape == vb.shape and torch.isfinite(vb).all(), g
        # normalised values: 0 = harmless, 1 = harmful baseline
        assert (va - vb).abs().mean() < 0.25, g


# ------------------------------------------------------------------------------- device maps
def _device_map(hf_model, devices) -> dict:
    """Layers spread round-robin over ``devices``; embeddings first, final norm/lm_head last."""
    n = hf_model.config.num_hidden_layers
    dm = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    for l in range(n):
        dm[f"model.layers.{l}"] = devices[min(len(devices) - 1, l * len(devices) // n)]
    dm["model.norm"] = devices[-1]
    dm["lm_head"] = devices[0] if hf_model.config.tie_word_embeddings else devices[-1]
    return dm


def _everything(m: HookedChatModel):
    """A patch grid of every kind, DLA and a greedy generation on the standard tiny inputs."""
    src, rec = patch_pair(m)
    src.ids, src.mask = src.ids.to(m.device), src.mask.to(m.device)
    rec.ids, rec.mask = rec.ids.to(m.device), rec.mask.to(m.device)
    metric = LogitDiff(3, 7)
    _, source = m.run_with_cache(src.ids, src.mask)
    receiver = Receiver.record(m, rec, metric)
    out = {}
    for g in GRIDS:
        spec = GridSpec(g, list(range(m.cfg.n_layers)), [4, 6] if g == "heads" else [4, 5, 8],
                        list(range(m.cfg.n_heads)))
        out[g] = patch_grid(m, receiver, source, spec, metric, progress=False).cpu()
    out["logodds"] = patch_grid(m, receiver, source, GridSpec("resid_pre", [0, 2], [4, 8]), log_odds_metric([3, 5]),
                                progress=False)
    spec = GridSpec("mlp_out_cumulative", list(range(m.cfg.n_layers)), [4, 5])
    acts, grads = receiver_gradients(m, rec, source_sites(m, spec), metric)
    out["attr"] = attribution_grid(m, rec, acts, grads, source, spec, receiver.baseline)
    dla = direct_logit_attribution(m, rec.ids, rec.mask, 3, 7)
    out["dla"] = torch.cat([dla.components.cpu(), dla.heads.flatten(1).cpu(), dla.accumulated.cpu()], 1)
    out["gen"] = m.generate(rec.ids, rec.mask, max_new_tokens=5, stop_at_eos=False).cpu()
    return out


def _compare(a: dict, b: dict, atol: float):
    for k in a:
        if k == "gen":
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k].float().cpu(), b[k].float().cpu(), atol=atol), (k, (a[k] - b[k]).abs().max())


def test_dict_device_map_and_accelerate_hooks_on_cpu(chat_folder):
    """A dict device_map (every block named, as 'auto' produces) plus accelerate's AlignDevicesHooks
    (attached for real multi-device maps) give the single-device results exactly. All on the CPU,
    so this checks the code path and the hooks, not cross-device copies."""
    from accelerate import dispatch_model

    from refusal_lab.models.loading import load_model

    plain = load_model(str(chat_folder), dtype="float32", device="cpu")
    dm = _device_map(plain.hf_model, ["cpu", "cpu"])
    mapped = load_model(str(chat_folder), dtype="float32", device_map=dm)
    dispatch_model(mapped.hf_model, device_map=dm, force_hooks=True)
    assert any(hasattr(mod, "_hf_hook") for mod in mapped.hf_model.modules())
    _compare(_everything(plain), _everything(mapped), atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 CUDA devices (untested on this machine)")
@pytest.mark.parametrize("how", ["spread", "auto"])
def test_multi_gpu_device_map(chat_folder, how):
    """Layers on different GPUs (``spread``: round-robin; ``auto``: accelerate's own map) give the
    single-GPU patch grids, DLA and generation."""
    from refusal_lab.models.loading import load_model

    single = load_model(str(chat_folder), dtype="float32", device="cuda:0")
    n = torch.cuda.device_count()
    dm = _device_map(single.hf_model, [f"cuda:{i}" for i in range(n)]) if how == "spread" else "auto"
    multi = load_model(str(chat_folder), dtype="float32", device_map=dm)
    if how == "spread":
        devs = {str(p.device) for p in multi.hf_model.parameters()}
        assert len(devs) >= 2, devs
    _compare(_everything(single), _everything(multi), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (untested on this machine)")
def test_cuda_bf16_matches_cpu_fp32(chat_folder):
    from refusal_lab.models.loading import load_model

    cpu = _everything(load_model(str(chat_folder), dtype="float32", device="cpu"))
    gpu32 = _everything(load_model(str(chat_folder), dtype="float32", device="cuda"))
    _compare(cpu, {k: v for k, v in gpu32.items()}, atol=1e-3)
    gpu16 = _everything(load_model(str(chat_folder), dtype="bfloat16", device="cuda"))
    for k in ("resid_pre", "attn_out", "heads", "dla"):
        assert (cpu[k] - gpu16[k].float()).abs().max() < 0.1 * (cpu[k].abs().max() + 1), k
