"""The typed, versioned schema of a run's ``results.json``, and the one reader that checks it.

``refusal-lab run`` writes ``results.json``; the report, ``refusal-lab compare`` and anything
downstream read it through :func:`read_results`, which refuses a file of another
``schema_version`` and a file that lacks a required key or holds a value of the wrong kind, each
with one sentence (:class:`ResultsError`). Readers can therefore use every field the schema
guarantees directly and test only the ``NotRequired`` ones (sections a run may skip: the heads,
the steering steps, the necessity direction, attribution patching, distributed bookkeeping).

The schema is written down here, as nested TypedDicts, because the file is assembled by several
steps; it describes what they write, it does not build it. Change it together with the step that
writes the field, and bump :data:`SCHEMA_VERSION` when a field is renamed, removed or changes
meaning (adding a ``NotRequired`` field needs no bump).

Conventions: a :data:`Real` is a measured number — a JSON number, or null where it was NaN or
infinite (``artifacts.write_json`` stores those as null); a plain ``float`` never is null. Keys the
schema does not name are allowed (the reader ignores them).
"""

import functools
import json
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, cast, get_args, get_origin

from refusal_lab.errors import RefusalLabError

if sys.version_info >= (3, 11):
    from typing import NotRequired, TypedDict, get_type_hints, is_typeddict
else:  # pragma: no cover - Python 3.10 (typing_extensions comes with torch)
    from typing_extensions import NotRequired, TypedDict, get_type_hints, is_typeddict

__all__ = ["SCHEMA_VERSION", "GRID_NAMES", "Results", "ResultsError", "read_results"]

SCHEMA_VERSION = 1
"""The version this code writes and reads."""

Real = Union[float, None]
"""A measured number: JSON number, or null where the value was NaN or infinite."""
Matrix = list[list[Real]]
"""A ``[rows][cols]`` grid of numbers (layers x positions, or layers x heads)."""
Interval = tuple[Real, Real]
"""A 95 % interval ``[low, high]``."""


class ResultsError(RefusalLabError):
    """``results.json`` is missing, unreadable, of another schema version, or not shaped as the schema says."""


# ------------------------------------------------------------------------------------- run identity
Model = TypedDict("Model", {"name": str, "model_type": str, "n_layers": int, "n_heads": int, "d_model": int,
                           "d_head": int, "dtype": str, "device": str})
"""The loaded model's architecture and where it ran."""
Versions = TypedDict("Versions", {"refusal_lab": str, "torch": str, "transformers": str, "python": str})
"""Package versions of the run (they differ between machines, not between code versions)."""
Prompts = TypedDict("Prompts", {"template": str, "mode": str, "pairing": str, "example": str, "seq_len": int})
"""The object prompts: template, tokenization mode, pairing rule, one chat-formatted example, length."""
DroppedObject = TypedDict("DroppedObject", {"object": str, "side": str, "reason": str})
"""An object left out of the pairs, and why."""
Objects = TypedDict("Objects", {"harmful": list[str], "harmless": list[str], "dropped": list[DroppedObject]})
"""The paired objects (harmful i with harmless i) and the dropped ones."""
Token = TypedDict("Token", {"str": str, "id": int})
"""One metric token: its text and vocabulary id."""
Tokens = TypedDict("Tokens", {"refusal": Token, "compliance": Token})
"""The metric's tokens: logit[refusal] - logit[compliance]."""
TokenCandidate = TypedDict("TokenCandidate", {"side": str, "token_id": int, "token": str, "harmful_logprob": Real,
                                             "harmless_logprob": Real, "diff": Real, "chosen": bool})
"""One top-k token considered by ``--refusal auto`` / ``--compliance auto``."""
TokenChoice = TypedDict("TokenChoice", {"chosen_by": str, "refusal": str, "compliance": str,
                                       "candidates": Union[list[TokenCandidate], None]})
