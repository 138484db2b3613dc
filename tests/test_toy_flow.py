import pytest
import torch
import torch.nn.functional as F

from toyworld import toy_flow

B = 4  # interior border (px) ignored when measuring flow


def texture(size, seed, sigma=2.0):
    """Smooth random RGB texture in [-1, 1]: Gaussian-blurred white noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, size, size, generator=g)
    r = int(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="circular"), k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="circular"), k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    x = x - x.mean()
    return x / x.abs().max()


def shifted_pair(size, dx, dy, seed=0, pad=16):
    """Crop two frames from one larger texture so that b(x + (dx, dy)) = a(x) without wrap-around."""
    t = texture(size + 2 * pad, seed)
    a = t[..., pad:pad + size, pad:pad + size]
    b = t[..., pad - dy:pad - dy + size, pad - dx:pad - dx + size]
    return a.contiguous(), b.contiguous()


def interior_median(flow):
    return flow[0, :, B:-B, B:-B].flatten(1).median(1).values


@pytest.mark.parametrize("dx,dy", [(2, -1), (3, 0), (0, 3)])
def test_small_shift_32(dx, dy):
    a, b = shifted_pair(32, dx, dy)
    flow = toy_flow(a, b)
    assert flow.shape == (1, 2, 32, 32)
    assert (interior_median(flow) - torch.tensor([dx, dy], dtype=torch.float32)).abs().max() < 0.5


@pytest.mark.parametrize("dx,dy", [(10, 0), (-7, 7), (20, -12)])  # 20 px also catches a missing x2 on upsampling
def test_large_shift_256(dx, dy):
    a, b = shifted_pair(256, dx, dy, seed=1, pad=24)
    med = interior_median(toy_flow(a, b))
    assert (med - torch.tensor([dx, dy], dtype=torch.float32)).abs().max() < 1.0


def test_single_scale_fails_on_large_shift():
    # Why the pyramid exists: without it the linearisation only sees ~1 px, so a 10 px shift is missed.
    a, b = shifted_pair(256, 10, 0, seed=1)
    assert (interior_median(toy_flow(a, b, levels=1))[0] - 10).abs() > 3


def test_batch_items_are_independent():
    shifts = [(2, 1), (-3, 0), (1, -2)]
    pairs = [shifted_pair(32, dx, dy, seed=i) for i, (dx, dy) in enumerate(shifts)]
    flow = toy_flow(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))
    med = flow[:, :, B:-B, B:-B].flatten(2).median(2).values
    assert (med - torch.tensor(shifts, dtype=torch.float32)).abs().max() < 0.5


def test_identical_frames_give_zero_flow():
    a, _ = shifted_pair(32, 0, 0, seed=5)
    assert toy_flow(a, a.clone())[..., B:-B, B:-B].abs().max() < 0.1


def test_gradients_reach_both_frames():
    a, b = shifted_pair(32, 2, -1, seed=2)
    a.requires_grad_(True)
    b.requires_grad_(True)
    toy_flow(a, b).sum().backward()
    for x in (a, b):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradients_match_finite_differences():
    # Catches a stray .detach() / non-differentiable step that would silently give wrong (but finite) gradients.
    g = torch.Generator().manual_seed(3)
    a, b = (torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64).mul(2).sub(1).requires_grad_()
            for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: toy_flow(a, b, iters=5), (a, b), fast_mode=True,
                                    eps=1e-6, atol=1e-4, rtol=1e-3)


def test_moving_sprite():
    # Flat square on a flat background: only its edges carry information, the smoothness term fills the inside.
    a = torch.zeros(1, 3, 32, 32)
    b = torch.zeros(1, 3, 32, 32)
    x0, y0 = 9, 10
    for img, x in ((a, x0), (b, x0 + 2)):
        img[0, 0, y0:y0 + 12, x:x + 12] = 1
        img[0, 1:, y0:y0 + 12, x:x + 12] = -1
    mean = toy_flow(a, b)[0, :, y0:y0 + 12, x0:x0 + 12].mean((1, 2))
    assert (mean - torch.tensor([2.0, 0.0])).abs().max() < 0.7
