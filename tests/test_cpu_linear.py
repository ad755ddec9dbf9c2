"""The oneDNN float32 CPU linear (models/cpu_linear.py): equal to ``F.linear`` to rounding, used only
where no gradient is needed, switchable off, and the model's forward unchanged to rounding."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refusal_lab.models import cpu_linear
from refusal_lab.models.cpu_linear import OneDNNLinear, linear, use_onednn_linear
from tests.conftest import random_batch

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this PyTorch build has no oneDNN linear")


def _calls(monkeypatch) -> list:
    seen = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(*args):
        seen.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    return seen


@pytest.mark.parametrize("shape", [(3, 7, 40), (5, 40), (64, 40), (2, 1, 40)])
@pytest.mark.parametrize("d_out", [24, 600])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_equals_f_linear(shape, d_out, with_bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(d_out, 40, generator=g)
    b = torch.randn(d_out, generator=g) if with_bias else None
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = linear(x, w, b)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, 9, generator=g).transpose(1, 2)  # [6, 9, 40], not contiguous
    w = torch.randn(600, 40, generator=g)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_path_choice(monkeypatch):
    """oneDNN for float32 CPU products without gradient (wide outputs, or many rows), F.linear otherwise."""
    seen = _calls(monkeypatch)
    w_wide, w_narrow = torch.randn(600, 40), torch.randn(24, 40)
    with torch.no_grad():
        linear(torch.randn(2, 3, 40), w_wide)
        linear(torch.randn(4, 40), w_narrow)  # narrow and few rows: F.linear
        linear(torch.randn(80, 40), w_narrow)  # narrow but many rows: oneDNN
        linear(torch.randn(2, 40).double(), w_wide.double())  # float64: F.linear
    assert seen == [torch.Size([2, 3, 40]), torch.Size([80, 40])]
    x = torch.randn(2, 40, requires_grad=True)
    y = linear(x, w_wide)  # autograd must differentiate it: F.linear
    assert len(seen) == 2 and y.requires_grad
    y.sum().backward()
    torch.testing.assert_close(x.grad, w_wide.sum(0).expand(2, 40), rtol=1e-5, atol=1e-4)
    linear(torch.randn(2, 40), w_wide)  # grad mode on but nothing requires grad: oneDNN
    assert len(seen) == 3
    monkeypatch.setenv(cpu_linear.ENV, "torch")
    with torch.no_grad():
        linear(torch.randn(2, 40), w_wide)
    assert len(seen) == 3


def test_switch_keeps_the_module():
    """The class switch keeps parameters, hooks, state_dict, isinstance, deepcopy; subclasses are left alone."""

    class Custom(nn.Linear):
        pass

    net = nn.Sequential(nn.Linear(40, 600), nn.ReLU(), Custom(600, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(3, 40)
    with torch.no_grad():
        want = net(x)
    assert use_onednn_linear(net) == 1
    assert type(net[0]) is OneDNNLinear and isinstance(net[0], nn.Linear) and type(net[2]) is Custom
    with torch.no_grad():
        torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)
    assert len(seen) == 2
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    twin = copy.deepcopy(net)
    assert type(twin[0]) is OneDNNLinear
    with torch.no_grad():
        net[0].weight.mul_(2)  # an in-place weight edit (abliteration does these) is seen at once
        torch.testing.assert_close(net[0](x), F.linear(x, net[0].weight, net[0].bias), rtol=1e-5, atol=1e-5)


def test_model_forward_matches_torch_path(tiny, monkeypatch):
    """Every architecture: the hooked model's logits with oneDNN equal those of PyTorch's products to
    rounding, and its linears really went through oneDNN."""
    assert any(type(m) is OneDNNLinear for m in tiny.hf_model.modules())
    ids, mask = random_batch(tiny, b=8)  # 80 rows: the tiny models' narrow products take oneDNN too
    with torch.no_grad():
        seen = _calls(monkeypatch)
        fast = tiny(ids, mask)
        assert seen
        monkeypatch.setenv(cpu_linear.ENV, "torch")
        n = len(seen)
        ref = tiny(ids, mask)
        assert len(seen) == n
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grad_mode", [True, False])
def test_derivatives_pass_through(grad_mode):
    """Forward-mode AD, torch.func's jvp / vmap / grad: the tangents and gradients are F.linear's
    (oneDNN's operator has no derivative formulas and would drop them silently)."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(2)
    w, x, t = torch.randn(600, 40, generator=g), torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    want = t @ w.T
    with torch.set_grad_enabled(grad_mode):
        torch.testing.assert_close(torch.func.jvp(lambda a: linear(a, w), (x,), (t,))[1], want, rtol=1e-5, atol=1e-4)
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(linear(fwAD.make_dual(x, t), w)).tangent
        torch.testing.assert_close(tangent, want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.vmap(lambda r: linear(r, w))(x), x @ w.T, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.func.jacrev(lambda a: linear(a, w).sum())(x), w.sum(0).expand(3, 40),
                                   rtol=1e-5, atol=1e-4)


def test_atp_star_same_on_both_paths(tiny, monkeypatch):
    """AtP*'s QK fix (forward-mode JVPs through the q/k projections) gives the same correction with
    every product eligible for oneDNN as with PyTorch's products only."""
    from refusal_lab.models.hooked import ActivationCache
    from refusal_lab.patching.attribution import receiver_gradients_qk
    from refusal_lab.patching.engine import Batch, GridSpec, LogitDiff, source_sites
    from refusal_lab.patching.qk_fix import qk_fix_correction

    monkeypatch.setattr(cpu_linear, "NARROW", 0)  # every product of the tiny model takes oneDNN where it may
    g = torch.Generator().manual_seed(3)
    rec = Batch(torch.randint(0, tiny.cfg.d_vocab, (2, 8), generator=g), torch.ones(2, 8, dtype=torch.long))
    spec = GridSpec("heads", list(range(tiny.cfg.n_layers)), [5, 7], list(range(tiny.cfg.n_heads)))

    def correction():
        acts, _, attn = receiver_gradients_qk(tiny, rec, source_sites(tiny, spec), LogitDiff(3, 7))
        gs = torch.Generator().manual_seed(4)
        source = ActivationCache({s: acts[s] + 0.1 * torch.randn(acts[s].shape, generator=gs) for s in sorted(acts)})
        return qk_fix_correction(tiny, acts, source, attn.records, attn.resid_pre, attn.position_ids,
                                 spec.layers, spec.heads, spec.cols)[2]

    fast = correction()
    monkeypatch.setenv(cpu_linear.ENV, "torch")
    ref = correction()
    assert ref.abs().max() > 0
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