"""How the metric tokens were chosen ("auto" or "config", per side) and the auto candidates."""
Position = TypedDict("Position", {"index": int, "label": str, "token": str})
"""A prompt column the grids patch: its index, label (obj, post_obj, eoi, last) and token."""

# --------------------------------------------------------------------------------- baseline and DLA
LogOdds = TypedDict("LogOdds", {"harmful": dict[str, Real], "harmless": dict[str, Real], "harmful_mean": Real,
                               "harmless_mean": Real})
"""Refusal log-odds (refusal-onset tokens vs the rest) per object (object -> value) and side means."""
TopNextTokens = TypedDict("TopNextTokens", {"harmful": list[tuple[str, Real]],
                                           "harmless": list[tuple[str, Real]]})
"""The ten most likely next tokens per side, ``[token, mean probability]``."""
Baseline = TypedDict("Baseline", {"metric": str, "harmful": dict[str, float], "harmless": dict[str, float],
                                 "harmful_mean": float, "harmless_mean": float, "log_odds": LogOdds,
                                 "top_next_tokens": TopNextTokens})
"""The unpatched metric per object (object -> value) and its side means: the normalisation's 1 and 0."""
DlaComponents = TypedDict("DlaComponents", {"labels": list[str], "harmful_mean": list[Real],
                                           "harmless_mean": list[Real]})
"""Direct logit attribution of each component (embed, every attn and mlp), side means."""
DlaHeads = TypedDict("DlaHeads", {"rows": list[int], "cols": list[int], "harmful_mean": Matrix,
                                 "harmless_mean": Matrix})
"""Direct logit attribution of every head (layers x heads), side means."""
Dla = TypedDict("Dla", {"scale": str, "labels": list[str], "harmful_mean": list[Real], "harmless_mean": list[Real],
                       "components": DlaComponents, "heads": DlaHeads})
"""Direct logit attribution at the last position: accumulated residual stream, components, heads."""

# ------------------------------------------------------------------------------------------- sanity
SanityGap = TypedDict("SanityGap", {"mean": Real, "se": Real, "ci95": Interval, "n_pairs": int})
"""The mean paired gap harmful i - harmless i on the metric, its SE and bootstrap interval."""
OnsetFraction = TypedDict("OnsetFraction", {"value": Real, "k": int, "n": int, "ci95": Interval,
                                           "onset_tokens": list[str]})
"""The fraction of harmful prompts whose top next token is a refusal onset (Wilson interval)."""
TokenProbability = TypedDict("TokenProbability", {"token": str, "id": int, "mean_prob": Real})
"""A token and its mean next-token probability on harmful prompts."""
Sanity = TypedDict("Sanity", {"metric": str, "gap": SanityGap, "refusal_onset_fraction": OnsetFraction,
                             "refusal_token": TokenProbability, "top_refusal_onset": TokenProbability,
                             "separates": bool, "rule": str, "sentence": str, "token_note": Union[str, None],
                             "token_note_rule": str})
"""The sanity gate: does the metric separate harmful from harmless prompts at all (and is its token likely)?"""

# ----------------------------------------------------------------------------------------- patching
GridInterval = TypedDict("GridInterval", {"low": Matrix, "high": Matrix})
"""Per-cell bootstrap 95 % interval over pairs."""
_GRID = {"rows": list[int], "cols": list[Union[str, int]], "values": Matrix, "se": Matrix, "ci95": GridInterval,
         "n_pairs": int, "direction": Literal["harmful->harmless", "harmless->harmful"],
         "method": Literal["exact", "attribution"], "normalisation": str, "interpretable": bool}
Grid = TypedDict("Grid", _GRID)
"""One patching grid, normalised (0 = harmless baseline, 1 = harmful baseline), mean over pairs, with
per-cell SE, bootstrap interval and pair count; rows are layers, columns positions (labels) or heads."""
AttributionGrid = TypedDict("AttributionGrid", {**_GRID, "variant": Literal["AtP", "AtP*"],
                                               "values_plain": NotRequired[Matrix]})
