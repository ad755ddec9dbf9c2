"""A rough, deliberately modest estimate of a run's memory, checked before the first step."""

from __future__ import annotations

import os

import torch

from refusal_lab.errors import RefusalLabError

GiB = 1024**3


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.hf_model.parameters())


def estimate_run_memory(model, n_pairs: int, seq_len: int, max_rows: int, sides: int = 2) -> int:
    """Bytes a run needs: the weights, the receiving runs' caches (residual before every layer and
    keys/values per layer, per side), the source caches of the patched sites (resid_pre/post,
    attn_out, mlp_out and per-head z at every layer, per side) and one batch's activations."""
    c = model.cfg
    L, T, d = c.n_layers, seq_len, c.d_model
    b = torch.empty((), dtype=model.dtype).element_size()
    inter = getattr(model.hf_model.config, "intermediate_size", None) or 4 * d
    kv = 2 * c.n_key_value_heads * c.d_head
    receiver = L * n_pairs * T * (d + kv) * b
    source = L * n_pairs * T * (4 * d + c.n_heads * c.d_head) * b
    batch = max_rows * T * (d + inter) * b
    return weight_bytes(model) + sides * (receiver + source) + batch


def available_memory(device: torch.device | str) -> int | None:
    """Free bytes on ``device`` (None where unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_run_memory(model, n_pairs: int, seq_len: int, max_rows: int, sides: int = 2) -> int:
    """Raise a RefusalLabError when the run clearly does not fit; returns the estimate in bytes.

    The weights are already loaded (free memory excludes them), so only the rest is compared."""
    need = estimate_run_memory(model, n_pairs, seq_len, max_rows, sides)
    free = available_memory(model.device)
    if free is not None and need - weight_bytes(model) > free:
        raise RefusalLabError(
            f"This run needs about {need / GiB:.1f} GiB ({(need - weight_bytes(model)) / GiB:.1f} GiB beyond the "
            f"loaded weights) but only {free / GiB:.1f} GiB are free on {model.device}; use --dtype bfloat16, "
            "fewer objects, or a smaller max_rows."
        )
    return need
