"""A run's refusal direction in the interchange formats of other steering tools.

Our direction is added at ``blocks.{L}.hook_resid_pre``, the input of block ``L``. llama.cpp,
repeng and steering-vectors all add a vector to a decoder block's *output* instead, and block
``L - 1``'s output is exactly ``resid_pre[L]`` (no norm sits between blocks), so every format
stores the vector under block index ``L - 1``:

* ``llama-cpp`` / ``repeng``: a control-vector GGUF (``general.architecture = controlvector``,
  ``controlvector.model_hint``, ``controlvector.layer_count``, one F32 tensor ``direction.{L-1}``),
  the file repeng's ``ControlVector.export_gguf`` writes and llama.cpp's
  ``common_control_vector_load`` reads (``--control-vector-scaled FILE SCALE``;
  ``ControlVector.import_gguf`` in repeng). llama.cpp never steers block 0's output, so its format
  needs ``L >= 2``; repeng's needs ``L >= 1``.
* ``steering-vectors``: that library has no file format, so a safetensors file holding
  ``layer_activations.{L-1}`` (and ``layer_type`` in its metadata), read back into a
  ``steering_vectors.SteeringVector`` by :func:`load_steering_vector`.

All three add to every token position, as :func:`~refusal_lab.steering.interventions.addition_hooks`
does with ``positions=None``. ``alpha`` is baked into the written vector (default 1: the raw
difference-in-means vector); each tool scales it again at apply time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refusal_lab.errors import ConfigError, RefusalLabError

__all__ = [
    "FORMATS",
    "RunDirection",
    "check_model_shape",
    "export_direction",
    "llama_cpp_control_vector",
    "load_steering_vector",
    "model_shape",
    "read_control_vector_gguf",
    "read_run_direction",
    "to_steering_vector",
    "write_control_vector_gguf",
    "write_steering_vectors",
]

FORMATS = ("llama-cpp", "steering-vectors", "repeng")
"""The ``--format`` values of ``refusal-lab export-direction``."""
SUFFIX = {"llama-cpp": ".llama-cpp.gguf", "repeng": ".repeng.gguf", "steering-vectors": ".steering-vectors.safetensors"}
"""Default file endings (``RUN/vectors/direction<suffix>``)."""
ARCH = "controlvector"


@dataclass(frozen=True)
class RunDirection:
    """A refusal direction to export: ``vector`` is added at ``blocks.{layer}.hook_resid_pre``."""

    vector: torch.Tensor
    layer: int
    model: str | None = None
    model_type: str | None = None
    n_layers: int | None = None
    chosen_alpha: float | None = None

    @property
    def d_model(self) -> int:
        return int(self.vector.numel())

    @property
    def block(self) -> int:
        """The decoder block whose output is ``resid_pre[layer]``: the index the other tools use."""
        return self.layer - 1


def read_run_direction(run: str | Path) -> RunDirection:
    """The direction of a run folder: ``vectors/direction.safetensors`` with its layer, and the
    model's shape and the chosen alpha from ``results.json`` when the run finished."""
    from refusal_lab.run.results import read_results
    from refusal_lab.steering.vectors import load_vector

    run = Path(run)
    if not run.is_dir():
        raise RefusalLabError(f"Run folder {run} does not exist; give a folder written by `refusal-lab run --out`.")
    path = run / "vectors" / "direction.safetensors"
    if not path.is_file():
        raise RefusalLabError(f"{run} holds no refusal direction ({path} is missing); run `refusal-lab run "
                              f"--out {run}` with the steering steps on (no --no-steering) first.")
    try:
        vector, meta = load_vector(path)
    except Exception as e:  # noqa: BLE001 - not safetensors / no 'vector' tensor
        raise RefusalLabError(f"{path} is not a direction file written by save_vector ({type(e).__name__}: {e}).") from None
    results = read_results(run) if (run / "results.json").is_file() else {}
    entry = results.get("direction", {})
    layer = meta.get("layer", entry.get("layer"))
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise RefusalLabError(f"{path} does not record the layer of its direction; rerun the direction step with --force.")
    if entry and entry.get("layer") != layer:
        raise RefusalLabError(f"{path} is for layer {layer} but {run}/results.json says {entry.get('layer')}; "
                              "the folder mixes two runs, rerun it with --force.")
    site = meta.get("site", "hook_resid_pre")
    if site != "hook_resid_pre":
        raise RefusalLabError(f"{path} is a direction at {site}, not hook_resid_pre; only resid_pre directions export.")
    model = results.get("model", {})
    alpha = results.get("steering", {}).get("instructions", {}).get("chosen_alpha")
    return RunDirection(vector=vector.detach().reshape(-1).to(torch.float32), layer=layer,
                        model=model.get("name") or meta.get("model"), model_type=model.get("model_type"),
                        n_layers=model.get("n_layers"), chosen_alpha=alpha)