"""A :data:`Grid` by attribution patching (AtP; AtP* on the heads, with plain AtP's values beside it)."""
_AGREEMENT = {"spearman": Real, "top_k": int, "top_k_overlap": Real, "variant": str}
PlainAgreement = TypedDict("PlainAgreement", _AGREEMENT)
"""Spearman rank correlation and top-k overlap of an attribution grid with the exact one."""
Agreement = TypedDict("Agreement", {**_AGREEMENT, "plain": NotRequired[PlainAgreement]})
"""A :data:`PlainAgreement`; for an AtP* grid also plain AtP's (``plain``)."""
GRID_NAMES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn_out_cumulative", "mlp_out_cumulative", "heads")
"""The grids a run can patch, in the order the report shows them (the grid keys of :data:`Patching`)."""
Patching = TypedDict("Patching", {"resid_pre": NotRequired[Grid], "resid_post": NotRequired[Grid],
                                 "attn_out": NotRequired[Grid], "mlp_out": NotRequired[Grid],
                                 "attn_out_cumulative": NotRequired[Grid], "mlp_out_cumulative": NotRequired[Grid],
                                 "heads": NotRequired[Grid], "necessity": NotRequired[dict[str, Grid]],
                                 "attribution": NotRequired[dict[str, AttributionGrid]],
                                 "agreement": NotRequired[dict[str, Agreement]]})
"""Exact patching grids harmful -> harmless (sufficiency) by name; those of the reverse direction under
``necessity``; attribution grids and their agreement with the exact ones."""

# -------------------------------------------------------------------------------------------- heads
HeadScore = TypedDict("HeadScore", {"layer": int, "head": int, "value": Real})
"""One head's patching effect (normalised) at the heads position."""
Generation = TypedDict("Generation", {"object": str, "baseline": str, "patched": str})
"""A harmless prompt's greedy completion, unpatched and with the refusal heads patched in."""
Heads = TypedDict("Heads", {"threshold": float, "position": Union[str, int], "cols": list[int],
                           "selected": list[HeadScore], "ranked": list[HeadScore], "sufficiency": Real,
                           "sufficiency_se": Real, "sufficiency_ci95": Union[Interval, None], "n_pairs": int,
                           "generations": list[Generation], "interpretable": bool})
"""Refusal heads: those above the threshold, the top 20, their joint sufficiency (null when no head
passed) with SE and bootstrap interval, and patched generations."""

# ---------------------------------------------------------------------------------------- direction
DirectionBaseline = TypedDict("DirectionBaseline", {"harmful_val_log_odds": Real, "harmless_val_log_odds": Real})
"""Mean refusal log-odds of the unsteered val instructions."""
DirectionFilters = TypedDict("DirectionFilters", {"kl_max": Union[float, None], "max_layer_frac": float,
                                                 "induce_min": Union[float, None], "stage": str})
"""The filters the chosen candidate passed (null: dropped by the fallback) and the stage that chose it."""
SideCounts = TypedDict("SideCounts", {"harmful": int, "harmless": int})
"""Instructions used per side."""
Candidate = TypedDict("Candidate", {"layer": int, "position": int, "norm": Real, "bypass": Real, "induce": Real,
                                   "kl": Real, "kept": bool, "reason": str, "bypass_estimate": NotRequired[Real],
                                   "kl_prompts": NotRequired[int]})
"""One difference-in-means candidate (layer x end-of-instruction column) scored on val (null: not
scored, ``reason`` says why), its first-order bypass estimate and, in the top_k mode, the harmless
prompts its ``kl`` covers (fewer than all: ``kl`` is a lower bound that already fails ``kl_max``)."""
SelectionForwards = TypedDict("SelectionForwards", {"bypass": Real, "kl": Real, "induce": Real, "estimate": Real,
                                                   "total": Real})
