"""DLA components add up to the model's own logit difference, on every architecture."""

import torch

from refusal_lab.dla import direct_logit_attribution
from refusal_lab.models.hooked import HookedChatModel
from tests.conftest import random_batch


def test_components_sum_to_logit_diff(tiny: HookedChatModel):
    ids, mask = random_batch(tiny, b=3, T=9)
    r, c = 5, 9
    res = direct_logit_attribution(tiny, ids, mask, r, c)
    # the model's own pre-softcap logit difference from ln_final
    _, cache = tiny.run_with_cache(ids, mask, names=["ln_final.hook_normalized"], logits="last")
    normed = cache["ln_final.hook_normalized"][:, -1]
    w = tiny.adapter.lm_head.weight
    direct = normed @ (w[r] - w[c])
    assert torch.allclose(res.logit_diff, direct, atol=1e-4)
    assert torch.allclose(res.components.sum(1), direct, atol=1e-4)
    assert torch.allclose(res.accumulated[:, -1], direct, atol=1e-4)
    # accumulated residual at L{l} pre = embed + all components before layer l
    cum = torch.cumsum(res.components, 1)
    assert torch.allclose(res.accumulated[:, 0], cum[:, 0], atol=1e-4)
    L = tiny.cfg.n_layers
    for l in range(1, L):
        assert torch.allclose(res.accumulated[:, 2 * l], cum[:, 2 * l], atol=1e-4)
    # heads sum to their layer's attention component (no o_proj bias in these configs)
    for l in range(L):
        assert torch.allclose(res.heads[:, l].sum(-1), res.components[:, 1 + 2 * l], atol=1e-4)
