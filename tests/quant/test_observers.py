import itertools

import pytest
import torch

from pdq.quant.functional import fake_quantize, qmax
from pdq.quant.observers import CosineObserver, LpObserver, MinMaxObserver


def reference_2d_search(x: torch.Tensor, bits: int, p: float = 2.4, grid: int = 100):
    """Independent, loop-by-loop transcription of spec §1.2 for one channel."""
    q = qmax(bits)
    rng = max(x.max().item(), 0.0) - min(x.min().item(), 0.0)
    best = (float("inf"), None, None)
    for i, zp in itertools.product(range(1, grid + 1), range(q + 1)):
        d = max(rng * i / grid / q, 1e-8)
        err = (x - fake_quantize(x, torch.tensor(d), torch.tensor(float(zp)), bits)).abs().pow(p).mean().item()
        if err < best[0]:
            best = (err, d, zp)
    return best


def test_2d_search_matches_reference_loop():
    torch.manual_seed(0)
    w = torch.randn(3, 40) * torch.tensor([[0.5], [1.0], [2.0]]) + torch.tensor([[0.3], [-0.2], [0.0]])
    scale, zp = LpObserver()(w, 3, ch_axis=0)
    for c in range(3):
        err, d, z = reference_2d_search(w[c], 3)
        assert scale[c].item() == pytest.approx(d, rel=1e-5)
        assert zp[c].item() == z


def test_search_finds_exact_grid():
    # values exactly on a 4-bit grid with scale 0.1 and zero point 3 -> zero error at that candidate
    x = (torch.arange(16.0) - 3) * 0.1
    x = x.repeat(5)
    scale, zp = LpObserver()(x, 4)
    assert scale.item() == pytest.approx(0.1, rel=1e-6) and zp.item() == 3
    assert torch.allclose(fake_quantize(x, scale, zp, 4), x, atol=1e-6)


def test_1d_search_clips_outlier_unlike_minmax():
    x = torch.cat([torch.rand(10000), torch.tensor([20.0])])  # one-sided, with one outlier
    lp_scale, lp_zp = LpObserver()(x, 4)
    mm_scale, _ = MinMaxObserver()(x, 4)
    assert lp_zp.item() == 0
    assert mm_scale.item() == pytest.approx(20.0 / 15)
    assert lp_scale.item() < 0.8 * mm_scale.item()  # the outlier is clipped
    err = lambda s: (x - fake_quantize(x, s, torch.tensor(0.0), 4)).abs().pow(2.4).mean()  # noqa: E731
    assert err(lp_scale) < err(mm_scale)


def test_negative_tensor_uses_top_zero_point():
    x = -torch.rand(500) - 0.1
    scale, zp = LpObserver()(x, 2)
    assert zp.item() == qmax(2)
    assert fake_quantize(x, scale, zp, 2).max().item() <= 0


def test_cosine_search_beats_minmax_in_cosine_distance():
    torch.manual_seed(1)
    x = torch.randn(20000) ** 3  # heavy tails
    cos_s, cos_z = CosineObserver()(x, 3)
    mm_s, mm_z = MinMaxObserver()(x, 3)
    cos = lambda s, z: torch.nn.functional.cosine_similarity(fake_quantize(x, s, z, 3), x, dim=0)  # noqa: E731
    assert cos(cos_s, cos_z) > cos(mm_s, mm_z)


def test_subsampled_scoring_is_seeded_and_close():
    torch.manual_seed(2)
    x = torch.randn(200000).relu()
    a = LpObserver(max_samples=20000)(x, 4)
    b = LpObserver(max_samples=20000)(x, 4)
    full = LpObserver()(x, 4)
    assert torch.equal(a[0], b[0])
    assert a[0].item() == pytest.approx(full[0].item(), rel=0.05)