"""The scoring's model work in prompt-forwards (one prompt through every layer; the induce cones by
the layers they ran, the estimate's forward + backward as three)."""
Selection = TypedDict("Selection", {"mode": str, "top_k": int, "n_candidates": int, "n_eligible": int,
                                   "n_scored": dict[str, int], "n_forwards": SelectionForwards,
                                   "spearman_estimate_exact": Union[float, None], "n_spearman": int,
                                   "chosen_estimate_rank": Union[int, None], "chosen_in_top_k": Union[bool, None],
                                   "top_k_agrees": NotRequired[Union[bool, None]]})
"""How the candidates were scored (``exhaustive`` or the ``top_k`` by the first-order estimate), what
that cost, and how well the estimate ranks the candidates whose exact bypass was scored (Spearman over
them, null below 3: the top_k mode scores bypass only of the candidates that pass ``kl``)."""
Direction = TypedDict("Direction", {"layer": int, "position": int, "position_token": Union[str, None],
                                   "site": str, "norm": Real, "bypass": Real, "induce": Real, "kl": Real,
                                   "baseline": DirectionBaseline, "filters": DirectionFilters,
                                   "fallback": Union[str, None], "n_train": SideCounts, "n_val": SideCounts,
                                   "positions": list[int], "eoi_tokens": list[str], "table": list[Candidate],
                                   "note": str, "selection": NotRequired[Selection]})
"""The selected refusal direction (Arditi et al.): where it is, its val scores, the filters, every candidate."""

# ----------------------------------------------------------------------------------------- steering
SweepRow = TypedDict("SweepRow", {
    "alpha": float, "n_harmless": int, "n_harmful": int,
    "induce_refusal_rate": Real, "induce_refusal_rate_ci95": Union[Interval, None], "induce_n": int,
    "induce_refusal_score": Real,
    "suppress_refusal_rate": Real, "suppress_refusal_rate_ci95": Union[Interval, None], "suppress_n": int,
    "suppress_refusal_score": Real})
"""One alpha of the val sweep, ``induce_*`` (+alpha on harmless prompts) and ``suppress_*`` (-alpha on
harmful ones): refusal rate, its Wilson interval, n, mean refusal log-odds (``refusal_score``)."""
Ablation = TypedDict("Ablation", {"refusal_rate": Real, "refusal_rate_ci95": Union[Interval, None], "n": int,
                                 "refusal_score": Real})
"""Directional ablation on the harmful val instructions."""
SweepSample = TypedDict("SweepSample", {"setting": str, "alpha": Union[float, None], "instruction": str,
                                       "completion": str, "refused": bool})
"""A val completion of the sweep (``alpha`` null for the ablation)."""
InstructionSweep = TypedDict("InstructionSweep", {"vector": str, "layer": int, "positions": str, "split": str,
                                                 "n_harmless": int, "n_harmful": int, "rows": list[SweepRow],
                                                 "ablation": Ablation, "samples": list[SweepSample],
                                                 "chosen_alpha": float, "chosen_alpha_reason": str})
"""The alpha sweep of the selected direction on val instructions, and the alpha it chose."""
ObjectRow = TypedDict("ObjectRow", {
    "alpha": float,
    "harmless_metric": Real, "harmless_metric_se": Real, "harmless_normalised": Real, "harmless_normalised_se": Real,
    "harmless_n": int, "harmless_refusal_fraction": NotRequired[Real],
    "harmless_refusal_fraction_ci95": NotRequired[Union[Interval, None]],
    "harmful_metric": Real, "harmful_metric_se": Real, "harmful_normalised": Real, "harmful_normalised_se": Real,
    "harmful_n": int, "harmful_refusal_fraction": NotRequired[Real],
    "harmful_refusal_fraction_ci95": NotRequired[Union[Interval, None]]})
