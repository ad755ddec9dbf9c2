"""Weight orthogonalisation ("abliteration", Arditi et al. 2024 §4): bake directional ablation
into the weights so the saved model never writes the direction into its residual stream.

With ``r`` the unit direction, every residual-stream write is edited:

* ``embed_tokens.weight`` rows: ``W_E <- W_E - (W_E r) rᵀ`` (Gemma's ``sqrt(d_model)`` embedding
  scale commutes with the projection);
* each ``self_attn.o_proj`` and ``mlp.down_proj`` (output side): ``W <- P W`` and ``b <- P b`` for a
  bias, with ``P`` below.

**Architectures without post-norms** (Llama, Qwen2/3, Mistral): the sublayer output is written to
the residual as is, ``P = I - r rᵀ`` and the edited model equals
:func:`refusal_lab.steering.interventions.ablation_hooks` exactly (up to rounding): same logits.

**Gemma 2/3** (post-attention / post-feedforward RMSNorm before the residual add): with ``x`` the
``o_proj``/``down_proj`` output and ``D = diag(1 + w)`` the post-norm gain, the written vector is
``out = D x / rms(x)``. Hook ablation writes ``out - r rᵀ out = D (x - D⁻¹r (Dr)ᵀ x) / rms(x) =
D P x / rms(x)`` with the *oblique* projector ``P = I - D⁻¹r (Dr)ᵀ`` (idempotent, as
``(Dr)ᵀ D⁻¹r = rᵀr = 1``). Editing ``W <- P W``, ``b <- P b`` makes the sublayer write
``D P x / rms(P x)``, and ``rᵀ D P = (Dr)ᵀ - (rᵀr)(Dr)ᵀ = 0``, so:

* the direction is removed **exactly** from every residual write, hence its projection is ~0 (up
  to rounding) at every residual site of every layer, as under hook ablation;
* the rest of each write differs from hook ablation by the per-token factor ``rms(x) / rms(P x)``
  (``rms`` includes the norm's ``eps``), which no edit of the weights of a standard Gemma block can
  undo (the norm divides by the RMS of what the edited ``o_proj``/``down_proj`` produce); so logits
  equal hook ablation's only up to this rescaling (close when ``r`` carries little of each
  sublayer's output, not bit-for-bit). :class:`OrthogonalizationReport` says ``exact=False``.

How far ``rms(P x)`` strays from ``rms(x)`` grows with ``|P| = |D⁻¹r| |Dr|`` (>= 1, = 1 for a gain
proportional to the identity), i.e. with gain entries small where ``r`` is not; the report's
``max_projector_norm`` gives the largest over all sublayers. On tiny random Gemmas (d_model 64,
gains ``1 + N(0, 0.3²)``) ``|P|`` of 1.3-1.7 gave logit deviations from hook ablation of 0.07-0.19
against an ablation effect of 0.9-1.7 (max abs logits), while ``|P| ≈ 8`` gave 0.8.

``P`` needs ``D⁻¹ r``: a gain entry ``1 + w_i`` at (or near) 0 where ``r_i != 0`` makes ``P``
blow up (``|P| = |D⁻¹r| |Dr|``), and the edit is refused with a :class:`RefusalLabError` naming
the layer, the norm and the entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from refusal_lab.errors import RefusalLabError
from refusal_lab.steering.interventions import unit
from refusal_lab.steering.selection import DirectionPolicy, select_refusal_direction

__all__ = [
    "DirectionChoice",
    "OrthogonalizationReport",
    "default_layer",
    "instruction_direction",
    "oblique_projector_factors",
    "orthogonalize_weights",
    "resolve_eoi_position",
    "save_abliterated",
    "write_abliteration",
]

MAX_PROJECTOR_NORM = 1e3
"""Largest ``|P| = |D⁻¹r| |Dr|`` accepted for a post-norm sublayer (1 for a gain proportional to I)."""

GEMMA_NOTE = (
    "post-attention/post-feedforward RMSNorms: the direction is removed exactly from every residual write, "
    "but each sublayer write is rescaled by rms(x)/rms(Px) relative to hook ablation, so logits match hook "
    "ablation only approximately"
)


@dataclass(frozen=True)
class OrthogonalizationReport:
    """What :func:`orthogonalize_weights` did: ``exact`` is True when the edited model equals hook
    ablation (no post-norms); otherwise ``note`` says why not and ``max_projector_norm`` is the
    largest ``|P|`` used (1.0 when the post-norm gain is uniform)."""

    exact: bool
    note: str
    max_projector_norm: float = 1.0

    def to_dict(self) -> dict:
        return {"exact": self.exact, "note": self.note, "max_projector_norm": self.max_projector_norm}


def _untie_lm_head(model) -> None:
    """Give ``lm_head`` its own copy of the weight if it shares the embedding's (tied models):
    the embedding edit must not touch the unembedding."""
    a = model.adapter
    emb, head = a.embed_tokens.weight, a.lm_head.weight
    if head is emb or head.data_ptr() == emb.data_ptr():
        a.lm_head.weight = nn.Parameter(head.detach().clone(), requires_grad=False)
    for cfg in (model.hf_model.config, getattr(model.hf_model.config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


@torch.no_grad()
def _project_rows(weight: torch.Tensor, r: torch.Tensor) -> None:
    """Rows are d_model vectors (embedding [V, d]): W <- W - (W r) rᵀ."""
    w = weight.to(torch.float64)
    weight.copy_((w - torch.outer(w @ r, r)).to(weight.dtype))


@torch.no_grad()
def _project_out_side(linear: nn.Module, u: torch.Tensor, v: torch.Tensor) -> None:
    """nn.Linear with out_features = d_model (weight [d, in]): W <- (I - u vᵀ) W, b <- (I - u vᵀ) b.
    ``u = v = r`` is the orthogonal projection; ``u = D⁻¹r, v = Dr`` the oblique one."""
    dev = linear.weight.device
    u, v = u.to(dev), v.to(dev)
    w = linear.weight.to(torch.float64)
    linear.weight.copy_((w - torch.outer(u, v @ w)).to(linear.weight.dtype))
    b = getattr(linear, "bias", None)
    if b is not None:
        bd = b.to(torch.float64)
        b.copy_((bd - (v @ bd) * u).to(b.dtype))


def _gain(adapter, norm: nn.Module) -> torch.Tensor:
    """The post-norm's elementwise gain (Gemma: ``1 + w``) in float64, via the adapter."""
    return adapter.ln_scale_weight(SimpleNamespace(weight=norm.weight.detach().to(torch.float64))).to(torch.float64)


