"""Direct logit attribution of the refusal logit difference at the last position.

Every residual-stream component x (the embedding, each ``attn_out``, each ``mlp_out``, each head's
contribution, or the accumulated residual at a layer) is projected on the logit-difference
direction through the final norm *with the final residual's own scale*:

    DLA(x) = (x / rms(resid_final)) · (g ⊙ (W_U[:, refusal] - W_U[:, compliance]))

i.e. TransformerLens's ``apply_ln_to_stack`` with the last layer's scale (``g`` is the final
RMSNorm gain; Gemma's (1 + w)). With that scale the components sum exactly to the model's logit
difference (before Gemma 2's final soft-capping, which is monotone), so the bars add up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refusal_lab.models.hooked import HookedChatModel

SCALE_NOTE = (
    "Each component is divided by the RMS of the final residual stream (the scale the final norm "
    "really applied, as TransformerLens's apply_ln_to_stack with the last layer) and multiplied by "
    "the final norm's gain, so the components sum to the logit difference (before any final "
    "soft-capping)."
)


@dataclass
class DLAResult:
    accumulated_labels: list[str]
    accumulated: torch.Tensor  # [n, len(accumulated_labels)]
    component_labels: list[str]
    components: torch.Tensor  # [n, 1 + 2L] (+ bias terms folded into their component)
    heads: torch.Tensor  # [n, L, H]
    logit_diff: torch.Tensor  # [n] the model's own (pre-softcap) logit difference


@torch.no_grad()
def direct_logit_attribution(
    model: HookedChatModel, ids: torch.Tensor, mask: torch.Tensor, refusal_id: int, compliance_id: int
) -> DLAResult:
    L = model.cfg.n_layers
    a = model.adapter
    names = lambda n: n.endswith(("hook_resid_pre", "hook_resid_mid", "hook_attn_out", "hook_mlp_out",
                                  "attn.hook_result", "hook_embed", "hook_resid_post"))  # noqa: E731
    _, cache = model.run_with_cache(ids, mask, names=names, logits="last")
    # float32 throughout (bf16/fp16 models too), on one device: with a device_map the layers'
    # activations, the final norm and the unembedding may each live on a different device
    dev = a.lm_head.weight.device
    w_u = a.lm_head.weight[[refusal_id, compliance_id]].float()
    direction = (w_u[0] - w_u[1]) * a.ln_scale_weight(a.final_norm).float().to(dev)  # [d]
    final = cache[f"blocks.{L - 1}.hook_resid_post"][:, -1].float().to(dev)
    scale = a.rms_scale(a.final_norm, final)  # [n, 1]

    def proj(x: torch.Tensor) -> torch.Tensor:  # [n, ..., d] at the last position -> [n, ...]
        return (x.float().to(dev) * scale.view(-1, *([1] * (x.dim() - 2)), 1)) @ direction

    acc_labels, acc = [], []
    for l in range(L):
        for site, tag in (("hook_resid_pre", "pre"), ("hook_resid_mid", "mid")):
            acc_labels.append(f"L{l} {tag}")
            acc.append(proj(cache[f"blocks.{l}.{site}"][:, -1]))
    acc_labels.append("final")
    acc.append(proj(final))

    comp_labels, comps, heads = ["embed"], [proj(cache["hook_embed"][:, -1])], []
    for l in range(L):
        comp_labels += [f"L{l} attn", f"L{l} mlp"]
        comps += [proj(cache[f"blocks.{l}.hook_attn_out"][:, -1]), proj(cache[f"blocks.{l}.hook_mlp_out"][:, -1])]
        heads.append(proj(model.head_results(cache, l)[:, -1]))  # [n, H]
    bias = a.lm_head.bias
    logit_diff = proj(final) + (0 if bias is None else float(bias[refusal_id] - bias[compliance_id]))
    return DLAResult(acc_labels, torch.stack(acc, 1), comp_labels, torch.stack(comps, 1), torch.stack(heads, 1), logit_diff)