"""One |alpha| of an object-prompt sweep, ``harmless_*`` (+alpha) and ``harmful_*`` (-alpha): metric,
normalised metric, their SEs, n, and when completions were judged the refusal fraction with its
Wilson interval."""
ObjectSample = TypedDict("ObjectSample", {"side": str, "alpha": float, "object": str, "completion": str,
                                         "refused": bool})
"""An object prompt's completion under a signed alpha."""
ObjectSweep = TypedDict("ObjectSweep", {"description": str, "layer": int, "norm": Real, "rows": list[ObjectRow],
                                       "samples": list[ObjectSample]})
"""A vector (the object-prompt difference, the refusal heads' output) swept on the object prompts."""
Steering = TypedDict("Steering", {"instructions": InstructionSweep, "objects": dict[str, ObjectSweep]})
"""Alpha sweeps: the direction on val instructions; the replication's vectors on its object prompts."""

# --------------------------------------------------------------------------------------- evaluation
RefusalRate = TypedDict("RefusalRate", {"value": Real, "k": int, "ci95": Union[Interval, None], "n": int,
                                       "baseline": Real, "baseline_k": int, "baseline_ci95": Union[Interval, None],
                                       "refusal_score": Real, "baseline_refusal_score": Real, "intervention": str})
"""A held-out refusal rate beside its unedited baseline, with counts and Wilson intervals."""
DamageEntry = TypedDict("DamageEntry", {"kl_harmless": Real, "ce_baseline": Real, "ce_edited": Real, "n_tokens": int,
                                       "n": int})
"""What an edit costs on harmless prompts: KL of the next token, teacher-forced cross-entropy."""
Damage = TypedDict("Damage", {"ablation": DamageEntry, "addition": DamageEntry})
"""The damage of the directional ablation and of the addition."""
EvaluationSample = TypedDict("EvaluationSample", {"setting": str, "instruction": str, "completion": str,
                                                 "refused": bool})
"""A held-out completion of one setting."""
EVALUATION_RATES = ("harmless_refusal_rate_added", "harmful_refusal_rate_ablated", "harmful_refusal_rate_subtracted")
"""The :data:`RefusalRate` keys of :data:`Evaluation`, in order."""
Evaluation = TypedDict("Evaluation", {"split": str, "judge": str, "max_new_tokens": int, "layer": int,
                                     "alpha": float, "substrings": Union[list[str], None],
                                     "harmless_refusal_rate_added": RefusalRate,
                                     "harmful_refusal_rate_ablated": RefusalRate,
                                     "harmful_refusal_rate_subtracted": RefusalRate, "damage": Damage,
                                     "samples": list[EvaluationSample]})
"""Held-out test refusal rates (prompts never used for a choice), damage and sample completions."""

# ---------------------------------------------------------------------------------------- geometry
GeometryDirection = TypedDict("GeometryDirection", {"layer": int, "position": int, "norm": Real})
"""Where the direction the geometry step measures sits, and its (un-normalised) norm."""
GeometrySeparation = TypedDict("GeometrySeparation", {
    "split": str, "site": str, "column": int, "layers": list[int], "harmful_mean": list[Real],
    "harmful_sd": list[Real], "harmless_mean": list[Real], "harmless_sd": list[Real], "gap": list[Real],
    "gap_se": list[Real], "gap_ci95": list[Interval], "n_harmful": int, "n_harmless": int})
"""``hook_resid_pre · r̂`` at the direction's column, per layer: each side's mean and sd (ddof 1), the
harmful - harmless gap with its Welch SE and two-sample bootstrap interval, and the prompts per side."""
GeometryCosines = TypedDict("GeometryCosines", {
    "column": int, "layers": list[int], "candidates": Matrix, "candidate_norms": list[Real],
    "direction_vs_candidates": list[Real], "vectors": list[str], "vector_descriptions": list[str],
    "vector_matrix": Matrix})
