"""wsss.refine.resize: bilinear resizing as two matrix products, against a pixel-by-pixel reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss.ops.cam_fusion import resize_kept
from wsss.refine.resize import MATRIX_MAX_SIDE, interpolation_matrix, resize_bilinear


def _ref_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners False, one output pixel at a time: the source position of output i is
    (i + 0.5) * in / out - 0.5, clamped at 0; the two nearest input pixels per axis, the far one
    clamped to the last."""
    h, w = x.shape[-2:]
    out = x.new_zeros(*x.shape[:-2], *size)

    def taps(i: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(math.floor(src)), n_in - 1)
        return lo, min(lo + 1, n_in - 1), src - lo

    for i in range(size[0]):
        r0, r1, fr = taps(i, h, size[0])
        for j in range(size[1]):
            c0, c1, fc = taps(j, w, size[1])
            out[..., i, j] = ((1 - fr) * ((1 - fc) * x[..., r0, c0] + fc * x[..., r0, c1])
                              + fr * ((1 - fc) * x[..., r1, c0] + fc * x[..., r1, c1]))
    return out


@pytest.mark.parametrize("shape,size", [((2, 3, 4, 5), (9, 13)), ((1, 2, 6, 6), (3, 4)),
                                        ((2, 1, 1, 3), (4, 7)), ((1, 1, 5, 5), (5, 5))])
def test_resize_bilinear_matches_pixel_reference_and_interpolate(shape, size) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    ref = _ref_resize(x, size)
    got = resize_bilinear(x, size)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(F.interpolate(x, size=size, mode="bilinear", align_corners=False), ref,
                               rtol=0, atol=1e-12)
    assert got.data_ptr() != x.data_ptr()  # always a new tensor (callers clamp it in place)


def test_resize_bilinear_token_grid_to_crop_float32_and_gradient() -> None:
    """The seg loss's case: (B, C, 16, 16) -> 224 x 224 in float32, value and gradient against
    F.interpolate, also under bf16 autocast (the products stay float32)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, 16, requires_grad=True)
    g = torch.randn(2, 5, 224, 224)
    ref = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = resize_bilinear(x, (224, 224))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(got, x, g)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-4)


def test_resize_bilinear_large_inputs_use_the_kernel() -> None:
    """Above MATRIX_MAX_SIDE (and for half precision) the result is F.interpolate's own."""
    x = torch.rand(1, 2, MATRIX_MAX_SIDE + 1, 8)
    ref = F.interpolate(x, size=(70, 9), mode="bilinear", align_corners=False)
    assert torch.equal(resize_bilinear(x, (70, 9)), ref)
    h = torch.rand(1, 2, 4, 4).to(torch.bfloat16)
    assert torch.equal(resize_bilinear(h, (8, 8)), F.interpolate(h, size=(8, 8), mode="bilinear"))


def test_interpolation_matrix_rows_sum_to_one_and_rejects_empty_sizes() -> None:
    w = interpolation_matrix(7, 20, dtype=torch.float64)
    assert w.shape == (20, 7)
    torch.testing.assert_close(w.sum(1), torch.ones(20, dtype=torch.float64))
    assert int((w != 0).sum(1).max()) <= 2
    with pytest.raises(ValueError, match="positive"):
        interpolation_matrix(0, 4)


def test_resize_kept_equals_resizing_every_channel_on_the_kept_ones() -> None:
    """resize_kept: the kept channels as F.interpolate of the whole stack, the others exactly 0."""
    torch.manual_seed(0)
    cam = torch.rand(3, 6, 40, 28, dtype=torch.float64)
    keep = torch.tensor([[1, 0, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    full = F.interpolate(cam, size=(5, 4), mode="bilinear", align_corners=False)
    got = resize_kept(cam, (5, 4), keep.float())
    torch.testing.assert_close(got, full * keep[:, :, None, None], rtol=0, atol=1e-12)
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))
    with pytest.raises(ValueError, match="keep must be"):
        resize_kept(cam, (5, 4), keep[:, :5])
