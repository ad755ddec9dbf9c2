"""Optimised abliteration: a seeded, resumable Optuna study over where and how strongly to remove
the refusal direction, measured (not guessed) on refusal, KL and a capability guard.

**Search space** (heretic's, plus what the mechanism suggests):

* a *fractional direction index* ``i`` in ``[0.4, 0.9] * (L - 1)``: the unit difference-in-means
  candidates ``r_l`` of ``blocks.{l}.hook_resid_post`` (= ``blocks.{l+1}.hook_resid_pre``, the
  selection's candidates one layer on; layer ``l``'s output, as heretic indexes them, so no candidate
  is the constant embedding of the last token) at the last end-of-instruction column, packaged
  train instructions; :func:`candidate_directions`) are interpolated between the two nearest layers,
  ``r = unit((1 - f) r_floor(i) + f r_ceil(i))`` with ``f = i - floor(i)`` (:func:`interpolate_direction`);
* per component (``attn``: the ``o_proj`` writing ``blocks.{l}.hook_attn_out``; ``mlp``: the
  ``down_proj`` writing ``blocks.{l}.hook_mlp_out``) a layer kernel (:class:`Kernel`): weight
  ``max_weight`` at ``max_weight_position``, falling linearly to ``min_weight`` at distance
  ``min_weight_distance``, 0 beyond (heretic's documented kernel);
* the *norm-preserving* variant (searched, on or off): every edited weight column (the d_model vector
  one input unit writes) is rescaled to its original norm after the projection, so the direction stays
  removed (at weight 1) while the write's magnitude is kept;
* an optional layer restriction (edits only in layers ``A..B``, e.g. those the patching grids show matter).

**An edit** of a sublayer with weight ``w``: ``W <- P_w W diag(s)``, ``b <- P_w b`` with
``P_w = I - w u vᵀ``; ``u = v = r`` without post-norms; with Gemma 2/3's post-norm gain ``D`` the
oblique ``u = D⁻¹r``, ``v = Dr`` (:func:`~refusal_lab.steering.abliterate.oblique_projector_factors`),
so that ``rᵀ post_norm(P_1 x) = 0``: the direction leaves the residual write. ``s = 1`` unless
norm-preserving (``s_j = |W_j| / |P_w W_j|``).

**Trials run as forward hooks** (:func:`edit_hooks`) on the ``o_proj`` / ``down_proj`` modules (a
pre-hook scales their input by ``s``, a hook applies ``P_w`` to their output): no weight copy per trial.
Those hooks sit *before* the post-norm, where the weight edit acts, so a trial equals the saved
weights (:func:`apply_edit`) up to rounding. Hooking ``hook_attn_out`` / ``hook_mlp_out`` instead
would equal the weight edit only without post-norms (on Gemma those sites come after the norm,
which rescales by ``rms(x) / rms(P x)``; see :mod:`refusal_lab.steering.abliterate`); the parity
test covers the non-Gemma architectures.

**Objectives** (all minimised): the refusal rate of harmful prompts (greedy completions judged by a
pluggable :class:`~refusal_lab.steering.evaluation.Judge`, the substring judge by default), the
mean first-token KL(original || edited) on harmless prompts, and the capability guard: the increase
in cross-entropy of the original model's own greedy harmless completions under the edited model.

**Resumable and seeded**: the study lives in ``OUT/study.journal`` (Optuna's JournalStorage), and
each trial's sampler is a TPE sampler seeded by ``seed + (completed trials)``, so a study killed
after k trials and restarted proposes exactly what the uninterrupted one would have (a trial that
was running when the process died is marked failed and run again).

**The chosen trial** (:func:`choose_trial`): among the Pareto-optimal trials with KL <= ``max_kl``,
the lowest refusal rate, then the lowest KL, CE increase and trial number; if none is under
``max_kl``, the Pareto trial of lowest KL. It is measured on the held-out prompts, written as real
weights (safetensors) and reloaded with plain ``transformers`` to re-measure its refusal rates.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from refusal_lab.errors import ConfigError
from refusal_lab.steering.abliterate import oblique_projector_factors
from refusal_lab.steering.interventions import unit

__all__ = [
    "COMPONENTS",
    "Kernel",
    "OptimizeSettings",
    "TrialEdit",
    "TrialMeasurer",
    "apply_edit",
    "candidate_directions",
    "choose_trial",
    "edit_from_params",
    "edit_hooks",
    "edited_weight",
    "interpolate_direction",
    "kernel_weights",
    "parse_layer_range",
    "run_optimization",
    "search_space",
    "write_optimize_html",
]

COMPONENTS = ("attn", "mlp")
"""``attn``: ``o_proj`` (writes ``blocks.{l}.hook_attn_out``); ``mlp``: ``down_proj`` (``hook_mlp_out``)."""
SITES = {"attn": "hook_attn_out", "mlp": "hook_mlp_out"}
STUDY_FILE, JSON_FILE, HTML_FILE, MODEL_DIR = "study.journal", "optimize.json", "optimize.html", "model"
STUDY_NAME = "refusal-lab-abliterate"
N_STARTUP_TRIALS = 8
"""Random trials before TPE models the front: fixed (not a function of the trial count), so a study
continued to a larger total proposes the same trials as one started with that total."""
DIRECTION_RANGE = (0.4, 0.9)
NORM_EPS = 1e-12


# ------------------------------------------------------------------ the search space


@dataclass(frozen=True)
class Kernel:
    """heretic's layer kernel of one component: ``max_weight`` at ``max_weight_position``, linear to
    ``min_weight`` at distance ``min_weight_distance``, 0 (no edit) farther away."""

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def weight(self, layer: int) -> float:
        """The edit weight of ``layer``."""
        d = abs(layer - self.max_weight_position)
        if d > self.min_weight_distance:
            return 0.0
        return self.max_weight + (d / self.min_weight_distance) * (self.min_weight - self.max_weight)


def kernel_weights(kernel: Kernel, n_layers: int, layers: tuple[int, int] | None = None) -> list[float]:
    """The kernel's weight at every layer; layers outside the restriction ``layers = (A, B)`` get 0."""
    lo, hi = layers if layers is not None else (0, n_layers - 1)
    return [kernel.weight(l) if lo <= l <= hi else 0.0 for l in range(n_layers)]


