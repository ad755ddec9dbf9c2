"""Silencing every progress bar of a model load (``load_model(progress=False)``, ``--quiet``).

A load draws bars from three places that no single switch reaches: transformers ("Loading
weights"), the hub's downloads, and the GGUF dequantization, which transformers draws with a plain
``tqdm`` of its own. :func:`progress_bars` turns all three off for the duration of a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled=False``, silence every progress bar of a model load for the duration.

    That is transformers' own bars (``transformers.utils.logging.tqdm``: "Loading weights"),
    the hub's download bars, and the GGUF "Converting and de-quantizing GGUF tensors" bar, which
    ``transformers.modeling_gguf_pytorch_utils`` draws with plain ``tqdm.auto.tqdm``, untouched by
    ``disable_progress_bar()``, so its module-level ``tqdm`` is swapped for a disabled one while
    the block runs. Everything is restored afterwards (nesting is fine). ``enabled=True`` changes
    nothing, so a global ``disable_progress_bar()`` or ``HF_HUB_DISABLE_PROGRESS_BARS`` still
    holds. The swap is process-wide: a load in another thread meanwhile is silenced as well.
    """
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as tlog

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - transformers without its GGUF module
        gguf_utils = None
    was_enabled = tlog.is_progress_bar_enabled()
    hub_was_disabled = hub_utils.are_progress_bars_disabled()
    original = getattr(gguf_utils, "tqdm", None)

    def disabled_tqdm(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return original(*args, **kwargs)

    tlog.disable_progress_bar()  # also disables the hub's bars
    if original is not None:
        gguf_utils.tqdm = disabled_tqdm
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            tlog.enable_progress_bar()  # re-enables the hub's bars too
        if hub_utils.are_progress_bars_disabled() != hub_was_disabled:
            (hub_utils.disable_progress_bars if hub_was_disabled else hub_utils.enable_progress_bars)()
