"""The loss terms of pdq.recon.losses, each against its formula."""

import pytest
import torch
from torch import nn

from pdq.recon.losses import (
    RoundingRegularizer,
    bn_statistics_loss,
    prediction_difference,
    proximity_loss,
    reconstruction_loss,
    rounding_penalty,
)


def test_reconstruction_loss_sums_channels_and_averages_the_rest():
    out, target = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    target[:, 0] = 3.0
    assert reconstruction_loss(out, target, 2.0).item() == pytest.approx(9 + 1 + 1)
    assert reconstruction_loss(out, target, 2.4).item() == pytest.approx(3 ** 2.4 + 2)
    assert reconstruction_loss(target, target, 2.0).item() == 0.0


@pytest.mark.parametrize("shape,layout", [((8, 6, 5, 5), torch.channels_last), ((8, 6, 5, 5), torch.contiguous_format),
                                          ((8, 10), torch.contiguous_format)])
def test_squared_reconstruction_loss_has_autograds_gradients(shape, layout):
    """p = 2 is a function of its own (fewer passes over memory): the value of the formula, the same gradients."""
    g = torch.Generator().manual_seed(0)
    out0, target0 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    if len(shape) == 4:
        out0 = out0.contiguous(memory_format=layout)
    results = []
    for loss_fn in (lambda o, t: reconstruction_loss(o, t, 2.0), lambda o, t: ((o - t) * (o - t)).sum(1).mean()):
        out, target = out0.clone().requires_grad_(True), target0.clone().requires_grad_(True)
        loss = loss_fn(out, target)
        (3 * loss).backward()
        results.append((loss.item(), out.grad, target.grad))
    (value, g_out, g_target), (ref, g_out_ref, g_target_ref) = results
    assert value == pytest.approx(ref, rel=1e-6)
    assert torch.equal(g_out, g_out_ref) and torch.equal(g_target, g_target_ref)


def test_prediction_difference_is_the_tempered_kl_without_t_squared():
    torch.manual_seed(0)
    z_q, z_fp, t = torch.randn(5, 10), torch.randn(5, 10), 4.0
    p, q = torch.softmax(z_fp / t, 1), torch.softmax(z_q / t, 1)
    expected = (p * (p.log() - q.log())).sum(1).mean()
    assert prediction_difference(z_q, z_fp, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert prediction_difference(z_fp, z_fp, t).item() == pytest.approx(0.0, abs=1e-7)


def test_rounding_penalty_is_zero_at_hard_values_and_one_per_weight_at_half():
    assert rounding_penalty(torch.tensor([0.0, 1.0, 1.0]), 2.0).item() == 0.0
    assert rounding_penalty(torch.full((7,), 0.5), 20.0).item() == pytest.approx(7.0)


def test_rounding_regularizer_counts_steps_from_one_and_ends_at_the_end_beta():
    """The reference code's counter: at T = 100 and warm-up 0.2 the term is off for steps 1..19 and beta
    reaches its end value at step 100."""
    reg = RoundingRegularizer(100, warmup=0.2, b_range=(20.0, 2.0))
    h = [torch.full((3,), 0.5)]
    assert [t for t in range(1, 101) if reg(h, t) is None] == list(range(1, 20))
    assert reg.beta(20) == 20.0 and reg.beta(100) == 2.0 and reg.beta(60) == pytest.approx(11.0)
    assert reg(h, 20).item() == pytest.approx(3.0)


def _bn(c, cls=nn.BatchNorm2d):
    bn = cls(c)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    return bn


def test_bn_statistics_loss_uses_per_sample_statistics():
    torch.manual_seed(0)
    bn, a = _bn(3), torch.randn(4, 3, 5, 5)
    mu = a.flatten(2).mean(-1)
    sigma = (a.flatten(2).var(-1, unbiased=True) + 1e-6).sqrt()
    target_sigma = (bn.running_var + 1e-6).sqrt()
    expected = ((mu - bn.running_mean) ** 2).sum(1).mean() + ((sigma - target_sigma) ** 2).sum(1).mean()
    assert bn_statistics_loss([a], [bn]).item() == pytest.approx(expected.item(), rel=1e-6)
    # normalised by another denominator: the per-sample sum divided by it
    assert bn_statistics_loss([a], [bn], denominator=8).item() == pytest.approx(expected.item() / 2, rel=1e-6)


@pytest.mark.parametrize("shape,channels_last", [((4, 3, 5, 5), False), ((4, 3, 5, 5), True), ((4, 3, 7), False)],
                         ids=["nchw", "channels_last", "1d"])
def test_bn_statistics_loss_gradient_is_autograds_var_mean_gradient(shape, channels_last):
    """The one-pass backward of the per-sample statistics against autograd through `torch.var_mean`, in
    float64 (gradcheck) and in float32 against the reference formula's gradient."""
    from pdq.recon.losses import _SpatialVarMean

    torch.manual_seed(0)
    a = torch.randn(*shape, dtype=torch.float64)
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(_SpatialVarMean.apply, (a.requires_grad_(True),))
    bn, x = _bn(3), torch.randn(*shape).mul(2).add(0.3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mine = x.clone().requires_grad_(True)
    bn_statistics_loss([mine], [bn], denominator=3).backward()
    ref = x.clone().requires_grad_(True)
    var, mu = torch.var_mean(ref.flatten(2), -1, correction=1)
    target_sigma = (bn.running_var + 1e-6).sqrt()
    ((((mu - bn.running_mean) ** 2).sum(1) + (((var + 1e-6).sqrt() - target_sigma) ** 2).sum(1)).sum() / 3).backward()
    assert torch.allclose(mine.grad, ref.grad, rtol=1e-5, atol=1e-7) and ref.grad.abs().sum() > 0


@pytest.mark.parametrize("shape,cls", [((6, 3), nn.BatchNorm1d), ((6, 3, 1, 1), nn.BatchNorm2d)],
                         ids=["batchnorm1d", "1x1_map"])
def test_bn_statistics_loss_on_single_position_inputs_is_finite_and_has_the_mean_term(shape, cls):
    torch.manual_seed(0)
    bn = _bn(3, cls)
    a = torch.randn(*shape, requires_grad=True)
    loss = bn_statistics_loss([a], [bn])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    expected = ((a.detach().reshape(6, 3) - bn.running_mean) ** 2).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_proximity_loss():
    x, target = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    assert proximity_loss(x, target).item() == pytest.approx(3.0)
    assert proximity_loss(x, target, denominator=4).item() == pytest.approx(1.5)