def interpolate_direction(candidates: torch.Tensor, index: float) -> torch.Tensor:
    """The unit direction at fractional layer ``index`` of ``candidates`` [L, d]: the unit candidates
    of the two nearest layers mixed linearly, then normalised (float64)."""
    L = candidates.shape[0]
    if not 0 <= index <= L - 1:
        raise ConfigError(f"Direction index {index} is outside the candidates' layers 0..{L - 1}.")
    lo = int(math.floor(index))
    hi = min(lo + 1, L - 1)
    f = index - lo
    if f == 0 or hi == lo:
        return unit(candidates[lo])
    a, b = unit(candidates[lo]), unit(candidates[hi])
    return unit((1 - f) * a + f * b)


@dataclass(frozen=True)
class TrialEdit:
    """One point of the search space made concrete: the unit direction and each component's weight
    per layer (0 = untouched)."""

    direction: torch.Tensor  # float64 [d], unit
    weights: dict[str, tuple[float, ...]]  # component -> [L]
    norm_preserving: bool = False


def parse_layer_range(text: str | None, n_layers: int | None = None) -> tuple[int, int] | None:
    """``"A-B"`` (or one layer ``"A"``) as ``(A, B)``; checked against ``n_layers`` when given."""
    if text is None:
        return None
    parts = str(text).strip().split("-")
    try:
        if len(parts) == 1:
            a = b = int(parts[0])
        elif len(parts) == 2:
            a, b = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--layers {text!r} is not a layer range; write A-B with 0 <= A <= B, e.g. 8-18.") from None
    if a < 0 or b < a:
        raise ConfigError(f"--layers {text!r} is not a layer range; write A-B with 0 <= A <= B, e.g. 8-18.")
    if n_layers is not None and b >= n_layers:
        raise ConfigError(f"--layers {text!r} reaches past the model's last layer {n_layers - 1}.")
    return a, b


def search_space(n_layers: int, layers: tuple[int, int] | None = None) -> dict[str, tuple[float, float]]:
    """The float ranges searched (heretic's, with the peak kept inside a layer restriction)."""
    top = n_layers - 1
    lo, hi = layers if layers is not None else (0.6 * top, top)
    return {"direction_index": (DIRECTION_RANGE[0] * top, DIRECTION_RANGE[1] * top),
            "max_weight": (0.8, 1.5), "max_weight_position": (float(lo), float(hi)),
            "min_weight_frac": (0.0, 1.0), "min_weight_distance": (1.0, max(1.0, 0.6 * top))}


