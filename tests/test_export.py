"""``refusal-lab export-direction``: the exported vector, applied by steering-vectors and by repeng
on a tiny Hugging Face model (their own hooks on its decoder blocks), gives the logits of our own
``addition_hooks`` at ``resid_pre`` (our block loop) to 1e-4; the GGUF is the one llama.cpp's loader
and repeng's ``export_gguf`` agree on; bad input is one sentence and exit 2."""

import numpy as np
import pytest
import torch

from refusal_lab.artifacts import write_json
from refusal_lab.cli import main
from refusal_lab.models.hooked import HookedChatModel
from refusal_lab.steering.export import (
    RunDirection,
    llama_cpp_control_vector,
    load_steering_vector,
    read_control_vector_gguf,
    read_run_direction,
)
from refusal_lab.steering.interventions import addition_hooks
from refusal_lab.steering.vectors import save_vector
from tests.sample_results import sample_results
from tests.tiny_models import tiny_config, tiny_model

LAYER = 2  # resid_pre of layer 2 = block 1's output
ALPHA = 2.5


def _run_folder(root, model_type="qwen2", layer=LAYER, results=True, seed=0):
    """A minimal run folder: the direction vector (and a results.json naming the model)."""
    cfg = tiny_config(model_type)
    v = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(seed)) * 3.0
    save_vector(root / "vectors" / "direction.safetensors", v,
                {"model": f"tiny-{model_type}", "layer": layer, "site": "hook_resid_pre", "kind": "difference-in-means"})
    if results:
        res = sample_results(n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads)
        res["model"].update(name=f"tiny-{model_type}", model_type=model_type, n_layers=cfg.num_hidden_layers,
                            d_model=cfg.hidden_size)
        res["direction"]["layer"] = layer
        write_json(root / "results.json", res)
    return v


def _ids(seed=3, b=3, T=9):
    return torch.randint(0, 128, (b, T), generator=torch.Generator().manual_seed(seed))


def _ours(hf, v, layer, alpha, ids):
    """Our addition at blocks.{layer}.hook_resid_pre, every column, through our own block loop."""
    return HookedChatModel(hf, name="tiny")(ids, torch.ones_like(ids), fwd_hooks=addition_hooks(v, layer, alpha))


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_steering_vectors_applies_our_addition(tmp_path, model_type):
    sv_lib = pytest.importorskip("steering_vectors")
    v = _run_folder(tmp_path, model_type)
    out = tmp_path / "sv.safetensors"
    assert main(["export-direction", str(tmp_path), "--format", "steering-vectors", "--out", str(out),
                 "--alpha", str(ALPHA)]) == 0
    sv = load_steering_vector(out)
    assert isinstance(sv, sv_lib.SteeringVector) and sv.layer_type == "decoder_block"
    assert list(sv.layer_activations) == [LAYER - 1]
    hf, ids = tiny_model(model_type), _ids()
    with torch.no_grad():
        base = hf(input_ids=ids).logits
        with sv.apply(hf):
            theirs = hf(input_ids=ids).logits
        with sv.apply(hf, multiplier=-1.0):
            theirs_neg = hf(input_ids=ids).logits
        ours = _ours(hf, v, LAYER, ALPHA, ids)
        ours_neg = _ours(hf, v, LAYER, -ALPHA, ids)
        plain = HookedChatModel(hf)(ids, torch.ones_like(ids))
    assert (plain - base).abs().max() < 1e-4  # the two forwards agree unsteered
    assert (ours - base).abs().max() > 0.05  # the addition does something
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs_neg - ours_neg).abs().max() < 1e-4


def _import_repeng():
    """repeng 0.4.0 names ``np.float_`` (gone in NumPy 2) in three annotations only; alias it."""
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    return pytest.importorskip("repeng")


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_repeng_applies_our_addition(tmp_path, model_type):
    repeng = _import_repeng()
    v = _run_folder(tmp_path, model_type)
    out = tmp_path / "dir.gguf"
    assert main(["export-direction", str(tmp_path), "--format", "repeng", "--out", str(out)]) == 0
    cv = repeng.ControlVector.import_gguf(str(out))
    assert cv.model_type == model_type and list(cv.directions) == [LAYER - 1]
    hf, ids = tiny_model(model_type), _ids()
    with torch.no_grad():
        ours = _ours(hf, v, LAYER, ALPHA, ids)
        ours_neg = _ours(hf, v, LAYER, -ALPHA, ids)
        # repeng masks padding from position_ids and reshapes them to [b, T]: give them per row
        # (transformers 5 passes a broadcast [1, T] otherwise)
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        cm = repeng.ControlModel(hf, layer_ids=[LAYER - 1])
        try:
            cm.set_control(cv, coeff=ALPHA)
            theirs = cm(input_ids=ids, position_ids=pos).logits
            cm.set_control(cv, coeff=-ALPHA)
            theirs_neg = cm(input_ids=ids, position_ids=pos).logits
        finally:
            cm.unwrap()
    assert (ours - HookedChatModel(hf)(ids, torch.ones_like(ids))).abs().max() > 0.05
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs_neg - ours_neg).abs().max() < 1e-4


