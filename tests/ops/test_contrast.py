"""ToCo's token contrast pieces against slow loop references (ops/contrast.py, ops/views.py,
heads/projection.py, heads/largefov.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss.heads.largefov import LargeFOVHead
from wsss.heads.projection import ProjectionHead, ema_update_, frozen_copy
from wsss.ops.contrast import (
    class_token_contrast,
    grid_box_mask,
    patch_token_contrast,
    sample_local_crops,
    token_grid_labels,
    token_pair_labels,
    uncertain_regions,
)
from wsss.ops.views import color_jitter, random_resized_crop, uniform

# ------------------------------------------------------------------ patch token contrast


def test_token_pair_labels_loop():
    torch.manual_seed(0)
    lab = torch.randint(0, 3, (2, 3, 4))
    lab[0, 1, 2] = 255
    lab[1, 0, 0] = 255
    out = token_pair_labels(lab)
    flat = lab.flatten(1)
    n = flat.shape[1]
    assert out.shape == (2, n, n)
    for b in range(2):
        for i in range(n):
            for j in range(n):
                if i == j or flat[b, i] == 255 or flat[b, j] == 255:
                    want = 255
                else:
                    want = int(flat[b, i] == flat[b, j])
                assert int(out[b, i, j]) == want


def _ptc_loop(tokens, target):
    b, d, h, w = tokens.shape
    x = tokens.reshape(b, d, h * w).double()
    pos_sum = neg_sum = 0.0
    n_pos = n_neg = 0
    for k in range(b):
        for i in range(h * w):
            for j in range(h * w):
                u, v = x[k, :, i], x[k, :, j]
                cos = abs(float(u @ v) / max(float(u.norm()) * float(v.norm()), 1e-12))
                if target[k, i, j] == 1:
                    pos_sum, n_pos = pos_sum + cos, n_pos + 1
                elif target[k, i, j] == 0:
                    neg_sum, n_neg = neg_sum + cos, n_neg + 1
    return 0.5 * (1 - pos_sum / (n_pos + 1)) + 0.5 * neg_sum / (n_neg + 1)


def test_patch_token_contrast_loop():
    torch.manual_seed(1)
    tokens = torch.randn(2, 5, 3, 3)
    lab = torch.randint(0, 3, (2, 3, 3))
    lab[1, 2, 2] = 255
    target = token_pair_labels(lab)
    got = float(patch_token_contrast(tokens, target))
    assert got == pytest.approx(_ptc_loop(tokens, target), abs=1e-5)


def test_patch_token_contrast_gradient_pulls_positives_together():
    torch.manual_seed(2)
    tokens = torch.randn(1, 4, 2, 2, requires_grad=True)
    target = token_pair_labels(torch.zeros(1, 2, 2, dtype=torch.long))  # all pairs positive
    loss = patch_token_contrast(tokens, target)
    loss.backward()
    stepped = tokens.detach() - 0.5 * tokens.grad
    assert float(patch_token_contrast(stepped, target)) < loss.item()


def test_grid_box_mask_loop():
    box = torch.tensor([[0, 64, 0, 64], [20, 64, 5, 40]])
    got = grid_box_mask(box, (64, 64), (4, 4))
    for b in range(2):
        r0, r1, c0, c1 = box[b].tolist()
        for i in range(4):
            for j in range(4):
                cy, cx = int((i + 0.5) * 16), int((j + 0.5) * 16)
                assert bool(got[b, i, j]) == (r0 <= cy < r1 and c0 <= cx < c1)


def test_token_grid_labels_loop():
    torch.manual_seed(3)
    cam = torch.rand(2, 3, 32, 32)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    box = torch.tensor([[0, 32, 0, 32], [0, 32, 16, 32]])
    got = token_grid_labels(cam, labels, (4, 4), high=0.7, low=0.25, bkg_score=0.5, img_box=box)
    small = F.interpolate(cam, size=(4, 4), mode="bilinear", align_corners=False)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                vals = [float(small[b, k, i, j]) * float(labels[b, k]) for k in range(3)]
                v = max(vals)
                want = vals.index(v) + 1
                if v <= 0.7:
                    want = 255
                if v <= 0.25:
                    want = 0
                cx = int((j + 0.5) * 8)
                if b == 1 and cx < 16:
                    want = 255
                assert int(got[b, i, j]) == want


# ------------------------------------------------------------------ local crops


def test_uncertain_regions_loop():
    torch.manual_seed(4)
    cam = torch.rand(2, 3, 5, 6)
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    got = uncertain_regions(cam, labels, high=0.7, low=0.25)
    for b in range(2):
        for i in range(5):
            for j in range(6):
                v = max(float(cam[b, k, i, j]) * float(labels[b, k]) for k in range(3))
                assert int(got[b, i, j]) == (0 if v <= 0.25 else 2 if v >= 0.7 else 1)


def _coord_image(b, h, w):
    """Channels: row index, column index, image index, so every crop tells where it came from."""
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    return torch.stack([torch.stack([rows, cols, torch.full((h, w), float(i))]) for i in range(b)])


def test_sample_local_crops_loop():
    b, h, w, size, n = 3, 24, 20, 8, 5
    torch.manual_seed(5)
    region = torch.randint(0, 3, (b, h, w))
    region[1] = 2  # no uncertain / background centre: falls back to any position
    region[1, 10, 10] = 0
    images = _coord_image(b, h, w)
    gen = torch.Generator().manual_seed(0)
    crops, positive = sample_local_crops(images, region, n, size, 0.2, generator=gen)
    assert crops.shape == (b, n, 3, size, size) and positive.shape == (b, n)
    m = size // 2
    for i in range(b):
        corners = set()
        for k in range(n):
            top, left = int(crops[i, k, 0, 0, 0]), int(crops[i, k, 1, 0, 0])
            corners.add((top, left))
            assert 0 <= top <= h - 2 * m - 1 and 0 <= left <= w - 2 * m - 1
            assert torch.equal(crops[i, k], images[i, :, top : top + size, left : left + size])
            if i != 1:
                assert int(region[i, top + m, left + m]) <= 1
            share = float(region[i, top : top + size, left : left + size].float().sum()) / size**2
            assert bool(positive[i, k]) == (share > 0.2)
        assert len(corners) == n  # drawn without replacement
    again = sample_local_crops(images, region, n, size, 0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], crops) and torch.equal(again[1], positive)


def test_sample_local_crops_rejects_small_input():
    with pytest.raises(ValueError, match="local crops of 16 px"):
        sample_local_crops(torch.zeros(1, 3, 16, 40), torch.zeros(1, 16, 40, dtype=torch.long), 2, 16)


# ------------------------------------------------------------------ class token contrast


def _ctc_official_loop(student, teacher, flags, temp):
    """The official loop: exp logits, per image and positive view, the +eps and the for-else term."""
    b, v, _ = student.shape
    t = teacher.shape[1]
    total = 0.0
    for i in range(b):
        logits = [[math.exp(float(teacher[i, a] @ student[i, c]) / temp) for c in range(v)] for a in range(t)]
        negs = [sum(logits[a][c] for c in range(v) if not flags[i, c]) for a in range(t)]
        pos_idx = [c for c in range(v) if flags[i, c]]
        loss = [0.0] * t
        for c in pos_idx:
            for a in range(t):
                loss[a] += -math.log(logits[a][c] / (logits[a][c] + negs[a] + 1e-4))
        for a in range(t):
            loss[a] += -math.log(1 / (1 + negs[a] + 1e-4))
        total += sum(loss) / t / (len(pos_idx) + 1e-4)
    return total / b


@pytest.mark.parametrize("temp", [0.5, 1.0])
def test_class_token_contrast_loop(temp):
    torch.manual_seed(6)
    b, v, p = 3, 6, 8
    student = F.normalize(torch.randn(b, v, p), dim=-1) * 2
    teacher = F.normalize(torch.randn(b, 2, p), dim=-1) * 2
    flags = torch.rand(b, v) > 0.5
    flags[:, :2] = True
    flags[2, 2:] = True  # no negative at all
    got = float(class_token_contrast(student, teacher, flags, temp))
    assert got == pytest.approx(_ctc_official_loop(student.double(), teacher.double(), flags, temp), rel=1e-5)


def test_class_token_contrast_large_logits_stay_finite():
    student = torch.full((1, 4, 2), 30.0, requires_grad=True)
    teacher = torch.full((1, 2, 2), 30.0)
    flags = torch.tensor([[True, True, False, True]])
    loss = class_token_contrast(student, teacher, flags, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


# ------------------------------------------------------------------ projection head, EMA


def test_projection_head_loop():
    torch.manual_seed(7)
    head = ProjectionHead(6, out_dim=5, hidden_dim=7, bottleneck_dim=4, num_layers=3)
    x = torch.randn(3, 6)
    with torch.no_grad():
        got = head(x)
    lin = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    for r in range(3):
        h = x[r].detach()
        for i, layer in enumerate(lin):
            h = layer.weight @ h + layer.bias
            if i < len(lin) - 1:
                h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        h = h / h.norm()
        for k in range(5):
            proto = head.prototypes[k].detach() / head.prototypes[k].detach().norm()
            assert float(got[r, k]) == pytest.approx(float(proto @ h.detach()), abs=1e-5)
    assert got.abs().max() <= 1 + 1e-6
    with torch.no_grad():
        head.prototypes.mul_(3.0)  # only directions count (weight norm with the gain fixed at 1)
        assert torch.allclose(head(x), got, atol=1e-6)


def test_ema_update_and_frozen_copy():
    torch.manual_seed(8)
    student = ProjectionHead(4, out_dim=3, hidden_dim=5, bottleneck_dim=2, num_layers=2)
    teacher = frozen_copy(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update_(teacher, student, 0.9)
    for old, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t, 0.9 * old + 0.1 * s)


def test_largefov_head_shapes_and_dilation():
    head = LargeFOVHead(8, 3, embed_dim=6, dilation=5)
    x = torch.randn(2, 8, 12, 12)
    out = head([torch.randn(2, 4, 48, 48), x])
    assert out.shape == (2, 3, 12, 12)
    convs = [m for m in head.layers if isinstance(m, torch.nn.Conv2d)]
    assert [c.dilation for c in convs] == [(5, 5), (5, 5), (1, 1)]
    assert all(c.bias is None for c in convs)


# ------------------------------------------------------------------ views


def test_random_resized_crop_identity_and_flip():
    images = torch.rand(2, 3, 8, 10)
    same = random_resized_crop(images, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    assert torch.allclose(same, images, atol=1e-5)
    flipped = random_resized_crop(images, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    assert torch.allclose(flipped, images.flip(-1), atol=1e-5)


def test_random_resized_crop_is_a_crop():
    """Sampling a coordinate image: each output is an axis-aligned, scaled window of the input."""
    h = w = 32
    images = _coord_image(4, h, w)
    gen = torch.Generator().manual_seed(1)
    out = random_resized_crop(images, scale=(0.4, 0.6), ratio=(1.0, 1.0), flip_p=0.0, generator=gen)
    for i in range(4):
        rows, cols = out[i, 0], out[i, 1]
        assert torch.allclose(rows, rows[:, :1].expand_as(rows), atol=1e-4)  # rows depend on y only
        step_r = (rows[-1, 0] - rows[0, 0]) / (h - 1)
        step_c = (cols[0, -1] - cols[0, 0]) / (w - 1)
        area = float(step_r * step_c)
        assert 0.4 - 0.02 <= area <= 0.6 + 0.02
        assert float(rows.min()) >= -0.5 and float(rows.max()) <= h - 0.5
        assert torch.allclose(out[i, 2], torch.full((h, w), float(i)), atol=1e-5)


def test_color_jitter_loop():
    torch.manual_seed(9)
    images = torch.rand(4, 3, 5, 5)
    got = color_jitter(images, 0.4, 0.4, 0.2, p=0.8, gray_p=0.3, generator=torch.Generator().manual_seed(3))
    u = uniform((4, 5), torch.Generator().manual_seed(3), images.device)
    luma = torch.tensor([0.299, 0.587, 0.114])
    for i in range(4):
        x = images[i]
        if u[i, 0] < 0.8:
            fb, fc, fs = (1 - s + 2 * s * float(u[i, c]) for c, s in ((1, 0.4), (2, 0.4), (3, 0.2)))
            x = (x * fb).clamp(0, 1)
            mean = float((x * luma[:, None, None]).sum(0).mean())
            x = (fc * x + (1 - fc) * mean).clamp(0, 1)
            g = (x * luma[:, None, None]).sum(0)
            x = (fs * x + (1 - fs) * g).clamp(0, 1)
        if u[i, 4] < 0.3:
            x = (x * luma[:, None, None]).sum(0).expand(3, -1, -1)
        assert torch.allclose(got[i], x, atol=1e-6)
    assert torch.equal(color_jitter(images, p=0.0, gray_p=0.0), images)