def suggest_params(trial, n_layers: int, layers, norm_preserving: str) -> dict[str, Any]:
    """Ask an Optuna trial for one point of :func:`search_space` (define-by-run)."""
    space = search_space(n_layers, layers)
    p: dict[str, Any] = {"direction_index": trial.suggest_float("direction_index", *space["direction_index"])}
    for c in COMPONENTS:
        for k in ("max_weight", "max_weight_position", "min_weight_frac", "min_weight_distance"):
            p[f"{c}.{k}"] = trial.suggest_float(f"{c}.{k}", *space[k])
    p["norm_preserving"] = (trial.suggest_categorical("norm_preserving", [False, True]) if norm_preserving == "search"
                            else norm_preserving == "on")
    return p


def edit_from_params(params: dict[str, Any], candidates: torch.Tensor,
                     layers: tuple[int, int] | None = None) -> TrialEdit:
    """The :class:`TrialEdit` of a trial's parameters (``min_weight = min_weight_frac * max_weight``)."""
    L = candidates.shape[0]
    weights = {}
    for c in COMPONENTS:
        mw = float(params[f"{c}.max_weight"])
        k = Kernel(mw, float(params[f"{c}.max_weight_position"]), float(params[f"{c}.min_weight_frac"]) * mw,
                   float(params[f"{c}.min_weight_distance"]))
        weights[c] = tuple(kernel_weights(k, L, layers))
    return TrialEdit(interpolate_direction(candidates, float(params["direction_index"])), weights,
                     bool(params.get("norm_preserving", False)))


# ------------------------------------------------------------------ the edit: hooks and weights


def _modules(model, component: str, layer: int):
    """(linear, post-norm or None) of one component of one layer."""
    a = model.adapter
    if component == "attn":
        return a.o_proj(layer), a.attn_post_norm(layer)
    return a.mlp(layer).down_proj, a.mlp_post_norm(layer)


