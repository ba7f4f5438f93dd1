"""CAM normalisation and multi-scale fusion against step-by-step loop references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsss.ops.cam_fusion import (
    AFA_FUSE,
    AREAM_FUSE,
    fuse_multiscale,
    kept_channels,
    multiscale_cam,
    normalize_cam,
)


def _normalize_loop(cam: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(cam)
    for b in range(cam.shape[0]):
        for k in range(cam.shape[1]):
            m = cam[b, k]
            lo = min(float(v) for v in m.flatten())
            shifted = m - lo
            hi = max(float(v) for v in shifted.flatten())
            out[b, k] = shifted / (hi + eps)
    return out


def _toy_cam_fn(seed: int = 0, k: int = 3):
    """A deterministic, flip-asymmetric 'network': 3x3 conv + stride-4 average pool."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, 3, 3, 3, generator=g, dtype=torch.float64)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.conv2d(x, weight, padding=1), 4, ceil_mode=True)

    return fn


@pytest.mark.parametrize("shape", [(1, 1, 3, 4), (2, 3, 5, 5), (3, 2, 1, 6)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_normalize_cam_matches_loop(shape, eps):
    torch.manual_seed(0)
    cam = torch.randn(*shape, dtype=torch.float64) * 3
    torch.testing.assert_close(normalize_cam(cam, eps), _normalize_loop(cam, eps))


def test_normalize_cam_constant_map_is_zero():
    cam = torch.full((1, 2, 3, 3), 4.0)
    assert torch.equal(normalize_cam(cam), torch.zeros_like(cam))


def _official_afa(cam_fn, x, scales):
    """AFA multi_scale_cam, step by step (docs/methods/afa.md section 3)."""
    b, _, h, w = x.shape
    per_scale = []
    for s in scales:
        if s == 1.0:
            xs = x
        else:
            xs = F.interpolate(x, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False)
        raw = cam_fn(torch.cat([xs, xs.flip(-1)], 0))
        up = F.interpolate(raw, size=(h, w), mode="bilinear", align_corners=False)
        fused = torch.max(up[:b], up[b:].flip(-1))
        per_scale.append(F.relu(fused))
    total = per_scale[0]
    for m in per_scale[1:]:
        total = total + m
    return _normalize_loop(total, 1e-5)


def _official_aream(cam_fn, x, scales):
    """AReAM gen_msf_cam merge, step by step (docs/methods/aream.md section 5.1)."""
    b, _, h, w = x.shape
    maps = []
    for s in scales:
        size = (int(s * h), int(s * w))
        xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        raw = cam_fn(torch.cat([xs, xs.flip(-1)], 0))
        up = F.interpolate(raw, size=(h, w), mode="bilinear", align_corners=False)
        maps.append(up[:b])
        maps.append(up[b:].flip(-1))
    total = maps[0]
    for m in maps[1:]:
        total = total + m
    return _normalize_loop(F.relu(total), 1e-6)


@pytest.mark.parametrize("size", [(16, 16), (20, 28), (13, 17)])
@pytest.mark.parametrize("batch", [1, 2])
def test_multiscale_cam_afa_official(size, batch):
    torch.manual_seed(1)
    x = torch.randn(batch, 3, *size, dtype=torch.float64)
    fn = _toy_cam_fn(batch)
    scales = (1.0, 0.5, 1.5)
    out = multiscale_cam(fn, x, scales, **AFA_FUSE)
    assert out.shape == (batch, 3, *size)
    torch.testing.assert_close(out, _official_afa(fn, x, scales))


@pytest.mark.parametrize("scales", [(1.0,), (0.5, 1.0, 1.5)])
def test_multiscale_cam_aream_official(scales):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 18, 22, dtype=torch.float64)
    fn = _toy_cam_fn(3, k=4)
    out = multiscale_cam(fn, x, scales, **AREAM_FUSE)
    torch.testing.assert_close(out, _official_aream(fn, x, scales))


@pytest.mark.parametrize("fuse", ["afa", "aream"])
@pytest.mark.parametrize("flip", [True, False])
def test_keep_fuses_only_the_kept_classes(fuse, flip):
    """keep=labels gives the full fusion masked by the labels: the kept classes as if every class was
    fused, zeros elsewhere (rows with 0, 1 and all classes kept)."""
    torch.manual_seed(4)
    x = torch.randn(3, 3, 18, 22, dtype=torch.float64)
    fn = _toy_cam_fn(5, k=5)
    labels = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    kw = AFA_FUSE if fuse == "afa" else AREAM_FUSE
    full = multiscale_cam(fn, x, (1.0, 0.5, 1.5), flip=flip, **kw)
    kept = multiscale_cam(fn, x, (1.0, 0.5, 1.5), flip=flip, keep=labels, **kw)
    torch.testing.assert_close(kept, full * labels[..., None, None])
    with pytest.raises(ValueError, match="keep"):
        multiscale_cam(fn, x, (1.0,), keep=labels[:2], **kw)


def test_kept_channels_matches_loop():
    torch.manual_seed(6)
    keep = torch.rand(7, 6) < 0.4
    idx, valid = kept_channels(keep)
    m = int(keep.sum(1).max())
    assert idx.shape == valid.shape == (7, m)
    for row in range(7):
        kept = [c for c in range(6) if keep[row, c]]
        assert idx[row, : len(kept)].tolist() == kept  # ascending, first
        assert valid[row].tolist() == [True] * len(kept) + [False] * (m - len(kept))
        assert len(set(idx[row].tolist())) == m  # the padding repeats no channel
    idx, valid = kept_channels(torch.zeros(2, 4, dtype=torch.bool))
    assert idx.shape == valid.shape == (2, 0)


def test_multiscale_cam_calls_once_per_scale_with_flipped_half():
    calls = []
    inner = _toy_cam_fn()

    def fn(x):
        calls.append(x)
        return inner(x)

    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    multiscale_cam(fn, x, (1.0, 0.5), **AFA_FUSE)
    assert [c.shape for c in calls] == [(4, 3, 16, 16), (4, 3, 8, 8)]
    assert torch.equal(calls[0][:2], x) and torch.equal(calls[0][2:], x.flip(-1))


def test_fuse_without_flip_and_relu_modes():
    torch.manual_seed(3)
    cams = [torch.randn(2, 2, 4, 4, dtype=torch.float64), torch.randn(2, 2, 3, 3, dtype=torch.float64)]
    ups = [F.interpolate(c, size=(8, 8), mode="bilinear", align_corners=False) for c in cams]
    each = fuse_multiscale(cams, (8, 8), 2, relu="each")
    torch.testing.assert_close(each, _normalize_loop(F.relu(ups[0]) + F.relu(ups[1]), 1e-5))
    after = fuse_multiscale(cams, (8, 8), 2, relu="after", eps=1e-6)
    torch.testing.assert_close(after, _normalize_loop(F.relu(ups[0] + ups[1]), 1e-6))
    none = fuse_multiscale(cams, (8, 8), 2, relu="none")
    torch.testing.assert_close(none, _normalize_loop(ups[0] + ups[1], 1e-5))
    no_flip = multiscale_cam(_toy_cam_fn(), torch.randn(2, 3, 8, 8, dtype=torch.float64), (1.0,), flip=False)
    assert no_flip.shape == (2, 3, 8, 8)


def test_fuse_rejects_bad_arguments():
    cam = torch.randn(3, 2, 4, 4)
    with pytest.raises(ValueError):
        fuse_multiscale([cam], (8, 8), 2)
    with pytest.raises(ValueError):
        fuse_multiscale([torch.randn(4, 2, 4, 4)], (8, 8), 2, flip_fuse="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        fuse_multiscale([], (8, 8), 2)


def test_bf16_cams_are_fused_in_float32():
    """Autocast CAMs (bf16) are fused and normalised in float32: the result equals fusing the same
    values given as float32 (a bf16 fusion would round every step to 8 bits)."""
    torch.manual_seed(4)
    cams = [torch.randn(4, 3, 5, 5).bfloat16(), torch.randn(4, 3, 9, 9).bfloat16()]
    got = fuse_multiscale(cams, (18, 18), 2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fuse_multiscale([c.float() for c in cams], (18, 18), 2), rtol=0, atol=0)