def oblique_projector_factors(r: torch.Tensor, gain: torch.Tensor, where: str = "the post-norm",
                              max_norm: float = MAX_PROJECTOR_NORM) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(u, v, |P|)`` with ``P = I - u vᵀ``, ``u = D⁻¹r``, ``v = Dr``, ``D = diag(gain)`` (float64).

    Raises :class:`RefusalLabError` when a gain entry is (near) zero where ``r`` is not, i.e. when
    ``|P| = |u| |v|`` is not finite or exceeds ``max_norm``."""
    r = r.to(torch.float64)
    gain = gain.to(device=r.device, dtype=torch.float64)
    nz = r != 0
    u = torch.zeros_like(r)
    with torch.no_grad():
        u[nz] = r[nz] / gain[nz]
    v = gain * r
    pnorm = float(u.norm() * v.norm())
    if not (pnorm == pnorm and pnorm <= max_norm):  # NaN/inf or too large
        i = int(torch.where(nz, gain.abs(), torch.full_like(gain, float("inf"))).argmin())
        raise RefusalLabError(
            f"Cannot orthogonalise the weights feeding {where}: its gain entry {i} is {float(gain[i]):.3g} (near 0) "
            f"where the direction is {float(r[i]):.3g}, so the oblique projector has norm {pnorm:.3g} > {max_norm:g}; "
            "use the hook-based ablation (ablation_hooks) for this model instead."
        )
    return u, v, pnorm


@torch.no_grad()
def orthogonalize_weights(model, direction: torch.Tensor, *,
                          max_projector_norm: float = MAX_PROJECTOR_NORM) -> OrthogonalizationReport:
    """Remove ``direction`` (normalised) from every residual-stream write of ``model.hf_model``,
    in place (the :class:`HookedChatModel` wrapping it sees the edit); arithmetic is float64.

    Exact hook-ablation equivalence without post-norms; with Gemma 2/3's post-norms the direction is
    still removed exactly from every write but logits match hook ablation only up to the RMS
    rescaling described in the module docstring (see the returned report). Every projector is
    checked before any weight is changed, so a refused model is left untouched.
    """
    a = model.adapter
    if direction.numel() != model.cfg.d_model:
        raise RefusalLabError(
            f"The direction has {direction.numel()} entries but the model's d_model is {model.cfg.d_model}; "
            "give a direction from this model's residual stream."
        )
    dev = a.embed_tokens.weight.device
    r = unit(direction).to(dev)
    plan = []  # (linear, u, v)
    worst = 1.0
    for l in range(a.n_layers):
        for lin, norm, name in ((a.o_proj(l), a.attn_post_norm(l), "post_attn_norm"),
                                (a.mlp(l).down_proj, a.mlp_post_norm(l), "post_mlp_norm")):
            if norm is None:
                plan.append((lin, r, r))
                continue
            u, v, pn = oblique_projector_factors(r, _gain(a, norm), f"layer {l}'s {name}", max_projector_norm)
            worst = max(worst, pn)
            plan.append((lin, u, v))
    _untie_lm_head(model)
    _project_rows(a.embed_tokens.weight, r)
    for lin, u, v in plan:
        _project_out_side(lin, u, v)
    if model.cfg.has_post_norms:
        return OrthogonalizationReport(False, GEMMA_NOTE, worst)
    return OrthogonalizationReport(True, "no post-norms: equals hook ablation up to rounding", 1.0)


def save_abliterated(model, out_dir: str | Path) -> Path:
    """Save the (orthogonalised) HF model as safetensors, plus the tokenizer if the model has one;
    the folder loads with ``transformers.AutoModelForCausalLM.from_pretrained``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.hf_model.save_pretrained(str(out), safe_serialization=True)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    return out


