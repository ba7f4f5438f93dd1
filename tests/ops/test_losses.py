"""Losses against loop references, hand computations and the official formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss.ops.losses import (
    affinity_loss,
    affinity_loss_logits,
    energy_loss,
    exp_flushed,
    multilabel_soft_margin,
    seg_loss_bg_fg,
    window_bilateral_filter,
)

# ------------------------------------------------------------------ classification


@pytest.mark.parametrize("b,k", [(1, 1), (2, 5), (4, 20)])
def test_multilabel_soft_margin_loop(b, k):
    torch.manual_seed(0)
    logits = torch.randn(b, k, dtype=torch.float64) * 3
    labels = (torch.rand(b, k) > 0.5).double()
    total = 0.0
    for i in range(b):
        for c in range(k):
            z, y = float(logits[i, c]), float(labels[i, c])
            p = 1 / (1 + math.exp(-z))
            total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    ref = total / (b * k)
    assert abs(float(multilabel_soft_margin(logits, labels)) - ref) < 1e-10


# ------------------------------------------------------------------ segmentation


def _official_seg(pred, label, ignore=255):
    bg = label.clone()
    bg[label != 0] = ignore
    fg = label.clone()
    fg[label == 0] = ignore
    bg_loss = F.cross_entropy(pred, bg.long(), ignore_index=ignore)
    fg_loss = F.cross_entropy(pred, fg.long(), ignore_index=ignore)
    return 0.5 * (bg_loss + fg_loss)


def _seg_loop(pred, label, ignore=255):
    sums = {"bg": 0.0, "fg": 0.0}
    counts = {"bg": 0, "fg": 0}
    b, c, h, w = pred.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(label[i, y, x])
                if t == ignore:
                    continue
                logits = [float(v) for v in pred[i, :, y, x]]
                m = max(logits)
                lse = m + math.log(sum(math.exp(v - m) for v in logits))
                key = "bg" if t == 0 else "fg"
                sums[key] += lse - logits[t]
                counts[key] += 1
    parts = [sums[k] / counts[k] if counts[k] else 0.0 for k in ("bg", "fg")]
    return 0.5 * sum(parts)


def _label(b, h, w, c, p_ignore=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, c, (b, h, w), generator=g)
    lab[torch.rand(b, h, w, generator=g) < p_ignore] = 255
    return lab


@pytest.mark.parametrize("b,c,h,w", [(1, 3, 4, 5), (2, 4, 6, 6), (3, 21, 3, 7)])
def test_seg_loss_matches_official_and_loop(b, c, h, w):
    torch.manual_seed(b)
    pred = torch.randn(b, c, h, w, dtype=torch.float64)
    lab = _label(b, h, w, c, seed=c)
    lab[0, 0, 0], lab[-1, -1, -1] = 0, c - 1  # both halves present
    out = seg_loss_bg_fg(pred, lab)
    torch.testing.assert_close(out, _official_seg(pred.float(), lab).to(out.dtype), rtol=1e-5, atol=1e-6)
    assert abs(float(out) - _seg_loop(pred, lab)) < 1e-5


def test_seg_loss_upsamples_logits():
    torch.manual_seed(1)
    pred = torch.randn(2, 3, 4, 4)
    lab = _label(2, 16, 16, 3, seed=2)
    up = F.interpolate(pred, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seg_loss_bg_fg(pred, lab), _official_seg(up, lab))


@pytest.mark.parametrize("case", ["all_ignore", "no_fg", "no_bg"])
def test_seg_loss_nan_cases(case):
    torch.manual_seed(2)
    pred = torch.randn(2, 4, 5, 5, requires_grad=True)
    lab = _label(2, 5, 5, 4, seed=3)
    if case == "all_ignore":
        lab[:] = 255
    elif case == "no_fg":
        lab[(lab != 0) & (lab != 255)] = 255
    else:
        lab[lab == 0] = 255
    assert torch.isnan(_official_seg(pred.detach(), lab))  # the official code fails here
    out = seg_loss_bg_fg(pred, lab)
    assert torch.isfinite(out)
    assert abs(float(out.detach()) - _seg_loop(pred.detach().double(), lab)) < 1e-5
    out.backward()
    assert torch.isfinite(pred.grad).all()
    if case == "all_ignore":
        assert float(out.detach()) == 0.0 and float(pred.grad.abs().sum()) == 0.0


# ------------------------------------------------------------------ affinity


def test_affinity_loss_hand_computed_3x3():
    aff = torch.tensor([[[0.9, 0.2, 0.6], [0.2, 0.8, 0.4], [0.6, 0.4, 0.7]]])
    target = torch.tensor([[[1, 0, 255], [0, 1, 1], [255, 1, 1]]])
    # positives: (0,0) .9, (1,1) .8, (1,2) .4, (2,1) .4, (2,2) .7 -> sum(1-A) = .1+.2+.6+.6+.3 = 1.8, N+ = 5
    # negatives: (0,1) .2, (1,0) .2 -> sum A = .4, N- = 2
    expected = 0.5 * 1.8 / 6 + 0.5 * 0.4 / 3
    assert abs(float(affinity_loss(aff, target)) - expected) < 1e-6
    logits = torch.logit(aff.double())
    assert abs(float(affinity_loss_logits(logits, target)) - expected) < 1e-6


@pytest.mark.parametrize("b,n", [(1, 4), (2, 9), (3, 6)])
def test_affinity_loss_loop_batch_pooled(b, n):
    torch.manual_seed(n)
    logits = torch.randn(b, n, n, dtype=torch.float64) * 4
    target = torch.randint(0, 2, (b, n, n))
    target[torch.rand(b, n, n) < 0.2] = 255
    pos_sum = neg_sum = 0.0
    pos_n = neg_n = 0
    for i in range(b):
        for p in range(n):
            for q in range(n):
                a = 1 / (1 + math.exp(-float(logits[i, p, q])))
                t = int(target[i, p, q])
                if t == 1:
                    pos_sum += 1 - a
                    pos_n += 1
                elif t == 0:
                    neg_sum += a
                    neg_n += 1
    ref = 0.5 * pos_sum / (pos_n + 1) + 0.5 * neg_sum / (neg_n + 1)
    assert abs(float(affinity_loss(torch.sigmoid(logits), target)) - ref) < 1e-6
    assert abs(float(affinity_loss_logits(logits, target)) - ref) < 1e-6


@pytest.mark.parametrize("b,n", [(1, 5), (2, 9)])
def test_affinity_loss_balanced_positives_loop(b, n):
    """background=...: background and foreground positives averaged apart (0.25 each), negatives 0.5,
    checked against a loop over token labels; the pooled loss is the official one."""
    from wsss.refine.labels import affinity_labels

    g = torch.Generator().manual_seed(n)
    tok = torch.randint(0, 3, (b, 1, n), generator=g)
    tok[torch.rand(b, 1, n, generator=g) < 0.15] = 255
    target = affinity_labels(tok, (1, n))
    aff = torch.rand(b, n, n, generator=g, dtype=torch.float64)
    sums = {"bg": [0.0, 0], "fg": [0.0, 0], "neg": [0.0, 0]}
    for i in range(b):
        for p in range(n):
            for q in range(n):
                tp, tq, a = int(tok[i, 0, p]), int(tok[i, 0, q]), float(aff[i, p, q])
                if 255 in (tp, tq):
                    continue
                key = "neg" if tp != tq else ("bg" if tp == 0 else "fg")
                sums[key][0] += a if key == "neg" else 1 - a
                sums[key][1] += 1
    ref = sum(w * s / (c + 1) for w, (s, c) in zip((0.25, 0.25, 0.5), (sums["bg"], sums["fg"], sums["neg"])))
    background = tok.flatten(1) == 0
    assert abs(float(affinity_loss(aff, target, background)) - ref) < 1e-6  # the loss runs in float32
    pooled = 0.5 * (sums["bg"][0] + sums["fg"][0]) / (sums["bg"][1] + sums["fg"][1] + 1)
    pooled += 0.5 * sums["neg"][0] / (sums["neg"][1] + 1)
    assert abs(float(affinity_loss(aff, target)) - pooled) < 1e-6


def test_affinity_loss_logits_bf16_and_saturation():
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 5) * 40).to(torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, 2, (2, 5, 5))
    out = affinity_loss_logits(logits, target)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert torch.isfinite(logits.grad.float()).all()
    ref = affinity_loss(torch.sigmoid(logits.detach().float()), target)
    torch.testing.assert_close(out.detach(), ref)


# ------------------------------------------------------------------ energy loss


def _dense_kernel(rgb, sigma_rgb, sigma_xy, radius, dilation):
    """Explicit (N, N) kernel of one image with the same window truncation, built pair by pair."""
    _, h, w = rgb.shape
    n = h * w
    k = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        yi, xi = divmod(i, w)
        for j in range(n):
            yj, xj = divmod(j, w)
            dy, dx = yj - yi, xj - xi
            if dy % dilation or dx % dilation or abs(dy) > radius * dilation or abs(dx) > radius * dilation:
                continue
            d_rgb = float(((rgb[:, yi, xi] - rgb[:, yj, xj]) ** 2).sum())
            expo = -(dy * dy + dx * dx) / (2 * sigma_xy**2) - d_rgb / (2 * sigma_rgb**2)
            k[i, j] = dilation**2 * math.exp(expo)
    return k


def _dense_energy(probs, image01, roi, label, sigma_rgb, sigma_xy, scale, weight, radius, dilation):
    """Reference: returns (loss, official gradient wrt the probabilities) with an explicit kernel."""
    probs = probs.detach().double().requires_grad_(True)
    rgb = image01.double() * 255
    roi_f = roi.double().unsqueeze(1)
    lab = None if label is None else label.double().unsqueeze(1)
    sp = probs
    if scale != 1.0:
        sp = F.interpolate(probs, scale_factor=scale, mode="bilinear", align_corners=False)
        rgb = F.interpolate(rgb, scale_factor=scale)
        roi_f = F.interpolate(roi_f, scale_factor=scale)
        lab = None if lab is None else F.interpolate(lab, scale_factor=scale)
    b, c, h, w = sp.shape
    total = 0.0
    grads = torch.zeros(b, c, h, w, dtype=torch.float64)
    for i in range(b):
        kern = _dense_kernel(rgb[i], sigma_rgb, sigma_xy * scale, radius, dilation)
        for p in range(h * w):
            y, x = divmod(p, w)
            g = float(roi_f[i, 0, y, x]) - float(sp[i, :, y, x].detach().max())
            if lab is not None and int(lab[i, 0, y, x]) == 255:
                g = 1.0
            g = max(g, 0.0)
            for k in range(c):
                s = (sp[i, k].detach() * roi_f[i, 0]).flatten()
                ws = float(kern[p] @ s)
                total += float(s[p]) * ws * g
                grads[i, k, y, x] = -2 * weight / b * g * ws * float(roi_f[i, 0, y, x])
    loss = -weight / b * total
    (grad_probs,) = torch.autograd.grad(sp, probs, grads) if scale != 1.0 else (grads,)
    return loss, grad_probs


def _energy_inputs(b, c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(b, c, h, w, generator=g).mul(2).softmax(1)
    image = torch.rand(b, 3, h, w, generator=g)
    roi = torch.zeros(b, h, w, dtype=torch.bool)
    roi[:, : h - 1, 1:] = True
    label = torch.randint(0, c, (b, h, w), generator=g)
    label[torch.rand(b, h, w, generator=g) < 0.3] = 255
    return probs, image, roi, label


@pytest.mark.parametrize(
    "b,c,h,w,scale,radius,dilation,use_label",
    [(1, 2, 5, 6, 1.0, 2, 1, True), (2, 3, 8, 10, 0.5, 2, 2, True), (2, 2, 6, 6, 1.0, 3, 2, False)],
)
def test_energy_loss_matches_dense_reference(b, c, h, w, scale, radius, dilation, use_label):
    probs, image, roi, label = _energy_inputs(b, c, h, w, seed=h * w)
    label = label if use_label else None
    kw = dict(sigma_rgb=40.0, sigma_xy=6.0, scale=scale, weight=1e-3, radius=radius, dilation=dilation)
    _check_against_dense(probs, image, roi, label, kw)


def _check_against_dense(probs, image, roi, label, kw):
    """energy_loss (float32) and its gradient against the float64 dense reference."""
    ref_loss, ref_grad = _dense_energy(probs, image, roi, label, **kw)
    p = probs.double().requires_grad_(True)
    out = energy_loss(p.float(), image, roi, label, **kw)
    out.backward()
    assert abs(ref_loss) > 1e-6 and abs(float(out.detach()) - ref_loss) < 1e-5 * abs(ref_loss)
    torch.testing.assert_close(p.grad, ref_grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_flushed_is_exp_above_the_floor_and_zero_below(dtype):
    """exp where exp(x) >= e^0.5 x the smallest normal number, 0 below (never a subnormal)."""
    # the floor as the tensor's dtype holds it
    floor = torch.tensor(math.log(torch.finfo(dtype).smallest_normal) + 0.5, dtype=dtype).item()
    x = torch.cat([torch.linspace(floor - 50, 5, 997, dtype=dtype),
                   torch.tensor([floor, floor - 1e-3, floor + 1e-3, -1e4, 0.0], dtype=dtype)])
    out = exp_flushed(x)
    for xi, oi in zip(x.tolist(), out.tolist()):
        want = math.exp(xi) if xi >= floor else 0.0
        assert oi == pytest.approx(want, rel=1e-6, abs=0.0), xi
    assert (out[out > 0] >= torch.finfo(dtype).smallest_normal).all()


def test_energy_loss_across_sharp_edges_matches_dense_reference():
    """A small colour sigma: most window weights fall below float32's normal range (flushed to 0);
    the loss and gradient still match the float64 dense reference, whose weights do not."""
    probs, image, roi, label = _energy_inputs(2, 3, 8, 10, seed=7)
    kw = dict(sigma_rgb=4.0, sigma_xy=6.0, scale=1.0, weight=1e-3, radius=2, dilation=1)
    rgb = image * 255
    assert ((rgb[:, :, :, 1:] - rgb[:, :, :, :-1]).square().sum(1) / (2 * 4.0**2) > 88).float().mean() > 0.3
    _check_against_dense(probs, image, roi, label, kw)


def test_energy_loss_exact_gradient_and_defaults():
    probs, image, roi, label = _energy_inputs(2, 3, 8, 8, seed=5)
    p = probs.double().requires_grad_(True)
    kw = dict(sigma_rgb=30.0, sigma_xy=4.0, scale=1.0, radius=2, dilation=1, weight=1.0)
    out = energy_loss(p, image, roi, label, gradient="exact", **kw)
    off = energy_loss(p, image, roi, label, **kw)
    torch.testing.assert_close(out, off)  # same value, different gradients

    def fn(q):
        return energy_loss(q, image.double(), roi, label, gradient="exact", **kw)

    assert torch.autograd.gradcheck(fn, (p,), eps=1e-6, atol=1e-6)
    # Default parameters (scale 0.5, sigma_xy 100 -> window reach 2 * 50 px) run and are finite.
    big, img, r, lab = _energy_inputs(1, 21, 32, 32, seed=6)
    assert torch.isfinite(energy_loss(big.requires_grad_(True), img, r, lab))


def test_window_filter_is_symmetric_linear():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    rgb = torch.rand(2, 3, 5, 7, dtype=torch.float64) * 255

    def fn(v):
        return window_bilateral_filter(v, rgb, 50.0, 3.0, 2, 2)

    assert torch.autograd.gradcheck(fn, (x,))
    kern = _dense_kernel(rgb[0], 50.0, 3.0, 2, 2)
    torch.testing.assert_close(kern, kern.T)
    ref = (kern @ x[0].detach().reshape(2, -1).T).T.reshape(2, 5, 7)
    torch.testing.assert_close(fn(x)[0].detach(), ref)


def test_window_filter_in_image_blocks(monkeypatch):
    """On CPU the filter runs on blocks of images that fit the caches: one image per block gives every
    image's dense-reference result, as the whole batch in one block does."""
    import wsss.ops.losses as losses_mod
    import wsss.refine.par as par_mod

    torch.manual_seed(1)
    x = torch.randn(3, 4, 6, 9, dtype=torch.float64)
    rgb = torch.rand(3, 3, 6, 9, dtype=torch.float64) * 255
    assert losses_mod._image_block(x) >= 3  # the default: the whole (small) batch in one block
    whole = window_bilateral_filter(x, rgb, 40.0, 4.0, 2, 2)
    monkeypatch.setattr(par_mod, "CPU_BLOCK_BYTES_PER_THREAD", 1)
    assert losses_mod._image_block(x) == 1
    blocked = window_bilateral_filter(x, rgb, 40.0, 4.0, 2, 2)
    torch.testing.assert_close(blocked, whole)
    for i in range(3):
        kern = _dense_kernel(rgb[i], 40.0, 4.0, 2, 2)
        ref = (kern @ x[i].reshape(4, -1).T).T.reshape(4, 6, 9)
        torch.testing.assert_close(blocked[i], ref)