def model_shape(model: str | Path) -> tuple[int, int, str]:
    """(n_layers, d_model, model_type) of a ``.gguf`` file (its metadata) or a Hugging Face model
    folder (its ``config.json``), read without loading weights."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        from gguf import GGUFReader

        try:
            reader = GGUFReader(str(path))
            arch = _field(reader, "general.architecture")
            return int(_field(reader, f"{arch}.block_count")), int(_field(reader, f"{arch}.embedding_length")), str(arch)
        except Exception as e:  # noqa: BLE001 - not a GGUF / no block count
            raise ConfigError(f"--model {path} is not a GGUF model file with a block count ({type(e).__name__}: {e}).") from None
    if path.is_dir() and (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        cfg = cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg
        if "num_hidden_layers" not in cfg or "hidden_size" not in cfg:
            raise ConfigError(f"--model {path}/config.json has no num_hidden_layers / hidden_size.")
        return int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), str(cfg.get("model_type", "unknown"))
    raise ConfigError(f"--model {path} is neither a .gguf file nor a Hugging Face model folder with config.json.")


def _field(reader, key: str):
    f = reader.get_field(key)
    if f is None:
        raise KeyError(key)
    return f.contents()


def check_model_shape(d: RunDirection, n_layers: int | None, d_model: int | None, where: str = "the model") -> None:
    """ConfigError unless a model of ``n_layers`` blocks and width ``d_model`` has block ``d.block``."""
    if d_model is not None and d_model != d.d_model:
        raise ConfigError(f"The direction has {d.d_model} entries but {where} has d_model {d_model}; "
                          "export a direction computed on this model.")
    if n_layers is not None and not 0 <= d.block < n_layers:
        raise ConfigError(f"The direction is for resid_pre of layer {d.layer} (block {d.block}'s output) but {where} "
                          f"has {n_layers} layers; export a direction computed on this model.")


def _check_block(d: RunDirection, fmt: str) -> None:
    lowest = 2 if fmt == "llama-cpp" else 1
    if d.layer < lowest:
        why = ("llama.cpp steers the outputs of blocks 1.. only" if fmt == "llama-cpp"
               else f"{fmt} steers decoder-block outputs, and resid_pre of layer 0 is the embedding")
        raise ConfigError(f"The direction sits at resid_pre of layer {d.layer}, which {fmt} cannot express "
                          f"({why}); it needs layer >= {lowest}.")


def _check_out(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; give a file name.")
    path.parent.mkdir(parents=True, exist_ok=True)


def _atomic(path: Path, write) -> Path:
    from refusal_lab.artifacts import atomic_target

    path = Path(path)
    _check_out(path)
    with atomic_target(path) as tmp:
        write(tmp)
    return path


def write_control_vector_gguf(path: str | Path, d: RunDirection, alpha: float = 1.0, fmt: str = "llama-cpp") -> Path:
    """The control-vector GGUF of llama.cpp's cvector-generator and repeng's ``export_gguf``:
    ``direction.{layer-1}`` = ``alpha * vector`` (F32), plus our provenance keys."""
    import gguf

    _check_block(d, fmt)
    data = (float(alpha) * d.vector.detach().to(torch.float64)).to(torch.float32).numpy()

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, ARCH)  # writes general.architecture = controlvector
        w.add_string(f"{ARCH}.model_hint", d.model_type or "unknown")
        w.add_uint32(f"{ARCH}.layer_count", 1)
        w.add_string("refusal_lab.site", f"blocks.{d.layer}.hook_resid_pre")
        w.add_string("refusal_lab.model", d.model or "unknown")
        w.add_float32("refusal_lab.alpha", float(alpha))
        w.add_tensor(f"direction.{d.block}", data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return _atomic(Path(path), write)


def read_control_vector_gguf(path: str | Path) -> dict[int, np.ndarray]:
    """``{block: vector}`` of a control-vector GGUF, as llama.cpp's loader reads it (F32, 1-D,
    one width, ``direction.{i}`` with ``i >= 1``; several tensors for one block add up)."""
    from gguf import GGUFReader

    out: dict[int, np.ndarray] = {}
    for t in GGUFReader(str(path)).tensors:
        head, _, idx = t.name.partition(".")
        if head != "direction" or not idx.isdigit():
            raise ConfigError(f"{path} holds tensor {t.name!r}; a control vector has only direction.<layer> tensors.")
        v = np.asarray(t.data, dtype=np.float32).reshape(-1)
        out[int(idx)] = out.get(int(idx), 0) + v
    if len({v.size for v in out.values()}) > 1:
        raise ConfigError(f"The direction tensors of {path} differ in width.")
    return out


def llama_cpp_control_vector(path: str | Path, n_embd: int, n_layer: int, strength: float = 1.0
                             ) -> tuple[np.ndarray, int, int]:
    """``(data, il_start, il_end)`` for llama.cpp's ``llama_set_adapter_cvec(ctx, data, len(data),
    n_embd, il_start, il_end)``: what ``common_control_vector_load`` builds (the buffer starts at
    layer 1; block 0 is never steered), scaled by ``strength``, for a model of ``n_layer`` blocks."""
    dirs = read_control_vector_gguf(path)
    if 0 in dirs:
        raise ConfigError(f"{path} steers block 0, which llama.cpp rejects (its layer indices start at 1).")
    top = max(dirs, default=0)
    for i, v in dirs.items():
        if v.size != n_embd:
            raise ConfigError(f"{path} has vectors of {v.size} entries but the model's n_embd is {n_embd}.")
    if top >= n_layer:
        raise ConfigError(f"{path} steers block {top} but the model has {n_layer} layers; "
                          "use a control vector exported for this model.")
    data = np.zeros(n_embd * max(top, 1), dtype=np.float32)
    for i, v in dirs.items():
        data[n_embd * (i - 1): n_embd * i] += v * np.float32(strength)
    return data, 1, n_layer


def write_steering_vectors(path: str | Path, d: RunDirection, alpha: float = 1.0) -> Path:
    """A safetensors file of ``layer_activations.{layer-1}`` = ``alpha * vector`` with
    ``layer_type = decoder_block``: the fields of a ``steering_vectors.SteeringVector``."""
    from refusal_lab.artifacts import save_tensors

    _check_block(d, "steering-vectors")
    v = (float(alpha) * d.vector.detach().to(torch.float64)).to(torch.float32)
    meta = {"format": "steering-vectors", "layer_type": "decoder_block", "site": f"blocks.{d.layer}.hook_resid_pre",
            "model": d.model or "unknown", "alpha": repr(float(alpha))}
    _check_out(Path(path))
    return save_tensors(Path(path), {f"layer_activations.{d.block}": v}, meta)


def load_steering_vector(path: str | Path):
    """The ``steering_vectors.SteeringVector`` of a file written by :func:`write_steering_vectors`
    (apply it with ``with sv.apply(hf_model, multiplier=...):``)."""
    from safetensors import safe_open
    from steering_vectors import SteeringVector

    from refusal_lab.artifacts import load_tensors

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "steering-vectors":
        raise ConfigError(f"{path} is not a steering-vectors file written by refusal-lab export-direction.")
    acts = {int(k.split(".", 1)[1]): v for k, v in load_tensors(Path(path)).items() if k.startswith("layer_activations.")}
    return SteeringVector(layer_activations=acts, layer_type=meta.get("layer_type", "decoder_block"))


def to_steering_vector(d: RunDirection, alpha: float = 1.0):
    """The direction as a ``steering_vectors.SteeringVector`` in memory."""
    from steering_vectors import SteeringVector

    _check_block(d, "steering-vectors")
    return SteeringVector(layer_activations={d.block: float(alpha) * d.vector.detach().to(torch.float32)},
                          layer_type="decoder_block")


def export_direction(d: RunDirection, fmt: str, out: str | Path, alpha: float = 1.0) -> Path:
    """Write ``d`` in format ``fmt`` (one of :data:`FORMATS`) to ``out``."""
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}.")
    if fmt == "steering-vectors":
        return write_steering_vectors(out, d, alpha)
    return write_control_vector_gguf(out, d, alpha, fmt=fmt)


# ------------------------------------------------------------------ the abliterated model as GGUF

def source_gguf_of(model_arg: str | None):
    """How ``--gguf`` finds the GGUF the model was converted from: ``("file", path)`` for a
    ``.gguf`` file, ``("offline", OfflineModel)`` for an offline model (re-assembled from its
    parts, as the cache keeps only the dequantized folder); ConfigError for any other model."""
    from refusal_lab.models.offline import get_offline_model

    if model_arg is not None and str(model_arg).lower().endswith(".gguf"):
        path = Path(model_arg).expanduser()
        if not path.is_file():
            raise ConfigError(f"--model {model_arg} does not exist.")
        return "file", path
    if model_arg is None or not Path(str(model_arg)).expanduser().exists():
        found = get_offline_model(model_arg)
        if found is not None:
            return "offline", found
    raise ConfigError(f"--gguf needs a model that came from a GGUF file (the offline default, an offline model's name "
                      f"or --model FILE.gguf), not {model_arg}; convert the saved folder with llama.cpp's "
                      "convert_hf_to_gguf.py instead.")


def write_abliterated_gguf(source: str | Path, out: str | Path, model, dtype: str = "f16") -> Path:
    """The orthogonalised ``model`` as a GGUF llama.cpp loads: the metadata (tokenizer, chat
    template, hyper-parameters) and every tensor abliteration leaves alone are copied byte for byte
    from ``source`` (the GGUF the model was dequantized from, so they keep its quantization); the
    edited ones (``token_embd``, every ``attn_output`` and ``ffn_down``, and ``output`` once the
    tied head is untied) are written in ``dtype`` (f16 or f32) under the names llama.cpp's loader
    uses (gguf's own HF -> GGUF name map, the reverse of transformers' GGUF loader)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = reader.get_field("general.architecture").contents()
    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise ConfigError(f"{source} has architecture {arch!r}, which the gguf package cannot name tensors for.")
    a = model.adapter
    edited_modules = [a.embed_tokens, a.lm_head]
    for l in range(a.n_layers):
        edited_modules += [a.o_proj(l), a.mlp(l).down_proj]
    edited_ids = {id(p) for mod in edited_modules for p in mod.parameters(recurse=False)}
    names = gguf.get_tensor_name_map(archs[arch], a.n_layers)
    np_dtype = {"f16": np.float16, "f32": np.float32}[dtype]
    new: dict[str, np.ndarray] = {}
    for hf_name, p in model.hf_model.named_parameters(remove_duplicate=False):
        if id(p) not in edited_ids:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"No GGUF tensor name for {hf_name} ({arch}); --gguf cannot write this model.")
        new[name] = p.detach().to("cpu", torch.float32).numpy().astype(np_dtype)
    old = {t.name: t for t in reader.tensors}
    for name, arr in new.items():
        if name in old and tuple(int(n) for n in old[name].shape[::-1]) != arr.shape:
            raise ConfigError(f"{name} has shape {tuple(old[name].shape[::-1])} in {source} but {arr.shape} in the "
                              "model; the GGUF is not the one the model came from.")

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name == "general.architecture" or field.name.startswith("GGUF."):
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        order = [t.name for t in reader.tensors] + [n for n in new if n not in old]
        for name in order:
            if name in new:
                w.add_tensor_info(name, new[name].shape, new[name].dtype, new[name].nbytes)
            else:
                t = old[name]
                w.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name in order:
            w.write_tensor_data(new[name] if name in new else old[name].data)
        w.close()

    return _atomic(Path(out), write)