def _factors(model, r: torch.Tensor, norm, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if norm is None:
        return r, r
    from types import SimpleNamespace

    gain = model.adapter.ln_scale_weight(SimpleNamespace(weight=norm.weight.detach().to(torch.float64)))
    gain = gain.to(torch.float64)
    u, v, _ = oblique_projector_factors(r, gain, where)
    return u, v


@torch.no_grad()
def edited_weight(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, w: float,
                  norm_preserving: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(P_w W diag(s), s)`` in float64 for ``W`` [d_model, in]: ``P_w = I - w u vᵀ``; ``s`` (None
    unless ``norm_preserving``) rescales each column back to its original norm."""
    W = weight.detach().to(torch.float64)
    u, v = u.to(W.device, torch.float64), v.to(W.device, torch.float64)
    new = W - w * torch.outer(u, v @ W)
    if not norm_preserving:
        return new, None
    s = W.norm(dim=0) / new.norm(dim=0).clamp_min(NORM_EPS)
    return new * s, s


def _plan(model, edit: TrialEdit) -> Iterator[tuple[str, int, torch.nn.Module, torch.Tensor, torch.Tensor, float]]:
    r = edit.direction.to(torch.float64)
    for c in COMPONENTS:
        for l, w in enumerate(edit.weights[c]):
            if w == 0:
                continue
            lin, norm = _modules(model, c, l)
            u, v = _factors(model, r.to(lin.weight.device), norm, f"layer {l}'s {c} post-norm")
            yield c, l, lin, u, v, float(w)


@contextmanager
def edit_hooks(model, edit: TrialEdit):
    """Apply ``edit`` with torch hooks on the ``o_proj`` / ``down_proj`` modules while inside the
    block (every forward of ``model``, prompts and generation alike): the output ``y -> y - w u (vᵀ y)``,
    and with norm preservation the input scaled by ``s`` first. The weights are not touched."""
    handles = []
    try:
        for _c, _l, lin, u, v, w in _plan(model, edit):
            dt = lin.weight.dtype
            uu, vv = (w * u).to(dt), v.to(dt)

            def out_hook(_m, _args, y, uu=uu, vv=vv):
                return y - (y @ vv)[..., None] * uu

            handles.append(lin.register_forward_hook(out_hook))
            if edit.norm_preserving:
                _, s = edited_weight(lin.weight, u, v, w, True)
                ss = s.to(dt)

                def in_hook(_m, args, ss=ss):
                    return (args[0] * ss,) + tuple(args[1:])

                handles.append(lin.register_forward_pre_hook(in_hook))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def apply_edit(model, edit: TrialEdit) -> None:
    """Write ``edit`` into the weights in place (float64 arithmetic): ``W <- P_w W diag(s)``,
    ``b <- P_w b``. The model then equals :func:`edit_hooks` up to rounding."""
    for _c, _l, lin, u, v, w in list(_plan(model, edit)):
        new, _ = edited_weight(lin.weight, u, v, w, edit.norm_preserving)
        b = getattr(lin, "bias", None)
        if b is not None:
            bd = b.to(torch.float64)
            b.copy_((bd - w * (v.to(bd.device) @ bd) * u.to(bd.device)).to(b.dtype))
        lin.weight.copy_(new.to(lin.weight.dtype))


# ------------------------------------------------------------------ the directions


def candidate_directions(model, n_train: int = 32, seed: int = 0, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """Difference-in-means candidates [L, d] (float64) of ``blocks.{l}.hook_resid_post`` at the last
    end-of-instruction column, ``n_train`` harmful vs harmless packaged train instructions (seeded):
    the direction selection's candidates (``hook_resid_pre``) at its default column, one layer on."""
    from refusal_lab.prompts import build_instruction_prompts
    from refusal_lab.steering.batching import instruction_sample, n_batches, progress_bar
    from refusal_lab.steering.vectors import diff_in_means_all_layers

    train = instruction_sample("train", n_train, seed)
    hf, hl = (build_instruction_prompts(model.tokenizer, train[k]) for k in ("harmful", "harmless"))
    total = sum(n_batches(x[0].shape[0], batch_size) for x in (hf, hl))
    with progress_bar(total, "direction candidates", progress) as bar:
        v = diff_in_means_all_layers(model, *hf, *hl, positions=(-1,), site="hook_resid_post",
                                     batch_size=batch_size, bar=bar)
    return v[:, 0]


# ------------------------------------------------------------------ measuring a trial


class TrialMeasurer:
    """Measures edits on fixed prompts: the refusal rate of ``harmful`` (greedy completions of
    ``max_new_tokens``, judged by ``judge``), and on ``harmless`` the first-token KL from the
    original model and the CE of the original model's own greedy completions (decoded once, here)."""

    def __init__(self, model, harmful: Sequence[str], harmless: Sequence[str], *, judge=None,
                 max_new_tokens: int = 16, batch_size: int = 16):
        from refusal_lab.models.generate import greedy_decode
        from refusal_lab.prompts import build_instruction_prompts
        from refusal_lab.steering.batching import tensor_batches

        self.model, self.harmful, self.harmless = model, list(harmful), list(harmless)
        self.judge, self.max_new_tokens, self.batch_size = judge, max_new_tokens, batch_size
        ids, mask = build_instruction_prompts(model.tokenizer, self.harmless)
        eos = torch.as_tensor(model.eos_ids() or [-1], device=model.device)
        self.batches, self.gens = [], []
        ce, count = 0.0, 0
        with torch.no_grad():
            for i, m in tensor_batches(ids, mask, batch_size, model.device):
                gen = greedy_decode(model, i, m, max_new_tokens=max(1, max_new_tokens), drop_finished=True, logprobs=True)
                is_eos = torch.isin(gen.tokens, eos)
                keep = (is_eos.long().cumsum(1) - is_eos.long()) == 0
                ce += float((-gen.logprobs * keep.cpu()).sum())
                count += int(keep.sum())
                self.batches.append((i, m))
                self.gens.append((gen.prompt_logits, gen.tokens, keep))
        self.ce_baseline, self.n_tokens = ce / max(count, 1), count

    def refusal(self, prompts: Sequence[str] | None = None, model=None) -> dict:
        """``{k, n, rate, ci95, samples}`` of the (hooked or given) model on ``prompts`` (default: harmful)."""
        from refusal_lab.steering.evaluation import evaluate_hooks

        ev = evaluate_hooks(model or self.model, list(prompts if prompts is not None else self.harmful), [],
                            judge=self.judge, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                            full_texts=3)
        return {"k": ev.k, "n": ev.n, "rate": ev.rate, "ci95": ev.ci95,
                "samples": [{"prompt": p, "completion": c, "refused": r}
                            for p, c, r in zip(ev.prompts[:3], ev.completions[:3], ev.refused[:3])]}

    @torch.no_grad()
    def damage(self) -> dict:
        """``{kl, ce, ce_baseline, ce_increase, n_harmless, n_tokens}`` of the model as it runs now
        (under :func:`edit_hooks`) against the original's logits and completions."""
        from refusal_lab.steering.damage import next_token_kl

        model = self.model
        kl, ce, n = 0.0, 0.0, 0
        for (i, m), (base, new, keep) in zip(self.batches, self.gens):
            first = model.prefill(i, m, record_kv=new.shape[1] > 1, logits="last")
            kl += float(next_token_kl(base, first.logits).sum())
            logits = first.logits[:, None]
            if new.shape[1] > 1:
                fmask = torch.cat([m, keep[:, :-1].long().to(m.device)], 1)
                rest = model.prefill(new[:, :-1].to(i.device), fmask, kv_prefix=first.kv, logits="all").logits
                logits = torch.cat([logits, rest], 1)
            nll = -torch.log_softmax(logits.to(torch.float64), -1).gather(-1, new[..., None].to(logits.device))[..., 0]
            ce += float((nll * keep.to(nll.device)).sum())
            n += i.shape[0]
        ce /= max(self.n_tokens, 1)
        return {"kl": kl / max(n, 1), "ce": ce, "ce_baseline": self.ce_baseline, "ce_increase": ce - self.ce_baseline,
                "n_harmless": n, "n_tokens": self.n_tokens}

    def measure(self, edit: TrialEdit | None) -> dict:
        """Refusal and damage of ``edit`` (None: the original model)."""
        if edit is None:
            return {"refusal": self.refusal(), **self.damage()}
        with edit_hooks(self.model, edit):
            return {"refusal": self.refusal(), **self.damage()}


# ------------------------------------------------------------------ the study


@dataclass(frozen=True)
class OptimizeSettings:
    """What a study optimises on; a study folder resumes only with the same settings."""

    eval_set: str = "instructions"
    n_trials: int = 50
    n_harmful: int = 32
    n_harmless: int = 32
    seed: int = 0
    max_new_tokens: int = 16
    norm_preserving: str = "search"  # search | on | off
    layers: tuple[int, int] | None = None
    max_kl: float = 0.5
    n_train: int = 32
    judge: str = "substring"

    def check(self) -> None:
        """One sentence (ConfigError) for settings that cannot run."""
        from refusal_lab.prompts.eval_sets import check_eval_set

        check_eval_set(self.eval_set)
        if self.n_trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {self.n_trials}.")
        for flag, v in (("--n-harmful", self.n_harmful), ("--n-harmless", self.n_harmless), ("--n-train", self.n_train)):
            if v < 1:
                raise ConfigError(f"{flag} must be a positive number of prompts, got {v}.")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1 (refusals are judged on completions), "
                              f"got {self.max_new_tokens}.")
        if self.norm_preserving not in ("search", "on", "off"):
            raise ConfigError(f"--norm-preserving must be search, on or off, got {self.norm_preserving!r}.")
        if not (math.isfinite(self.max_kl) and self.max_kl > 0):
            raise ConfigError(f"--max-kl must be a positive number, got {self.max_kl}.")

    def fingerprint(self) -> str:
        """What must match for a study to resume (everything but the trial count)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("n_trials", "max_kl")}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]


def choose_trial(trials: Sequence[dict], max_kl: float) -> tuple[dict, str]:
    """The chosen trial among the Pareto-optimal ``trials`` (dicts with ``refusal_rate``, ``kl``,
    ``ce_increase``, ``number``) and the rule's sentence."""
    ok = [t for t in trials if t["kl"] <= max_kl]
    if ok:
        best = min(ok, key=lambda t: (t["refusal_rate"], t["kl"], t["ce_increase"], t["number"]))
        return best, (f"lowest refusal rate among the Pareto-optimal trials with KL <= {max_kl:g} "
                      "(ties: lower KL, lower CE increase, earlier trial)")
    best = min(trials, key=lambda t: (t["kl"], t["refusal_rate"], t["ce_increase"], t["number"]))
    return best, f"no Pareto-optimal trial has KL <= {max_kl:g}: the one of lowest KL"


def _pareto(trials: Sequence[dict]) -> list[dict]:
    keys = ("refusal_rate", "kl", "ce_increase")

    def dominated(a, b):  # b dominates a
        return all(b[k] <= a[k] for k in keys) and any(b[k] < a[k] for k in keys)

    return [t for t in trials if not any(dominated(t, o) for o in trials if o is not t)]


def _open_study(out: Path, settings: OptimizeSettings):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(out / STUDY_FILE)))
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True,
                                directions=["minimize", "minimize", "minimize"])
    fp = study.user_attrs.get("settings_fingerprint")
    if fp is None:
        study.set_user_attr("settings_fingerprint", settings.fingerprint())
        study.set_user_attr("settings", json.loads(json.dumps(asdict(settings), default=list)))
    elif fp != settings.fingerprint():
        raise ConfigError(f"{out / STUDY_FILE} holds a study with other settings ({study.user_attrs.get('settings')}); "
                          "give the same settings to resume it, or a new --out.")
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(STUDY_NAME)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        # one process per study folder: a trial still running at start was killed; run it again
        storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, t.number),
                                       TrialState.FAIL)
    return study


