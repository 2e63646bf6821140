import pytest
import torch

from pdq.quant.functional import fake_quantize, qmax, qparams_from_range, round_ste
from pdq.quant.quantizers import ActQuantizer, WeightQuantizer, check_bits


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_output_lies_on_grid_within_range(bits):
    x = torch.randn(1000) * 3
    scale, zp = torch.tensor(0.05), torch.tensor(float(2 ** (bits - 1)))
    xq = fake_quantize(x, scale, zp, bits)
    lo, hi = -zp * scale, (qmax(bits) - zp) * scale
    assert xq.min() >= lo - 1e-6 and xq.max() <= hi + 1e-6
    k = xq / scale + zp  # integer grid index
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert torch.equal(fake_quantize(xq, scale, zp, bits), xq)  # idempotent


def test_rounds_to_nearest_grid_point():
    scale, zp = torch.tensor(0.5), torch.tensor(0.0)
    x = torch.tensor([0.0, 0.2, 0.26, 0.74, 1.1, 7.4, 9.0, -1.0])
    assert fake_quantize(x, scale, zp, 4).tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 7.5, 7.5, 0.0]


def test_ste_gradient_identity_inside_zero_outside():
    x = torch.tensor([-2.0, -0.3, 0.1, 0.6, 5.0], requires_grad=True)
    scale, zp = torch.tensor(0.1), torch.tensor(5.0)  # range [-0.5, 1.0] at 4 bit
    fake_quantize(x, scale, zp, 4).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    y = torch.tensor([0.5])
    assert torch.equal(round_ste(y), torch.tensor([0.0]) + round_ste(y).detach() * 0 + y.round())


def test_learned_scale_gets_lsq_gradient():
    x = torch.tensor([0.26, 3.0, -3.0])
    s = torch.tensor(0.1, requires_grad=True)
    z = torch.tensor(3.0)
    for xi, expected in [(0.26, round(2.6) - 2.6), (3.0, 15 - 3.0), (-3.0, -3.0)]:
        s.grad = None
        fake_quantize(torch.tensor(xi), s, z, 4).backward()
        assert s.grad.item() == pytest.approx(expected, abs=1e-5)
    assert x.numel() == 3


def test_qparams_from_range_covers_zero_and_range():
    scale, zp = qparams_from_range(torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 3.0]), 8)
    assert scale.tolist() == pytest.approx([3.0 / 255, 3.0 / 255])
    assert zp.tolist() == [85.0, 0.0]  # 0.5..3 is widened to 0..3
    tiny, _ = qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), 4)
    assert tiny.item() == pytest.approx(1e-8)


@pytest.mark.parametrize("bad", [1, 9, 16, 0, "4", 4.0, True])
def test_bits_outside_2_8_and_not_32_rejected(bad):
    with pytest.raises(ValueError, match="accepted: an integer 2..8, or 32"):
        check_bits(bad)


def test_quantizer_modules_per_channel_and_passthrough():
    w = torch.randn(4, 3, 3, 3)
    q = WeightQuantizer(4, 4)
    with pytest.raises(RuntimeError, match="before calibration"):
        q(w)
    q.set_qparams(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([8.0, 8.0, 8.0, 8.0]))
    out = q(w)
    for c, s in enumerate([0.1, 0.2, 0.3, 0.4]):
        k = out[c] / s
        assert torch.allclose(k, k.round(), atol=1e-4)
    q.enabled = False
    assert q(w) is w
    fp = ActQuantizer(32)
    x = torch.randn(5)
    assert fp(x) is x
