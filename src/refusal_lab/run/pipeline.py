"""``refusal-lab run``: the Arditi & Obeso / Gemma 2 replication and the refusal direction, end to
end, as a list of steps (:data:`STEPS`; each in its own module under ``run/steps/``).

Each step is a function from the inputs and the earlier steps' records to its own record, stored
as ``steps/<name>.json`` the moment it finishes and reused when the run is started again, so a
killed run resumes where it stopped. Then ``results.json`` is assembled from the records (each step
publishes its sections), with tidy tables (``tables/*.csv``), figures and ``report.html``.
Pairing: harmful object i is paired with harmless object i (as in the original).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from refusal_lab import __version__
from refusal_lab.artifacts import write_json
from refusal_lab.models.hooked import HookedChatModel
from refusal_lab.run.config import RunConfig
from refusal_lab.run.findings import findings
from refusal_lab.run.folder import RunFolder, profile, seconds
from refusal_lab.run.inputs import RunInputs
from refusal_lab.run.results import SCHEMA_VERSION
from refusal_lab.run.step import RunContext, Step
from refusal_lab.run.steps import (
    attribution, baseline, direction, dla, evaluation, geometry, heads, patch, sanity, steering,
)
from refusal_lab.run.tables import write_tables


def step_list(cfg: RunConfig) -> list[Step]:
    """The steps the config asks for, in order."""
    steps = [
        baseline.STEP,       # metric and next tokens on every object prompt
        sanity.STEP,         # does the metric separate harmful from harmless? (--strict stops here)
        dla.STEP,            # direct logit attribution
        *patch.steps(cfg),   # exact activation patching, one step per grid and direction
        attribution.STEP,    # attribution patching (AtP, AtP*) and its agreement with the exact grids
        heads.STEP,          # refusal heads, their joint sufficiency, patched generations
        direction.STEP,      # the refusal direction on instruction train/val splits
        steering.STEP,       # alpha sweeps of the direction and the object/heads vectors
        evaluation.STEP,     # held-out test refusal rates, KL and CE damage
        geometry.STEP,       # the direction's separation, cosines, k-dim subspace check, heads -> direction
    ]
    return [s for s in steps if s.enabled(cfg)]


class Pipeline:
    """Runs the steps of one config on one loaded model into one folder."""

    def __init__(self, model: HookedChatModel, config: RunConfig, out: Path, force: bool = False,
                 progress: bool = True, executor=None, strict: bool = False):
        """``executor`` (e.g. :class:`refusal_lab.distributed.RayExecutor`) computes the ``patch_*``
        grids instead of this process. ``strict``: stop after the baseline (:class:`RefusalLabError`)
        when the sanity gate finds that the metric does not separate harmful from harmless prompts."""
        inputs = RunInputs(model, config)
        # Only after every input is validated: a run that failed on bad input leaves no config guard behind.
        self.ctx = RunContext(inputs, RunFolder(out, config, force), progress=progress, executor=executor,
                              strict=strict)
        self.steps = step_list(config)

    def run(self) -> dict:
        """Every step (finished ones are read back), then results.json, tables, figures and the report."""
        t_all = time.perf_counter()
        ctx = self.ctx
        resumed = set()
        for step in self.steps:
            compute = lambda: step.compute(ctx)  # noqa: E731
            if step.stored and ctx.folder.done(step.name) is not None:
                resumed.add(step.name)
            ctx.records[step.name] = ctx.folder.run_step(step.name, compute) if step.stored else compute()
        results = assemble(ctx, self.steps)
        results["profile"] = {s.name: dict(profile(ctx.records[s.name]), resumed=s.name in resumed)
                              for s in self.steps if s.stored and profile(ctx.records[s.name]) is not None}
        results["timings"]["total"] = time.perf_counter() - t_all
        root = ctx.folder.root
        write_json(root / "results.json", results)
        write_tables(ctx, results["patching"])
        write_report(root)
        return results


def header(inputs: RunInputs) -> dict:
    """The results' first sections: what was run on what (model, config, versions, prompts, tokens)."""
    m, p, cfg = inputs.model, inputs.prompts, inputs.cfg
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": m.cfg.model_name, "model_type": m.cfg.model_type, "n_layers": m.cfg.n_layers,
                  "n_heads": m.cfg.n_heads, "d_model": m.cfg.d_model, "d_head": m.cfg.d_head, "dtype": m.cfg.dtype,
                  "device": m.cfg.device},
        "config": cfg.as_dict(),
        "versions": versions(),
        "seed": cfg.seed,
        "prompts": {"template": p.template, "mode": p.mode,
                    "pairing": "harmful object i is paired with harmless object i (as in Arditi & Obeso)",
                    "example": p.harmful_texts[0], "seq_len": p.seq_len},
        "objects": {"harmful": p.harmful_objects, "harmless": p.harmless_objects, "dropped": p.dropped},
        "tokens": {"refusal": {"str": inputs.tokens.refusal_str, "id": inputs.tokens.refusal_id},
                   "compliance": {"str": inputs.tokens.compliance_str, "id": inputs.tokens.compliance_id}},
        "token_choice": {"chosen_by": "auto" if inputs.token_candidates is not None else "config",
                         "refusal": "auto" if cfg.refusal == "auto" else "config",
                         "compliance": "auto" if cfg.compliance == "auto" else "config",
                         "candidates": inputs.token_candidates},
        "positions": [{"index": c, "label": p.positions[c].label, "token": p.positions[c].token} for c in inputs.cols],
        "patching": {},
    }


def assemble(ctx: RunContext, steps: list[Step]) -> dict:
    """results.json from the finished records: the header, each step's sections, timings, findings."""
    results = header(ctx.inputs)
    for step in steps:
        if step.publish is not None:
            merge_into(results, step.publish(ctx))
    results["timings"] = {s.name: seconds(ctx.records[s.name]) for s in steps if s.stored}
    results["findings"] = findings(results)
    return results


def merge_into(tree: dict, part: dict) -> None:
    """Merge ``part`` into ``tree`` in place (nested dicts merged key by key)."""
    for k, v in part.items():
        if isinstance(v, dict) and isinstance(tree.get(k), dict):
            merge_into(tree[k], v)
        else:
            tree[k] = v


def versions() -> dict:
    import transformers

    return {"refusal_lab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def write_report(root: Path) -> None:
    """Figures and report.html from the folder's results.json (what ``refusal-lab report`` also does)."""
    from refusal_lab.report import write_figures, write_report as write_html

    write_figures(root, root / "figures")  # both read results.json through the schema check
    write_html(root)
