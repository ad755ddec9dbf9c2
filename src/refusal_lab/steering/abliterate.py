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

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from refusal_lab.errors import RefusalLabError
from refusal_lab.steering.interventions import unit

__all__ = ["OrthogonalizationReport", "oblique_projector_factors", "orthogonalize_weights", "save_abliterated"]

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