def _trial_record(t) -> dict:
    ua = t.user_attrs
    params = dict(t.params)
    params.setdefault("norm_preserving", ua.get("norm_preserving", False))  # fixed (on/off): not a searched param
    return {"number": t.number, "params": params, "refusal_rate": t.values[0], "kl": t.values[1],
            "ce_increase": t.values[2], "refusal": ua.get("refusal"), "ce": ua.get("ce"),
            "layer_weights": ua.get("layer_weights")}


def _best_text(records: Sequence[dict], max_kl: float) -> str:
    ok = [r for r in records if r["kl"] <= max_kl]
    if not ok:
        return "none under max KL"
    b = min(ok, key=lambda r: (r["refusal_rate"], r["kl"]))
    return f"refusal {b['refusal_rate']:.2f} KL {b['kl']:.3f} (#{b['number']})"


def run_optimization(model, out_dir: str | Path, settings: OptimizeSettings = OptimizeSettings(), *, judge=None,
                     batch_size: int = 16, progress: bool = True, log: Callable[[str], None] | None = None,
                     save: bool = True) -> dict:
    """Run (or resume) the study in ``out_dir`` to ``settings.n_trials`` completed trials, choose a
    trial, measure it on held-out prompts, save it as weights (``OUT/model``, when ``save``; ``model`` itself is
    left unedited), reload those with plain ``transformers`` and re-measure; write ``optimize.json`` and ``optimize.html``.
    Returns the JSON record. ``judge``: a :class:`~refusal_lab.steering.evaluation.Judge` (default substring)."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.samplers import TPESampler
    from optuna.trial import TrialState

    from refusal_lab.artifacts import write_json
    from refusal_lab.prompts.data import load_instructions
    from refusal_lab.prompts.eval_sets import load_eval_set
    from refusal_lab.steering.batching import progress_bar

    settings.check()
    say = log or (lambda _m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L = model.cfg.n_layers
    if settings.layers is not None:
        parse_layer_range(f"{settings.layers[0]}-{settings.layers[1]}", L)
    s = settings
    harmful = load_eval_set(s.eval_set, "optimize", s.n_harmful, s.seed)
    held_harmful = load_eval_set(s.eval_set, "heldout", s.n_harmful, s.seed)
    harmless = load_instructions("val", "harmless", s.n_harmless, s.seed)
    held_harmless = load_instructions("test", "harmless", s.n_harmless, s.seed)
    if not harmful or not held_harmful:
        raise ConfigError(f"The eval set {s.eval_set!r} has no prompts to optimise on or to report on.")

    study = _open_study(out, s)
    say(f"direction candidates: difference in means at every layer ({s.n_train}+{s.n_train} train instructions)...")
    candidates = candidate_directions(model, s.n_train, s.seed, batch_size, progress)
    say(f"baseline on {len(harmful)} harmful ({s.eval_set}, optimise split) + {len(harmless)} harmless prompts...")
    measurer = TrialMeasurer(model, harmful, harmless, judge=judge, max_new_tokens=s.max_new_tokens,
                             batch_size=batch_size)
    baseline = measurer.measure(None)

    def complete():
        return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    done = len(complete())
    if done:
        say(f"resuming {out / STUDY_FILE}: {done} of {s.n_trials} trials done")
    records = [_trial_record(t) for t in complete()]
    with progress_bar(s.n_trials, "optimising abliteration", progress, unit="trial") as bar:
        bar.update(min(done, s.n_trials))
        bar.set_postfix_str(_best_text(records, s.max_kl) if records else "", refresh=False)
        while done < s.n_trials:
            with warnings.catch_warnings():  # multivariate TPE is marked experimental: no warning per trial
                warnings.simplefilter("ignore", ExperimentalWarning)
                study.sampler = TPESampler(seed=s.seed + done, n_startup_trials=N_STARTUP_TRIALS, multivariate=True)
                trial = study.ask()
            params = suggest_params(trial, L, s.layers, s.norm_preserving)
            edit = edit_from_params(params, candidates, s.layers)
            m = measurer.measure(edit)
            trial.set_user_attr("norm_preserving", bool(params["norm_preserving"]))
            trial.set_user_attr("refusal", {k: m["refusal"][k] for k in ("k", "n", "rate", "ci95")})
            trial.set_user_attr("ce", {k: m[k] for k in ("ce", "ce_baseline", "n_tokens")})
            trial.set_user_attr("layer_weights", {f"blocks.*.{SITES[c]}": list(edit.weights[c]) for c in COMPONENTS})
            study.tell(trial, [m["refusal"]["rate"], m["kl"], m["ce_increase"]])
            done = len(complete())
            records = [_trial_record(t) for t in complete()]
            bar.update(1)
            bar.set_postfix_str(_best_text(records, s.max_kl))

    records = sorted(records, key=lambda r: r["number"])
    front = _pareto(records)
    chosen, rule = choose_trial(front, s.max_kl)
    edit = edit_from_params(chosen["params"], candidates, s.layers)
    say(f"chosen trial #{chosen['number']}: refusal {chosen['refusal_rate']:.3f}, KL {chosen['kl']:.4f}; "
        f"measuring it on the held-out prompts...")
    held = TrialMeasurer(model, held_harmful, held_harmless, judge=judge, max_new_tokens=s.max_new_tokens,
                         batch_size=batch_size)
    held_base = held.measure(None)
    held_edit = held.measure(edit)
    record: dict[str, Any] = {
        "model": model.cfg.model_name, "model_type": model.cfg.model_type, "n_layers": L,
        "settings": json.loads(json.dumps(asdict(s), default=list)), "judge": s.judge,
        "study": {"storage": STUDY_FILE, "name": STUDY_NAME, "sampler": f"TPESampler(seed=seed + completed trials, "
                  f"n_startup_trials={N_STARTUP_TRIALS}, multivariate=True)",
                  "objectives": ["refusal_rate (harmful, optimise split)", "kl (first token, harmless val)",
                                 "ce_increase (original's harmless completions)"],
                  "search_space": search_space(L, s.layers)},
        "prompts": {"harmful_optimize": {"set": s.eval_set, "split": "optimize", "n": len(harmful)},
                    "harmful_heldout": {"set": s.eval_set, "split": "heldout", "n": len(held_harmful)},
                    "harmless_optimize": {"set": "instructions harmless val", "n": len(harmless)},
                    "harmless_heldout": {"set": "instructions harmless test", "n": len(held_harmless)}},
        "baseline": baseline, "trials": records, "pareto_front": [r["number"] for r in front],
        "chosen": {"number": chosen["number"], "rule": rule, "params": chosen["params"],
                   "optimize": {k: chosen[k] for k in ("refusal_rate", "kl", "ce_increase", "refusal")},
                   "heldout_baseline": held_base, "heldout": held_edit,
                   "layer_weights": chosen["layer_weights"]},
    }
    if save:
        from refusal_lab.models.progress import progress_bars

        with progress_bars(progress):  # transformers' own bars while saving and reloading
            record["saved"] = _save_and_reload(model, edit, out, measurer, held, record)
    write_json(out / JSON_FILE, record)
    write_optimize_html(record, out / HTML_FILE)
    return record


def _save_and_reload(model, edit: TrialEdit, out: Path, measurer: TrialMeasurer, held: TrialMeasurer,
                     record: dict) -> dict:
    """Write the chosen edit into the weights, save them (the model's weights are restored after), reload the folder with plain
    ``transformers.AutoModelForCausalLM.from_pretrained`` and re-measure both refusal rates on it."""
    import transformers

    from refusal_lab.models.adapters import adapter_class
    from refusal_lab.models.hooked import HookedChatModel
    from refusal_lab.steering.abliterate import save_abliterated

    touched = [lin for _c, _l, lin, _u, _v, _w in _plan(model, edit)]
    kept = [(p, p.detach().clone()) for lin in touched for p in lin.parameters(recurse=False)]
    apply_edit(model, edit)
    try:
        folder = save_abliterated(model, out / MODEL_DIR)
    finally:  # the caller's model is left as it was
        with torch.no_grad():
            for p, old in kept:
                p.copy_(old)
        del kept
    from refusal_lab.steering.vectors import save_vector

    save_vector(folder / "refusal_direction.safetensors", edit.direction,
                {"model": model.cfg.model_name, "method": "optimised abliteration (refusal-lab abliterate --optimize)",
                 "trial": record["chosen"]["number"]})
    wanted = adapter_class(model.cfg.model_type).attn_implementation
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=model.hf_model.dtype,
                                                           attn_implementation=wanted).to(model.device).eval()
    reloaded = HookedChatModel(hf, model.tokenizer, name=str(folder))
    opt = measurer.refusal(model=reloaded)
    hel = held.refusal(model=reloaded)
    study_k = record["chosen"]["optimize"]["refusal"]["k"]
    hook_k = record["chosen"]["heldout"]["refusal"]["k"]
    del reloaded, hf
    return {"folder": MODEL_DIR, "format": "safetensors (save_pretrained)",
            "reload": "transformers.AutoModelForCausalLM.from_pretrained",
            "optimize_refusal": {k: opt[k] for k in ("k", "n", "rate", "ci95")},
            "heldout_refusal": {k: hel[k] for k in ("k", "n", "rate", "ci95")},
            "matches_study": opt["k"] == study_k, "matches_heldout_hooks": hel["k"] == hook_k}


# ------------------------------------------------------------------ the page


def write_optimize_html(record: dict, path: str | Path) -> Path:
    """``optimize.html``: the trials' refusal rate against KL (Pareto front and chosen trial marked,
    each point's parameters on hover) and the chosen trial's numbers."""
    from refusal_lab.report.common import fmt, rate_ci
    from refusal_lab.report.interactive import Plots, plotly_js
    from refusal_lab.report.page import esc, page, table
    from refusal_lab.report.specs import HARMFUL, NEUTRAL, SELECTED, Chart, Rule, Series

    trials = record["trials"]
    front = set(record["pareto_front"])
    chosen = record["chosen"]["number"]

    def hover(t):
        ps = [f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}" for k, v in t["params"].items()]
        return (f"trial {t['number']}", f"refusal {fmt(t['refusal_rate'])}, KL {fmt(t['kl'], 4)}, "
                f"CE +{fmt(t['ce_increase'], 4)}", *ps)

    groups = [("trials", [t for t in trials if t["number"] not in front], NEUTRAL),
              ("Pareto front", [t for t in trials if t["number"] in front and t["number"] != chosen], HARMFUL),
              ("chosen", [t for t in trials if t["number"] == chosen], SELECTED)]
    series = [Series(name, [t["kl"] for t in ts], [t["refusal_rate"] for t in ts], color, kind="points",
                     hover=[hover(t) for t in ts]) for name, ts, color in groups if ts]
    s = record["settings"]
    chart = Chart((f"Refusal rate vs first-token KL, {len(trials)} trials",
                   f"{s['eval_set']}, optimise split; dashed line: max KL {s['max_kl']:g}"),
                  series, xlabel="KL(original || edited), harmless", ylabel="refusal rate, harmful",
                  rules=[Rule(s["max_kl"], axis="v", name=f"max KL {s['max_kl']:g}")], ylim=(-0.03, 1.03),
                  legend=True)
    js = plotly_js()
    plots = Plots(enabled=js is not None)
    c = record["chosen"]

    def rate(r):  # "0.125 [0.04, 0.31] (3/24)": the value, its Wilson interval and count
        ci = rate_ci(r.get("ci95"), r.get("k"), r.get("n"))
        return f"{fmt(r.get('rate'))} {ci}" if ci else fmt(r.get("rate"))

    rows = [["optimise split, original", rate(record["baseline"]["refusal"]), fmt(record["baseline"]["kl"], 4), "—"],
            ["optimise split, chosen (hooks)", rate(c["optimize"]["refusal"]), fmt(c["optimize"]["kl"], 4),
             fmt(c["optimize"]["ce_increase"], 4)],
            ["held out, original", rate(c["heldout_baseline"]["refusal"]), fmt(c["heldout_baseline"]["kl"], 4), "—"],
            ["held out, chosen (hooks)", rate(c["heldout"]["refusal"]), fmt(c["heldout"]["kl"], 4),
             fmt(c["heldout"]["ce_increase"], 4)]]
    saved = record.get("saved")
    if saved:
        rows += [["optimise split, saved weights reloaded", rate(saved["optimize_refusal"]), "", ""],
                 ["held out, saved weights reloaded", rate(saved["heldout_refusal"]), "", ""]]
    body = (f"<h1 id=\"overview\">Optimised abliteration: {esc(record['model'])}</h1>"
            f"<p class=\"muted\">Chosen trial {c['number']}: {esc(c['rule'])}.</p>"
            + plots.add(chart)
            + "<h2 id=\"chosen\">Chosen trial</h2>"
            + table(["prompts / model", "refusal rate [95% CI] (k/n)", "KL", "CE increase"], rows)
            + table(["parameter", "value"], [[k, fmt(v, 4) if isinstance(v, float) else v] for k, v in c["params"].items()]))
    html_text = page(f"optimised abliteration: {record['model']}", [("overview", "Overview"), ("chosen", "Chosen trial")],
                     body, plots, js)
    p = Path(path)
    p.write_text(html_text, encoding="utf-8")
    return p
