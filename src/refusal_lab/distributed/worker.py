"""One worker's side of a distributed patching sweep (no Ray import here: testable in-process).

A :class:`ShardWorker` loads one model copy with the driver's loading arguments, builds the run's
inputs as the driver does (:class:`~refusal_lab.run.inputs.RunInputs`: prompts, tokens, metric,
receivers and source caches, without a run folder), checks they are the driver's
(:func:`inputs_fingerprint`), and computes grid shards with the same engine as a single-process run.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import torch

from refusal_lab.errors import RefusalLabError
from refusal_lab.patching.engine import GridSpec, patch_grid


def inputs_fingerprint(inputs) -> str:
    """Hash of everything a shard's values depend on besides the weights: the token ids and masks
    of both sides, the metric (refusal/compliance ids) and the patched columns."""
    h = hashlib.sha256()
    h.update(json.dumps([repr(inputs.metric), inputs.cols, inputs.model.cfg.n_layers, inputs.model.cfg.n_heads]).encode())
    for side in ("harmful", "harmless"):
        b = inputs.batches[side]
        for t in (b.ids, b.mask):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def portable_config(config: dict) -> dict:
    """The run config with local file paths (model folder, object list) made absolute, so a worker
    whose working directory differs finds the same files (on a shared or identical filesystem)."""
    out = dict(config)
    for key in ("model", "objects"):
        v = out.get(key)
        if isinstance(v, str) and Path(v).exists():
            out[key] = str(Path(v).resolve())
    return out


class ShardWorker:
    """Holds one model copy and the run's inputs; :meth:`patch` computes one grid shard."""

    def __init__(self, load_kwargs: dict, config: dict, fingerprint: str):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.node = socket.gethostname()
        self.pid = os.getpid()
        # A user-facing error is kept and raised by info(): a Ray task error carries the exception
        # itself (so the driver can print its sentence), an actor that died in __init__ does not.
        self.error: RefusalLabError | None = None
        try:
            self._setup(load_kwargs, config, fingerprint)
        except RefusalLabError as e:
            self.error = e

    def _setup(self, load_kwargs: dict, config: dict, fingerprint: str) -> None:
        from refusal_lab.models.loading import load_model
        from refusal_lab.run.config import RunConfig
        from refusal_lab.run.inputs import RunInputs

        t0 = time.perf_counter()
        cfg = RunConfig.from_dict(config, where="the driver's config")
        model = load_model(cfg.model, **load_kwargs)
        self.inputs = RunInputs(model, cfg)
        self.load_seconds = time.perf_counter() - t0
        if inputs_fingerprint(self.inputs) != fingerprint:
            raise RefusalLabError(
                f"A worker on {self.node} built different prompts or tokens than the driver; make the same model, "
                "object list and refusal-lab version available at the same path on every node."
            )

    def info(self) -> dict:
        if self.error is not None:
            raise self.error
        return {"node": self.node, "pid": self.pid, "device": str(self.inputs.model.device),
                "threads": torch.get_num_threads(), "load_seconds": round(self.load_seconds, 3)}

    def patch(self, source: str, receiver: str, spec: GridSpec) -> tuple[torch.Tensor, float]:
        """Per-pair values ``[n_pairs, *spec.shape]`` of the shard ``spec`` and the seconds it took."""
        t0 = time.perf_counter()
        inputs = self.inputs
        vals = patch_grid(inputs.model, inputs.receiver(receiver), inputs.source_cache(source), spec, inputs.metric,
                          max_rows=inputs.cfg.max_rows, progress=False)
        return vals.cpu(), time.perf_counter() - t0
