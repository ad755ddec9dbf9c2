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


def model_devices(model) -> list[torch.device]:
    """The distinct devices holding the model's parameters (several with ``device_map='auto'``)."""
    seen: dict[str, torch.device] = {}
    for p in model.hf_model.parameters():
        seen.setdefault(str(p.device), p.device)
    return list(seen.values())


def available_memory(device: torch.device | str) -> int | None:
    """Free bytes on ``device`` (None where unknown).

    CUDA: what the driver reports free plus what PyTorch's caching allocator holds but does not
    use (reserved - allocated), since our own tensors can reuse that."""
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        free = int(torch.cuda.mem_get_info(device)[0])
        return free + max(0, int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)))
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


# ---------------------------------------------------------------------------------- batch size
#: the cap on patched rows per cone batch when it is derived from free memory
MAX_AUTO_ROWS = 1024
#: the share of the free memory one cone batch may use (the rest: allocator slack, fragmentation)
AUTO_FRACTION = 0.5


def row_activation_bytes(model, seq_len: int, *, keep_states: bool = False) -> int:
    """Peak bytes one patched row adds to a cone batch of the patching engine.

    The engine runs a batch one layer at a time, so one layer's temporaries count, at the worst
    case of a row starting at column 0 (q = k = ``seq_len``): the residual and its copies (input,
    normed, attention output, sum, hook clones: 5 d), queries/keys/values and the GQA-expanded
    keys/values plus z (``(h + 2 kv) dh + 3 h dh``), the MLP's gate/up/product (3 × intermediate),
    the attention scores and their softmax (2 h T), the gathered key/value prefix of the receiver
    and its concatenation (4 kv dh per column), and at the last column the unembedding rows of the
    metric in float64 (log-odds: the whole vocabulary, 24 bytes per entry). ``keep_states``: the row
    also keeps its residual entering every layer (cumulative trunks: L d per column). Doubled for
    safety: PyTorch keeps a few more temporaries alive than this count."""
    c = model.cfg
    T, d, h, kvh, dh = int(seq_len), c.d_model, c.n_heads, c.n_key_value_heads, c.d_head
    b = torch.empty((), dtype=model.dtype).element_size()
    inter = getattr(model.hf_model.config, "intermediate_size", None) or 4 * d
    per_col = 5 * d + (h + 2 * kvh) * dh + 3 * h * dh + 3 * inter + 2 * h * T + 4 * kvh * dh
    if keep_states:
        per_col += c.n_layers * d
    return 2 * (b * T * per_col + 24 * c.d_vocab)


def rows_that_fit(free_bytes: int | None, per_row_bytes: int, *, fraction: float = AUTO_FRACTION,
                  cap: int = MAX_AUTO_ROWS, unknown: int = 256) -> int:
    """How many rows of ``per_row_bytes`` fit in ``fraction`` of ``free_bytes`` (at least 1, at most
    ``cap``; ``unknown`` when the free memory is not known). Pure arithmetic."""
    if free_bytes is None:
        return min(unknown, cap)
    return int(max(1, min(cap, (fraction * max(0, free_bytes)) // max(1, per_row_bytes))))


def auto_max_rows(model, seq_len: int, *, keep_states: bool = False, free_bytes: int | None = None,
                  fraction: float = AUTO_FRACTION, cap: int = MAX_AUTO_ROWS) -> int:
    """Patched rows per cone batch that fit in the free memory of every device holding a layer
    (the batch visits each of them in turn; the least free one decides). ``free_bytes`` overrides
    the measurement. The engine still halves the batch on an out-of-memory error."""
    if free_bytes is None:
        frees = [available_memory(dev) for dev in model_devices(model)]
        known = [f for f in frees if f is not None]
        free_bytes = min(known) if known else None
    return rows_that_fit(free_bytes, row_activation_bytes(model, seq_len, keep_states=keep_states),
                         fraction=fraction, cap=cap)