# ------------------------------------------------------------------ direction for the CLI


DEFAULT_LAYER_FRAC = 0.6
DIRECTION_FILE = "refusal_direction.safetensors"
INFO_FILE = "abliteration.json"


def default_layer(n_layers: int) -> int:
    """``round(0.6 * n_layers)`` (half up), clipped to the last layer: a cheap stand-in for
    :func:`~refusal_lab.steering.selection.select_direction` (Arditi et al.'s chosen layers sit
    around 40-70% of the depth)."""
    return max(0, min(n_layers - 1, int(DEFAULT_LAYER_FRAC * n_layers + 0.5)))


def resolve_eoi_position(tokenizer, spec: str | int | None) -> tuple[int, str]:
    """``(column, token)`` for an end-of-instruction position of left-padded instruction prompts.

    ``spec``: None or ``"last"`` (the last eoi token, column -1), a negative index ``-n_eoi..-1``,
    or the text of one eoi token when it occurs once (e.g. ``"assistant"``). Only eoi columns are
    aligned across prompts of different lengths, so other columns are refused.
    """
    from refusal_lab.errors import PromptError
    from refusal_lab.prompts import eoi_tokens

    if tokenizer is None:
        raise PromptError("The model has no tokenizer, so instruction prompts cannot be built; give --direction.")
    eoi = eoi_tokens(tokenizer)
    n = len(eoi)
    if n == 0:
        raise PromptError("The chat template appends no end-of-instruction tokens; give --direction instead.")
    shown = ", ".join(f"{k - n}={t!r}" for k, t in enumerate(eoi))
    if spec is None or (isinstance(spec, str) and spec.strip() == "last"):
        return -1, eoi[-1]
    text = str(spec).strip()
    if text.lstrip("+-").isdigit():
        k = int(text)
        if -n <= k <= -1:
            return k, eoi[k]
        raise PromptError(
            f"Position {k} is not an end-of-instruction column; use 'last' or -{n}..-1 ({shown}), the only "
            "columns aligned across instruction prompts of different lengths."
        )
    hits = [k for k, t in enumerate(eoi) if t == text or t.strip() == text]
    if len(hits) == 1:
        return hits[0] - n, eoi[hits[0]]
    why = "occurs more than once" if hits else "is not one"
    raise PromptError(f"Position {text!r} {why} of the end-of-instruction tokens; use 'last' or an index ({shown}).")


@dataclass
class DirectionChoice:
    """A refusal direction and where it came from (``info`` goes into ``abliteration.json``)."""

    vector: torch.Tensor  # float64 [d], un-normalised
    layer: int | None
    position: int | None
    info: dict[str, Any] = field(default_factory=dict)