def test_gguf_is_llama_cpp_and_repeng_layout(tmp_path):
    import gguf

    v = _run_folder(tmp_path)
    out = tmp_path / "cv.gguf"
    assert main(["export-direction", str(tmp_path), "--format", "llama-cpp", "--out", str(out), "--alpha", "-2"]) == 0
    r = gguf.GGUFReader(str(out))
    assert r.get_field("general.architecture").contents() == "controlvector"
    assert r.get_field("controlvector.model_hint").contents() == "qwen2"
    assert r.get_field("controlvector.layer_count").contents() == 1
    (t,) = r.tensors
    assert t.name == f"direction.{LAYER - 1}" and t.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_allclose(read_control_vector_gguf(out)[LAYER - 1], -2 * v.numpy(), rtol=1e-6)
    # llama.cpp's buffer starts at layer 1: block 1's vector sits at offset 0
    data, start, end = llama_cpp_control_vector(out, n_embd=64, n_layer=3, strength=0.5)
    assert (start, end) == (1, 3) and data.shape == (64,)
    np.testing.assert_allclose(data, -v.numpy(), rtol=1e-6)
    # the default file name is under the run's vectors/
    assert main(["export-direction", str(tmp_path), "--format", "llama-cpp"]) == 0
    assert (tmp_path / "vectors" / "direction.llama-cpp.gguf").is_file()


def test_gguf_matches_repeng_export(tmp_path):
    """repeng's own export_gguf of the same ControlVector holds the same fields and tensor."""
    import gguf

    repeng = _import_repeng()
    v = _run_folder(tmp_path)
    ours = tmp_path / "ours.gguf"
    assert main(["export-direction", str(tmp_path), "--format", "repeng", "--out", str(ours)]) == 0
    theirs = tmp_path / "theirs.gguf"
    repeng.ControlVector("qwen2", {LAYER - 1: v.numpy().astype(np.float32)}).export_gguf(str(theirs))
    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
    for key in b.fields:
        if not key.startswith("GGUF."):
            assert a.get_field(key).contents() == b.get_field(key).contents(), key
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    np.testing.assert_array_equal(a.tensors[0].data, b.tensors[0].data)


def test_read_run_direction_without_results(tmp_path):
    v = _run_folder(tmp_path, results=False)
    d = read_run_direction(tmp_path)
    assert d.layer == LAYER and d.block == LAYER - 1 and d.n_layers is None
    assert torch.equal(d.vector, v.to(torch.float32))


