"""The inputs every step reads, built once from (model, config): object prompts and their batches,
the refusal/compliance tokens and metric, the patched columns, the receivers and source caches,
the grid specs, the judge and the steering settings.

The driver and every Ray worker build this same object (a worker: ``RunInputs(model, config)``),
so a shard computes exactly the cells the driver would. Building it validates every input that
could fail later (position labels, memory) before any run folder is touched.
"""

from __future__ import annotations

import torch

from refusal_lab.memory import check_run_memory
from refusal_lab.metrics import propose_token_pair, resolve_refusal_tokens, resolve_single_token
from refusal_lab.models.hooked import HookedChatModel
from refusal_lab.patching.engine import Batch, GridSpec, LogitDiff, Receiver
from refusal_lab.prompts import build_object_prompts, load_objects
from refusal_lab.run.config import RunConfig

SIDES = ("harmful", "harmless")
CACHED_SITES = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_z")
"""The source activations any grid patches in (one cache per side serves every grid)."""


class RunInputs:
    """Prompts, tokens, metric and cached activations of one run on one loaded model."""

    def __init__(self, model: HookedChatModel, config: RunConfig):
        torch.manual_seed(config.seed)
        self.model = model
        self.cfg = config
        tok = model.tokenizer
        self.objects = load_objects(config.objects)
        self.prompts = build_object_prompts(tok, self.objects, template=config.template, mode=config.mode)
        dev = model.device
        self.batches = {s: Batch(self.prompts.ids(s).to(dev), self.prompts.mask(s).to(dev)) for s in SIDES}
        self.token_candidates = None
        if "auto" in (config.refusal, config.compliance):
            # `auto`: propose the token(s) from the model's own next tokens on the two sets; a side
            # given explicitly (`--refusal Sorry --compliance auto`) is kept, only the other is proposed
            fixed = {k: None if v == "auto" else (resolve_single_token(tok, v), v)
                     for k, v in (("refusal", config.refusal), ("compliance", config.compliance))}
            with torch.no_grad():
                last = {s: model(b.ids, b.mask, logits="last") for s, b in self.batches.items()}
            self.tokens, self.token_candidates = propose_token_pair(tok, last["harmful"], last["harmless"], **fixed)
        else:
            self.tokens = resolve_refusal_tokens(tok, config.refusal, config.compliance)
        self.metric = LogitDiff(self.tokens.refusal_id, self.tokens.compliance_id)
        self.cols = list(range(self.prompts.obj_index, self.prompts.seq_len))
        if "heads" in config.grids:
            self.prompts.resolve_positions(config.heads_position)  # a bad label fails now, not after the grids
        if config.steering:
            self.prompts.resolve_positions(config.steering_object_position)
        # A run that clearly does not fit in memory fails now, not hours later.
        check_run_memory(model, len(self.prompts.harmful_objects), self.prompts.seq_len, config.max_rows,
                         sides=len(config.directions))
        self._receivers: dict[str, Receiver] = {}
        self._caches: dict[str, dict] = {}
        self._judge = None

    @property
    def n_pairs(self) -> int:
        return len(self.prompts.harmless_objects)

    def col_labels(self) -> list[str]:
        """Labels of the patched columns: ``obj``, then ``<label> '<token>'``."""
        pos = self.prompts.positions
        return [f"{pos[c].label} {pos[c].token!r}" if pos[c].label != "obj" else "obj" for c in self.cols]

    def receiver(self, side: str) -> Receiver:
        """The clean run of ``side`` that patches are written into (recorded once)."""
        if side not in self._receivers:
            self._receivers[side] = Receiver.record(self.model, self.batches[side], self.metric)
        return self._receivers[side]

    def source_cache(self, side: str) -> dict[str, torch.Tensor]:
        """The activations of ``side`` that patches read (one forward, every patchable site)."""
        if side not in self._caches:
            b = self.batches[side]
            keep = lambda n: n.endswith(CACHED_SITES)  # noqa: E731
            self._caches[side] = self.model.run_with_cache(b.ids, b.mask, names=keep, logits="none")[1]
        return self._caches[side]

    def grid_spec(self, grid: str) -> GridSpec:
        """Which cells a grid patches: every layer x the object..last columns (heads: x heads at one position)."""
        L, H = self.model.cfg.n_layers, self.model.cfg.n_heads
        if grid == "heads":
            return GridSpec(grid, list(range(L)), self.prompts.resolve_positions(self.cfg.heads_position), list(range(H)))
        return GridSpec(grid, list(range(L)), self.cols)

    def judge(self):
        """The refusal judge named by ``config.judge``: substrings, the model itself, or another chat model."""
        from refusal_lab.steering.evaluation import ChatModelJudge, SubstringJudge

        name = self.cfg.judge
        if name == "substring":
            return SubstringJudge()
        if self._judge is None:
            if name == "self":
                self._judge = ChatModelJudge(self.model)
            else:
                from refusal_lab.models.loading import load_model

                self._judge = ChatModelJudge(load_model(name, dtype=self.cfg.dtype, device=self.cfg.device))
        return self._judge

    def steering_settings(self):
        """The steering steps' settings (sizes, alphas, filters, judge) from the run config."""
        from refusal_lab.steering.pipeline import SteeringSettings

        c = self.cfg
        return SteeringSettings(n_train=c.steering_n_train, n_val=c.steering_n_val, n_test=c.steering_n_test,
                                alphas=c.steering_alphas, object_alphas=c.steering_object_alphas,
                                max_new_tokens=c.steering_tokens, kl_max=c.kl_max, max_layer_frac=c.max_layer_frac,
                                seed=c.seed, judge=self.judge(), judge_name=c.judge,
                                exhaustive=c.steering_exhaustive, top_k=c.steering_top_k)