def instruction_direction(model, layer: int | None = None, position: str | int | None = None, *,
                          select: bool = False, policy: DirectionPolicy = DirectionPolicy(), batch_size: int = 16,
                          log: Callable[[str], None] | None = None, progress: bool = True) -> DirectionChoice:
    """The refusal direction ``refusal-lab abliterate`` bakes in, from the packaged instructions.

    By default the difference in means of ``blocks.{layer}.hook_resid_pre`` at an eoi column between
    ``policy.n_train`` harmful and harmless *train* instructions (seed ``policy.seed``); ``layer``
    defaults to :func:`default_layer`, ``position`` to the last eoi token. ``select=True`` instead
    chooses layer and column by the package's one direction policy, exactly as ``refusal-lab run``'s
    direction step (:func:`~refusal_lab.steering.selection.select_refusal_direction`: every layer and
    eoi column, scored on ``policy.n_val`` val instructions per side, the policy's filters and
    fallback; slow on CPU). ``progress`` shows a bar on stderr.
    """
    from refusal_lab.errors import ConfigError, PromptError, SiteError
    from refusal_lab.prompts import build_instruction_prompts, eoi_tokens
    from refusal_lab.steering.batching import instruction_sample, n_batches, progress_bar
    from refusal_lab.steering.vectors import diff_in_means

    say = log or (lambda _msg: None)
    tok = model.tokenizer
    L = model.cfg.n_layers
    if select and (layer is not None or position is not None):
        raise ConfigError("--select chooses the layer and position itself; drop --layer/--position or --select.")
    if layer is not None and not -L <= int(layer) < L:
        raise SiteError(f"Layer {layer} does not exist; this model has layers 0..{L - 1}.")
    if select:
        if tok is None:
            raise PromptError("The model has no tokenizer, so instruction prompts cannot be built; give --direction.")
        nt, nv = policy.n_train, policy.n_val
        say(f"selecting the direction over {L} layers x {len(eoi_tokens(tok))} eoi positions "
            f"({nt}+{nt} train, {nv}+{nv} val prompts)...")
        sel = select_refusal_direction(model, policy, batch_size=batch_size, progress=progress)
        res = sel.result
        if res.fallback:
            say(f"note: {res.fallback}")
        say(f"selected layer {res.layer}, position {res.position} ({sel.position_token!r}): "
            f"bypass {res.bypass:.3f}, induce {res.induce:.3f}, kl {res.kl:.4f}")
        return DirectionChoice(res.direction, res.layer, res.position, {
            "layer": res.layer, "position": res.position, "position_token": sel.position_token,
            "site": "hook_resid_pre",
            "dataset": f"refusal_lab packaged instructions, train split: {len(sel.train['harmful'])} harmful + "
                       f"{len(sel.train['harmless'])} harmless (seed {policy.seed}); selection on val: "
                       f"{len(sel.val['harmful'])} + {len(sel.val['harmless'])}",
            "method": "difference in means, select_direction (Arditi et al. 2024)",
            "selection": {"bypass": res.bypass, "induce": res.induce, "kl": res.kl,
                          "baseline": {"harmful_val_log_odds": res.baseline.get("harmful"),
                                       "harmless_val_log_odds": res.baseline.get("harmless")},
                          "filters": dict(res.filters), "fallback": res.fallback}})
    col, col_tok = resolve_eoi_position(tok, position)
    train = instruction_sample("train", policy.n_train, policy.seed)
    hf, hl = (build_instruction_prompts(tok, train[k]) for k in ("harmful", "harmless"))
    n_hf, n_hl = len(train["harmful"]), len(train["harmless"])
    dataset = f"refusal_lab packaged instructions, train split: {n_hf} harmful + {n_hl} harmless (seed {policy.seed})"
    if layer is None:
        layer = default_layer(L)
        say(f"layer: {layer} of {L} (default round(0.6 * n_layers); --layer or --select to change)")
    layer = int(layer) % L
    if position is None:
        say(f"position: {col} = last end-of-instruction token {col_tok!r} (--position to change)")
    say(f"difference in means at blocks.{layer}.hook_resid_pre, column {col}, over {n_hf} harmful + "
        f"{n_hl} harmless train instructions...")
    total = sum(n_batches(x[0].shape[0], batch_size) for x in (hf, hl))
    with progress_bar(total, "difference in means", progress) as bar:
        v = diff_in_means(model, *hf, *hl, layer=layer, position=col, batch_size=batch_size, bar=bar)
    return DirectionChoice(v, layer, col, {
        "layer": layer, "position": col, "position_token": col_tok, "site": "hook_resid_pre",
        "dataset": dataset, "method": "difference in means (Arditi et al. 2024)"})


def write_abliteration(out_dir: str | Path, model, direction: torch.Tensor, report: OrthogonalizationReport,
                       info: dict[str, Any]) -> Path:
    """Save the orthogonalised model (:func:`save_abliterated`), the direction as
    ``refusal_direction.safetensors`` (metadata: ``info``) and ``abliteration.json``
    {model, layer, position, dataset, method, exact, ...}."""
    from refusal_lab.artifacts import write_json
    from refusal_lab.steering.vectors import save_vector

    out = save_abliterated(model, out_dir)
    meta = {"model": model.cfg.model_name, **info}
    save_vector(out / DIRECTION_FILE, direction.detach().to(torch.float64).cpu(), meta)
    record = {"model": model.cfg.model_name, "layer": info.get("layer"), "position": info.get("position"),
              "dataset": info.get("dataset"), "method": info.get("method"), "exact": report.exact,
              "exact_reason": report.note, "max_projector_norm": report.max_projector_norm,
              "direction_file": DIRECTION_FILE, "direction_norm": float(direction.to(torch.float64).norm()),
              "dtype": str(model.dtype).replace("torch.", ""),
              **{k: v for k, v in info.items() if k not in {"layer", "position", "dataset", "method"}}}
    write_json(out / INFO_FILE, record)
    return out