def _fails(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _config_json(folder, **fields):
    """A model folder as far as --model reads it: config.json only."""
    folder.mkdir(parents=True)
    write_json(folder / "config.json", {"model_type": "qwen2", **fields})


def test_bad_inputs(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no refusal direction" in _fails(capsys, ["export-direction", str(empty), "--format", "repeng"])
    assert "does not exist" in _fails(capsys, ["export-direction", str(tmp_path / "nope"), "--format", "repeng"])
    run = tmp_path / "run"
    _run_folder(run)
    with pytest.raises(SystemExit) as e:  # argparse: usage line + one error sentence
        main(["export-direction", str(run), "--format", "onnx"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    small = tmp_path / "small"
    _config_json(small, num_hidden_layers=1, hidden_size=64)
    assert "has 1 layers" in _fails(capsys, ["export-direction", str(run), "--format", "llama-cpp", "--model", str(small)])
    wide = tmp_path / "wide"
    _config_json(wide, num_hidden_layers=3, hidden_size=96)
    assert "d_model 96" in _fails(capsys, ["export-direction", str(run), "--format", "repeng", "--model", str(wide)])
    assert "neither" in _fails(capsys, ["export-direction", str(run), "--format", "repeng", "--model", str(tmp_path / "x")])
    assert "is a folder" in _fails(capsys, ["export-direction", str(run), "--format", "repeng", "--out", str(tmp_path)])
    assert "finite" in _fails(capsys, ["export-direction", str(run), "--format", "repeng", "--alpha", "nan"])
    low = tmp_path / "low"
    _run_folder(low, layer=1)
    assert "layer >= 2" in _fails(capsys, ["export-direction", str(low), "--format", "llama-cpp"])
    assert main(["export-direction", str(low), "--format", "repeng", "--out", str(tmp_path / "low.gguf")]) == 0
    capsys.readouterr()
    mixed = tmp_path / "mixed"
    _run_folder(mixed)
    save_vector(mixed / "vectors" / "direction.safetensors", torch.ones(64), {"layer": 1})
    assert "mixes two runs" in _fails(capsys, ["export-direction", str(mixed), "--format", "repeng"])


def test_abliterate_gguf_needs_a_gguf_model(tmp_path, capsys):
    folder = tmp_path / "hf"
    tiny_config("qwen2").save_pretrained(folder)
    err = _fails(capsys, ["abliterate", "--model", str(folder), "--gguf", "--out", str(tmp_path / "out")])
    assert "--gguf needs a model that came from a GGUF" in err
    assert "does not exist" in _fails(capsys, ["abliterate", "--model", str(tmp_path / "no.gguf"), "--gguf",
                                               "--out", str(tmp_path / "out")])


def test_llama_cpp_buffer_checks_the_model(tmp_path):
    from refusal_lab.steering.export import write_control_vector_gguf
    from refusal_lab.errors import ConfigError

    d = RunDirection(vector=torch.ones(8), layer=3, model_type="qwen2")
    path = write_control_vector_gguf(tmp_path / "cv.gguf", d)
    data, _, _ = llama_cpp_control_vector(path, n_embd=8, n_layer=4)
    assert data.shape == (16,) and (data[:8] == 0).all() and (data[8:] == 1).all()  # block 2 at [n_embd:]
    with pytest.raises(ConfigError, match="has 2 layers"):
        llama_cpp_control_vector(path, n_embd=8, n_layer=2)
    with pytest.raises(ConfigError, match="n_embd is 16"):
        llama_cpp_control_vector(path, n_embd=16, n_layer=4)


def test_abliterated_gguf_copies_the_source_and_writes_the_edits(tmp_path):
    """write_abliterated_gguf on a tiny qwen2 whose 'source GGUF' we write from its own weights:
    untouched tensors and metadata come through byte for byte, the edited ones are the
    orthogonalised weights (f16), and the untied head is added as output.weight."""
    import gguf

    from refusal_lab.steering.abliterate import orthogonalize_weights
    from refusal_lab.steering.export import write_abliterated_gguf

    hf = tiny_model("qwen2", tie_word_embeddings=True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 3)
    src = tmp_path / "src.gguf"
    w = gguf.GGUFWriter(str(src), "qwen2")
    w.add_block_count(3)
    w.add_string("tokenizer.ggml.model", "gpt2")
    for n, p in hf.named_parameters():  # tied: lm_head.weight is not listed separately
        w.add_tensor(names.get_name(n, try_suffixes=(".weight", ".bias")), p.detach().numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model = HookedChatModel(hf)
    head = hf.lm_head.weight.detach().clone()
    orthogonalize_weights(model, torch.randn(64, generator=torch.Generator().manual_seed(5)))
    out = write_abliterated_gguf(src, tmp_path / "abl.gguf", model)
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert b.get_field("tokenizer.ggml.model").contents() == "gpt2" and b.get_field("qwen2.block_count").contents() == 3
    old, new = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(new) == set(old) | {"output.weight"}
    edited = {"token_embd.weight", "output.weight"} | {f"blk.{l}.{k}.weight" for l in range(3)
                                                       for k in ("attn_output", "ffn_down")}
    state = dict(hf.named_parameters())
    for name, t in new.items():
        if name not in edited:
            assert t.tensor_type == old[name].tensor_type
            np.testing.assert_array_equal(t.data, old[name].data)
    np.testing.assert_allclose(new["output.weight"].data, head.numpy(), atol=1e-3)
    np.testing.assert_allclose(new["token_embd.weight"].data, state["model.embed_tokens.weight"].numpy(), atol=1e-3)
    np.testing.assert_allclose(new["blk.1.ffn_down.weight"].data, state["model.layers.1.mlp.down_proj.weight"].numpy(),
                               atol=1e-3)
    assert new["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert not np.allclose(new["blk.1.ffn_down.weight"].data, old["blk.1.ffn_down.weight"].data, atol=1e-3)