"""Cosines of the per-layer candidate directions at the direction's column (L x L, null for a zero
candidate), of r̂ with each candidate, and between the run's named vectors."""
MeanSE = TypedDict("MeanSE", {"mean": Real, "se": Real, "n": int})
"""A mean over prompts with its standard error and n."""
SubspaceRow = TypedDict("SubspaceRow", {"k": int, "mean": Real, "se": Real, "n": int, "cos_direction": Real})
"""Refusal log-odds of the harmful val prompts with the top-k principal subspace ablated; the k-th
direction's cosine with r̂."""
GeometrySubspace = TypedDict("GeometrySubspace", {
    "definition": str, "layer": int, "column": int, "basis_split": str, "n_basis": SideCounts, "split": str,
    "explained": list[Real], "baseline": MeanSE, "direction": MeanSE, "rows": list[SubspaceRow], "note": str})
"""The k-dimensional check: subspace ablation (k = 1..K) beside the unedited prompts and r̂'s ablation."""
Summary = TypedDict("Summary", {"mean": Real, "se": Real, "ci95": Interval, "n": int})
"""A mean over pairs with its SE, bootstrap 95 % interval and n."""
HeadRef = TypedDict("HeadRef", {"layer": int, "head": int})
"""One attention head."""
HeadWrite = TypedDict("HeadWrite", {
    "layer": int, "head": int, "column": str, "index": int, "harmful_mean": Real, "harmless_mean": Real,
    "difference": Real, "difference_se": Real, "difference_ci95": Interval, "n_pairs": int})
"""A head's own residual write at a column (``last`` or ``heads``) projected on r̂, per side, and the
paired difference."""
CellSummary = TypedDict("CellSummary", {"mean": Real, "se": Real, "ci95": Interval})
"""A mean over prompts with its SE and bootstrap 95 % interval (n given by the enclosing record)."""
HeadReadRow = TypedDict("HeadReadRow", {
    "index": int, "harmful_mean": Matrix, "harmful_se": Matrix, "harmless_mean": Matrix, "harmless_se": Matrix,
    "difference": Matrix, "difference_se": Matrix,
    "difference_ci95": list[list[Interval]], "set_harmful": list[CellSummary], "set_harmless": list[CellSummary],
    "set_difference": list[CellSummary]})
"""Attention from one query column: per head x key column (``[heads][keys]``) each side's mean (and SE) and the
paired harmful - harmless difference with SE and interval; the head set (each prompt's mean over the
heads) per key column, per side and for the difference."""
HeadReads = TypedDict("HeadReads", {
    "site": str, "heads": list[HeadRef], "heads_cols": list[int], "keys": list[int], "key_labels": list[str],
    "key_roles": list[str], "query_roles": list[str], "n_pairs": int, "rows": list[HeadReadRow]})
"""What the refusal heads attend to (``attn.hook_pattern``) from the heads' column(s) and the last
column (``rows``, one per query, roles in ``query_roles``) to every labelled column from the object on."""
PathSplit = TypedDict("PathSplit", {
    "cols": list[int], "last_patched": bool, "n_pairs": int, "total": Summary, "direct": Summary,
    "indirect": Summary, "direct_fraction": Real, "direct_fraction_ci95": Interval})
"""The heads' patch at ``cols``: its total effect on the metric (patched - clean harmless, per pair), its
direct effect (the heads' outputs straight to the logits, downstream frozen: DLA with the receiving
run's final-norm scale; 0 unless the last column is patched), the rest, and direct / total."""
HeadPaths = TypedDict("HeadPaths", {"metric": str, "heads": PathSplit, "last": NotRequired[PathSplit]})
"""The path split at the heads' columns and (when they are not the last) at the last column."""
DownstreamResidual = TypedDict("DownstreamResidual", {
    "n_sites": int, "sites": str, "effect_ablated": Summary, "sufficiency_ablated": Real,
    "fraction_removed": Real, "fraction_removed_ci95": Interval})
"""The same with r̂ also projected out of the residual entering the layer after the heads (what they and
every earlier layer wrote along it)."""
DownstreamAblation = TypedDict("DownstreamAblation", {
    "after_layer": int, "n_sites": int, "sites": str, "cols": list[int], "n_pairs": int, "gap": Summary,
    "effect": Summary, "effect_ablated": Summary, "sufficiency": Real, "sufficiency_ablated": Real,
    "fraction_removed": Real, "fraction_removed_ci95": Interval, "residual": NotRequired[DownstreamResidual]})
"""The heads' patch effect with r̂ projected out of every residual write after their last layer, and the
fraction of their sufficiency that removes; ``residual``: with the residual after them ablated too."""
GeometryHeads = TypedDict("GeometryHeads", {
    "layer": int, "readout": str, "heads": list[HeadRef], "heads_column": int, "position": Union[str, int, None],
    "resid_patch_layer": int, "resid_patch_site": str, "n_pairs": int, "harmful_mean": Real,
    "harmless_mean": Real, "heads_patched_mean": Real, "resid_patched_mean": Real, "gap": Summary,
    "heads_shift": Summary, "resid_shift": Summary, "ratio": Real, "ratio_ci95": Interval, "ratio_to_gap": Real,
    "ratio_to_gap_ci95": Interval, "writes": list[HeadWrite], "reads": NotRequired[HeadReads],
    "paths": NotRequired[HeadPaths], "downstream": NotRequired[DownstreamAblation]})
"""Heads -> direction on the object prompts: the readout's shift by the refusal heads' patch and by the
whole residual patch at the heads' column, their ratio, and each head's write along r̂; what the heads
read, their patch's path split and r̂ ablated downstream of them."""
Geometry = TypedDict("Geometry", {
    "direction": GeometryDirection, "separation": GeometrySeparation, "cosines": GeometryCosines,
    "subspace": GeometrySubspace, "heads": Union[GeometryHeads, None], "heads_note": Union[str, None],
    "findings": list[str]})
"""The geometry of the refusal direction (separation, cosines, the k-dimensional check, heads); its
findings in words."""

# -------------------------------------------------------------------------------------- distributed
Shard = TypedDict("Shard", {"worker": int, "node": str, "pid": int, "device": str, "threads": int, "seconds": float})
"""One worker's share of a distributed grid (and a key named by ``shard_by`` holding its range)."""
DistributedStep = TypedDict("DistributedStep", {"backend": str, "address": Union[str, None], "workers": int,
                                               "shard_by": str, "seconds": float, "shards": list[Shard]})
"""Which workers computed a patching step."""

# ------------------------------------------------------------------------------------------ profile
StepProfile = TypedDict("StepProfile", {"wall_s": float, "cpu_s": float, "rss_start_gib": float,
                                       "peak_rss_gib": float, "resumed": bool})
"""One step's cost in the process that computed it: wall and CPU seconds, resident memory at its start
and its peak (sampled), and whether this run read it back instead of computing it."""

# ------------------------------------------------------------------------------------------ results
Results = TypedDict("Results", {
    "schema_version": int, "model": Model, "config": dict[str, Any], "versions": Versions, "seed": int,
    "prompts": Prompts, "objects": Objects, "tokens": Tokens, "token_choice": TokenChoice,
    "positions": list[Position], "baseline": Baseline, "dla": Dla, "sanity": Sanity, "patching": Patching,
    "timings": dict[str, float], "findings": list[str], "heads": NotRequired[Heads],
    "direction": NotRequired[Direction], "steering": NotRequired[Steering], "evaluation": NotRequired[Evaluation],
    "geometry": NotRequired[Geometry], "distributed": NotRequired[dict[str, DistributedStep]],
    "profile": NotRequired[dict[str, StepProfile]]})
"""``results.json``. ``config`` is the run's config as given (its schema is the run config's own);
``timings`` maps each step (and ``total``) to seconds; ``findings`` are the headline sentences."""


# --------------------------------------------------------------------------------------------- reader

def read_results(source: "Path | str | Mapping[str, Any]") -> Results:
    """The results of a run folder, a ``results.json`` path, or an already loaded dict, checked
    against the schema: :class:`ResultsError` (one sentence) for a missing or unreadable file, an
    unknown or missing ``schema_version``, a missing required key or a value of the wrong kind."""
    if isinstance(source, Mapping):
        data, where = source, "The results dict"
    else:
        path = Path(source)
        path = path / "results.json" if path.is_dir() else path
        where = str(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ResultsError(f"{path} does not exist; run `refusal-lab run --out FOLDER` to write one.") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ResultsError(f"{path} cannot be read ({e}).") from None
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(data, Mapping):
        raise ResultsError(f"{where} is not a JSON object, so it is not a refusal-lab results file.")
    if "schema_version" not in data:
        raise ResultsError(f"{where} has no schema_version, so it is not a results file that this refusal-lab "
                           f"(schema version {SCHEMA_VERSION}) can read.")
    version = data["schema_version"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise ResultsError(f"{where} has schema_version {version!r}, but this refusal-lab reads only schema version "
                           f"{SCHEMA_VERSION}; open it with the version that wrote it, or rerun the run.")
    _check(data, Results, "", where)
    return cast(Results, data)


@functools.lru_cache(maxsize=None)
def _hints(tp: Any) -> dict[str, Any]:
    """The field types of a TypedDict (``NotRequired`` stripped), in declaration order."""
    return get_type_hints(tp)


def _describe(tp: Any) -> str:
    """``tp`` in words for an error message."""
    if is_typeddict(tp):
        return "an object"
    if tp is Any:
        return "anything"
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {len(args)}" if origin is tuple else "a list"
    if origin is dict:
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            type(None): "null"}.get(tp, str(tp))


def _fits(value: Any, tp: Any) -> bool:
    """Whether a scalar ``value`` has the scalar type ``tp`` (int is not bool; a float accepts an int)."""
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def _check(value: Any, tp: Any, path: str, where: str) -> None:
    """Raise :class:`ResultsError` naming ``path`` unless ``value`` has type ``tp``."""

    def wrong() -> ResultsError:
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        return ResultsError(f"{where} has {path or 'its top level'} = {shown[:60]}, but results schema version "
                            f"{SCHEMA_VERSION} needs {_describe(tp)} there; rerun the run to rewrite it.")

    if tp is Any:
        return
    if is_typeddict(tp):
        if not isinstance(value, Mapping):
            raise wrong()
        hints = _hints(tp)
        for key in sorted(tp.__required_keys__ - set(value), key=list(hints).index):
            name = f"{path}.{key}" if path else key
            raise ResultsError(f"{where} is missing '{name}', which results schema version {SCHEMA_VERSION} "
                               "requires; rerun the run to rewrite it.")
        for key, sub in hints.items():
            if key in value:
                _check(value[key], sub, f"{path}.{key}" if path else key, where)
        return
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return
        alts = [a for a in args if a is not type(None)]
        if len(alts) == 1:  # ``X | None``: X's own, more precise, message
            return _check(value, alts[0], path, where)
        for alt in alts:
            try:
                return _check(value, alt, path, where)
            except ResultsError:
                continue
        raise wrong()
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise wrong()
    elif origin is list:
        if not isinstance(value, list):
            raise wrong()
        for i, item in enumerate(value):
            _check(item, args[0], f"{path}[{i}]", where)
    elif origin is tuple:
        if not isinstance(value, list) or len(value) != len(args):
            raise wrong()
        for i, (item, sub) in enumerate(zip(value, args)):
            _check(item, sub, f"{path}[{i}]", where)
    elif origin is dict:
        if not isinstance(value, Mapping):
            raise wrong()
        for k, item in value.items():
            _check(item, args[1], f"{path}.{k}", where)
    elif not _fits(value, tp):
        raise wrong()
