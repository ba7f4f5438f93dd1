"""Tests of wsss.refine against slow loop references written here (official semantics,
docs/methods/afa.md sections 3-7)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss.refine import (
    PAR,
    ImageKernel,
    affinity_labels,
    box_mask,
    cam_to_label,
    combine_high_low,
    downscaled,
    masked_softmax,
    neighbour_offsets,
    par_argmax_label,
    par_pseudo_label,
    par_refine_scores_label,
    propagate_affinity,
    propagate_affinity_plain,
    window_mask,
)

DIL = (1, 2, 4, 8, 12, 24)
RING = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


# ----------------------------------------------------------------------------------------- references


def _offsets(dilations):
    return [(dy * d, dx * d) for d in dilations for dy, dx in RING]


def _std(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    s = sum(e)
    return [x / s for x in e]


def ref_kernel(img, dilations=DIL, w1=0.3, w2=0.01, c_pos=None, w_rgb=1.0, c_rgb=None):
    """Per-pixel loop: img (3, H, W) -> K (48, H, W) as nested lists, float64 maths, clamped borders."""
    im = img.double().tolist()
    ch, h, w = len(im), len(im[0]), len(im[0][0])
    offs = _offsets(dilations)
    dist = [math.hypot(dy, dx) for dy, dx in offs]
    sd = _std(dist)
    c_pos = w1 * w1 if c_pos is None else c_pos
    c_rgb = w1 * w1 if c_rgb is None else c_rgb
    pos = _softmax([-((x / (sd + 1e-8)) ** 2) / c_pos for x in dist])
    out = [[[0.0] * w for _ in range(h)] for _ in offs]
    for y in range(h):
        for x in range(w):
            nbs = [[im[c][min(max(y + dy, 0), h - 1)][min(max(x + dx, 0), w - 1)] for dy, dx in offs]
                   for c in range(ch)]
            sig = [_std(nbs[c]) for c in range(ch)]
            logit = [
                -sum((abs(nbs[c][n] - im[c][y][x]) / (sig[c] + 1e-8)) ** 2 / c_rgb for c in range(ch)) / ch
                for n in range(len(offs))
            ]
            sm = _softmax(logit)
            for n in range(len(offs)):
                out[n][y][x] = w_rgb * sm[n] + w2 * pos[n]
    return torch.tensor(out, dtype=torch.float64)


def ref_propagate(kernel, maps, num_iter, dilations=DIL):
    """kernel (48, H, W), maps (C, H, W) -> iterate X(p) <- sum_n K(p, n) X(clamp(p + off_n))."""
    offs = _offsets(dilations)
    k = kernel.tolist()
    x = maps.double().tolist()
    c, h, w = len(x), len(x[0]), len(x[0][0])
    for _ in range(num_iter):
        x = [[[sum(k[n][yy][xx] * x[ci][min(max(yy + dy, 0), h - 1)][min(max(xx + dx, 0), w - 1)]
                   for n, (dy, dx) in enumerate(offs))
               for xx in range(w)] for yy in range(h)] for ci in range(c)]
    return torch.tensor(x, dtype=torch.float64)


def official_style_par(img, maps, dilations=DIL, num_iter=10, w1=0.3, w2=0.01):
    """Vectorised re-statement of the official structure (one-hot conv gather, full 48-neighbour stack)."""
    maps = F.interpolate(maps, size=img.shape[-2:], mode="bilinear", align_corners=True)
    onehot = torch.zeros(8, 1, 3, 3, dtype=img.dtype)
    for i, (dy, dx) in enumerate(RING):
        onehot[i, 0, dy + 1, dx + 1] = 1

    def gather(x):
        b, c, h, w = x.shape
        outs = []
        for d in dilations:
            xp = F.pad(x, [d] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
            outs.append(F.conv2d(xp, onehot, dilation=d).view(b, c, 8, h, w))
        return torch.cat(outs, dim=2)

    nb = gather(img)
    b, _, h, w = img.shape
    dist = torch.tensor([math.hypot(dy, dx) for dy, dx in _offsets(dilations)], dtype=img.dtype)
    pos = dist.view(1, 1, -1, 1, 1).repeat(b, 1, 1, h, w)
    aff = -((nb - img.unsqueeze(2)).abs() / (nb.std(dim=2, keepdim=True) + 1e-8) / w1) ** 2
    aff = aff.mean(dim=1, keepdim=True)
    pos_aff = -(pos / (pos.std(dim=2, keepdim=True) + 1e-8) / w1) ** 2
    aff = aff.softmax(dim=2) + w2 * pos_aff.softmax(dim=2)
    for _ in range(num_iter):
        maps = (gather(maps) * aff).sum(2)
    return maps


def ref_window(h, w, r, shape="square"):
    n = h * w
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            dr, dc = abs(i // w - j // w), abs(i % w - j % w)
            m[i, j] = (dr <= r and dc <= r) if shape == "square" else (dr * dr + dc * dc < r * r)
    return m


def ref_propagate_bkg(cam, aff, labels, bkg, window, power=2.0, eps=0.1):
    """The official per-image loop: subset of channels, softmax over it, matmul, scatter into zeros."""
    b, k, h, w = cam.shape
    a = aff.clone()
    if window is not None:
        for i in range(b):
            a[i, ~window] = 0
    a = a**power
    a = a / (a.sum(dim=1, keepdim=True) + eps)
    stack = torch.cat([torch.full((b, 1, h, w), bkg, dtype=cam.dtype), cam], dim=1)
    keys = torch.cat([torch.ones(b, 1), labels], dim=1)
    out = torch.zeros_like(stack)
    for i in range(b):
        key = torch.nonzero(keys[i])[:, 0]
        p = stack[i].reshape(k + 1, -1)[key].softmax(dim=0)
        out[i, key] = (p @ a[i]).reshape(-1, h, w)
    return out


def ref_cam_to_label(cam, labels, bkg, high, low, box, ignore=255):
    b, k, h, w = cam.shape
    out = torch.full((b, h, w), ignore, dtype=torch.long)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                vals = [float(cam[i, c, y, x]) * float(labels[i, c]) for c in range(k)]
                v = max(vals)
                lab = vals.index(v) + 1
                if v <= bkg:
                    lab = 0
                if high is not None and v <= high:
                    lab = ignore
                if low is not None and v <= low:
                    lab = 0
                inside = box is None or (box[i][0] <= y < box[i][1] and box[i][2] <= x < box[i][3])
                if inside:
                    out[i, y, x] = lab
    return out


def ref_par_pseudo_label(img, cam, labels, par, high, low, box, ignore=255):
    """What the official refine_cams_with_bkg_v2 does, image by image, two PAR calls each."""
    b, _, h, w = img.shape
    size = [h // 2, w // 2]
    img_s = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
    keys = torch.cat([torch.ones(b, 1), labels], dim=1)
    out = []
    for s in (high, low):
        stack = torch.cat([torch.full((b, 1, h, w), s), cam], dim=1)
        stack = F.interpolate(stack, size=size, mode="bilinear", align_corners=False)
        lab = torch.full((b, h, w), ignore, dtype=torch.long)
        for i in range(b):
            key = torch.nonzero(keys[i])[:, 0]
            ref = par(img_s[i : i + 1], stack[i : i + 1, key].softmax(dim=1))
            ref = F.interpolate(ref, size=(h, w), mode="bilinear", align_corners=False)
            li = key[ref.argmax(dim=1)][0]
            r0, r1, c0, c1 = box[i] if box is not None else (0, h, 0, w)
            lab[i, r0:r1, c0:c1] = li[r0:r1, c0:c1]
        out.append(lab)
    lh, ll = out
    res = lh.clone()
    res[lh == 0] = ignore
    res[(lh + ll) == 0] = 0
    return res


def ref_refine_cls_label(img, scores, labels, par, box, down=2):
    """The official refine_cams_with_cls_label loop (PAR at 1/down, official 2); returns argmax over all
    C channels."""
    keys = torch.cat([torch.ones(img.shape[0], 1), labels], dim=1)
    refined = torch.zeros_like(scores)
    for i, (r0, r1, c0, c1) in enumerate(box.tolist()):
        im = img[[i], :, r0:r1, c0:c1]
        hh, ww = im.shape[-2:]
        im_s = F.interpolate(im, size=[hh // down, ww // down], mode="bilinear", align_corners=False)
        key = torch.nonzero(keys[i])[:, 0]
        ref = par(im_s, scores[[i], :, r0:r1, c0:c1][:, key])
        ref = F.interpolate(ref, size=(hh, ww), mode="bilinear", align_corners=False)
        refined[i, key, r0:r1, c0:c1] = ref[0]
    return refined.argmax(dim=1)


def _labels(b, k, gen):
    lab = (torch.rand(b, k, generator=gen) < 0.4).float()
    lab[:, 0] = 1.0  # at least one class per image; images still differ in their sets
    lab[0] = 0.0
    lab[0, k - 1] = 1.0
    return lab


# ------------------------------------------------------------------------------------------------ PAR


@pytest.mark.parametrize("shape", [(1, 5, 6), (2, 4, 7)])
def test_par_kernel_matches_loop_reference(shape):
    torch.manual_seed(0)
    b, h, w = shape
    img = torch.rand(b, 3, h, w)
    k = PAR().kernel(img)
    assert k.shape == (b, 48, h, w)
    for i in range(b):
        torch.testing.assert_close(k[i].double(), ref_kernel(img[i]), atol=1e-5, rtol=1e-5)


def test_par_kernel_rows_positional_and_constant_image():
    par = PAR()
    torch.manual_seed(1)
    k = par.kernel(torch.rand(2, 3, 9, 11))
    torch.testing.assert_close(k.sum(1), torch.full((2, 9, 11), 1.01))
    dist = torch.tensor([math.hypot(dy, dx) for dy, dx in neighbour_offsets(DIL)])
    assert abs(float(dist.std()) - 9.9003) < 1e-4
    pos = par.positional_weights()
    expected = {1: (0.068, 0.076), 2: (0.035, 0.054), 4: (0.0023, 0.014)}
    for j, d in enumerate(DIL):
        diag, axis = float(pos[8 * j]), float(pos[8 * j + 1])
        if d in expected:
            assert diag == pytest.approx(expected[d][0], abs=6e-4)
            assert axis == pytest.approx(expected[d][1], abs=6e-4)
        elif d == 8:
            assert axis == pytest.approx(6e-5, rel=0.05)
        else:
            assert axis < 1e-8
    # constant image: colour weights uniform 1/48
    kc = par.kernel(torch.full((1, 3, 6, 5), 0.4))
    torch.testing.assert_close(kc - 0.01 * pos.view(1, -1, 1, 1), torch.full_like(kc, 1 / 48))


def test_par_iterations_match_loop_reference_with_replicate_borders():
    torch.manual_seed(2)
    img = torch.rand(2, 3, 5, 6)
    maps = torch.rand(2, 2, 5, 6)
    par = PAR(num_iter=3)
    out = par(img, maps)
    for i in range(2):
        ref = ref_propagate(ref_kernel(img[i]), maps[i], 3)
        torch.testing.assert_close(out[i].double(), ref, atol=1e-5, rtol=1e-5)
    # small dilations so that borders are hit at different widths
    par2 = PAR(dilations=(1, 3), num_iter=2)
    out2 = par2(img, maps)
    ref2 = ref_propagate(ref_kernel(img[1], dilations=(1, 3)), maps[1], 2, dilations=(1, 3))
    torch.testing.assert_close(out2[1].double(), ref2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_bytes", [1, 5 * 6 * 4 * 2, 5 * 6 * 4 * 3])
def test_par_blocked_propagation_matches_loop_reference(monkeypatch, block_bytes):
    """The CPU path that propagates blocks of images / channels (1 plane, 2 channels, odd 3-channel
    blocks) gives the loop reference for every image and channel."""
    import wsss.refine.par as par_mod

    monkeypatch.setattr(par_mod, "CPU_BLOCK_BYTES_PER_THREAD", block_bytes)
    monkeypatch.setattr(par_mod.torch, "get_num_threads", lambda: 1)
    torch.manual_seed(5)
    img = torch.rand(3, 3, 5, 6)
    maps = torch.rand(3, 4, 5, 6)
    out = PAR(num_iter=2)(img, maps)
    for i in range(3):
        ref = ref_propagate(ref_kernel(img[i]), maps[i], 2)
        torch.testing.assert_close(out[i].double(), ref, atol=1e-5, rtol=1e-5)


def test_par_refines_only_the_valid_channels():
    """valid (B, C): the marked channels equal the loop reference (and, bit for bit, one call over every
    channel); the others come out 0 whatever they held. Images with the same channels go together,
    so the rows of valid below (three patterns, one image without any channel) cover the grouping."""
    torch.manual_seed(6)
    img = torch.rand(5, 3, 5, 6)
    maps = torch.rand(5, 4, 5, 6)
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]]).bool()
    par = PAR(num_iter=2)
    out = par(img, maps, valid=valid)
    assert torch.equal(out, par(img, maps) * valid[:, :, None, None])
    for i in range(5):
        ref = ref_propagate(ref_kernel(img[i]), maps[i], 2)
        for c in range(4):
            want = ref[c] if valid[i, c] else torch.zeros_like(ref[c])
            torch.testing.assert_close(out[i, c].double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"valid must be \(B, C\) = \(5, 4\), got \(5, 3\)"):
        par(img, maps, valid=valid[:, :3])


@pytest.mark.parametrize("map_size", [(16, 20), (7, 9)])
def test_par_matches_official_structure(map_size):
    torch.manual_seed(3)
    img = torch.rand(3, 3, 16, 20)
    maps = torch.rand(3, 4, *map_size)
    torch.testing.assert_close(PAR()(img, maps), official_style_par(img, maps), atol=1e-5, rtol=1e-5)


def test_par_from_paper():
    torch.manual_seed(4)
    img = torch.rand(1, 3, 6, 7)
    default = PAR()
    paper = PAR.from_paper(c_I=0.09, c_L=0.09, w_I=1.0, w_L=0.01)
    torch.testing.assert_close(paper.kernel(img), default.kernel(img))
    other = PAR.from_paper(c_I=0.2, c_L=0.5, w_I=0.7, w_L=0.1, dilations=(1, 2))
    ref = ref_kernel(img[0], dilations=(1, 2), w2=0.1, c_pos=0.5, w_rgb=0.7, c_rgb=0.2)
    torch.testing.assert_close(other.kernel(img)[0].double(), ref, atol=1e-5, rtol=1e-5)


def test_par_constant_map_grows_by_1_01_per_iteration():
    torch.manual_seed(5)
    out = PAR()(torch.rand(1, 3, 8, 8), torch.ones(1, 1, 8, 8))
    torch.testing.assert_close(out, torch.full_like(out, 1.01**10))


# ------------------------------------------------------------------------------------- window, propagation


@pytest.mark.parametrize("h,w,r,shape", [(5, 7, 2, "square"), (4, 6, 1, "square"), (5, 7, 3, "circle")])
def test_window_mask_matches_loop(h, w, r, shape):
    m = window_mask(h, w, r, shape=shape)
    assert m.dtype == torch.bool and m.shape == (h * w, h * w)
    assert torch.equal(m, ref_window(h, w, r, shape))
    assert window_mask(h, w, r, shape=shape) is m  # cached


@pytest.mark.parametrize("b,k,h,w,use_window", [(2, 4, 3, 4, True), (3, 3, 4, 4, False)])
def test_propagate_affinity_matches_per_image_reference(b, k, h, w, use_window):
    gen = torch.Generator().manual_seed(6)
    cam = torch.rand(b, k, h, w, generator=gen)
    aff = torch.rand(b, h * w, h * w, generator=gen)
    aff = (aff + aff.transpose(1, 2)) / 2
    labels = _labels(b, k, gen)
    window = window_mask(h, w, 1) if use_window else None
    aff_before = aff.clone()
    out = propagate_affinity(cam, aff, labels, bkg_score=0.35, window=window)
    assert torch.equal(aff, aff_before)  # not modified in place
    ref = ref_propagate_bkg(cam, aff, labels, 0.35, window)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    absent = torch.cat([torch.ones(b, 1), labels], 1) == 0
    assert (out[absent] == 0).all()


def test_propagate_affinity_plain_matches_reference():
    gen = torch.Generator().manual_seed(7)
    cam = torch.rand(2, 3, 3, 3, generator=gen)
    aff = torch.rand(2, 9, 9, generator=gen)
    win = window_mask(3, 3, 1)
    out = propagate_affinity_plain(cam, aff, window=win)
    for i in range(2):
        a = aff[i].clone()
        a[~win] = 0
        a = a**2
        a = a / (a.sum(0, keepdim=True) + 1e-4)
        ref = (cam[i].reshape(3, -1) @ a).reshape(3, 3, 3)
        torch.testing.assert_close(out[i], ref)


def test_masked_softmax_matches_subset():
    gen = torch.Generator().manual_seed(8)
    labels = _labels(3, 5, gen)
    s = torch.randn(3, 6, 4, 2, generator=gen)
    out = masked_softmax(s, labels)
    for i in range(3):
        key = torch.nonzero(torch.cat([torch.ones(1), labels[i]]))[:, 0]
        torch.testing.assert_close(out[i, key], s[i, key].softmax(0))
        mask = torch.ones(6, dtype=torch.bool)
        mask[key] = False
        assert (out[i, mask] == 0).all()


# ------------------------------------------------------------------------------------------------ labels


def test_box_mask_matches_loop():
    box = torch.tensor([[0, 3, 1, 5], [2, 6, 0, 6], [1, 1, 0, 2]])
    m = box_mask(box, (6, 6))
    for i in range(3):
        for y in range(6):
            for x in range(6):
                assert bool(m[i, y, x]) == (box[i, 0] <= y < box[i, 1] and box[i, 2] <= x < box[i, 3])


@pytest.mark.parametrize("mode", ["val", "train"])
def test_cam_to_label_matches_reference(mode):
    gen = torch.Generator().manual_seed(9)
    cam = torch.rand(3, 4, 5, 6, generator=gen)
    labels = _labels(3, 4, gen)
    if mode == "val":
        out = cam_to_label(cam, labels)
        ref = ref_cam_to_label(cam, labels, 0.45, None, None, None)
    else:
        box = torch.tensor([[0, 5, 0, 6], [1, 4, 2, 6], [0, 3, 0, 3]])
        out = cam_to_label(cam, labels, high=0.55, low=0.35, img_box=box)
        ref = ref_cam_to_label(cam, labels, 0.45, 0.55, 0.35, box.tolist())
    assert out.dtype == torch.long
    assert torch.equal(out, ref)


def test_cam_to_label_hand_case():
    cam = torch.tensor([[[[0.9, 0.5, 0.2]], [[0.95, 0.1, 0.0]]]])  # (1, 2, 1, 3)
    labels = torch.tensor([[1.0, 0.0]])  # class 2 absent: its 0.95 must not win
    assert cam_to_label(cam, labels).tolist() == [[[1, 1, 0]]]
    box = torch.tensor([[0, 1, 0, 2]])
    assert cam_to_label(cam, labels, high=0.55, low=0.35, img_box=box).tolist() == [[[1, 255, 255]]]


def test_cam_to_label_thresholds_are_inclusive():
    cam = torch.tensor([0.35, 0.3501, 0.45, 0.4501, 0.55, 0.5501]).view(1, 1, 1, 6)
    labels = torch.ones(1, 1)
    assert cam_to_label(cam, labels).tolist() == [[[0, 0, 0, 1, 1, 1]]]
    out = cam_to_label(cam, labels, high=0.55, low=0.35)
    assert out.tolist() == [[[0, 255, 255, 255, 255, 1]]]


def test_combine_high_low_truth_table():
    lh = torch.tensor([0, 0, 0, 3, 3, 3, 255, 255])
    ll = torch.tensor([0, 2, 255, 0, 3, 1, 0, 255])
    assert combine_high_low(lh, ll).tolist() == [0, 255, 255, 3, 3, 3, 255, 255]


@pytest.mark.parametrize("use_box", [True, False])
def test_par_pseudo_label_matches_per_image_reference(use_box):
    gen = torch.Generator().manual_seed(10)
    b, k, h, w = 3, 5, 16, 14
    img = torch.rand(b, 3, h, w, generator=gen)
    cam = torch.rand(b, k, h, w, generator=gen)
    labels = _labels(b, k, gen)
    box = torch.tensor([[0, 16, 0, 14], [2, 12, 3, 14], [0, 9, 0, 7]]) if use_box else None
    par = PAR(num_iter=3)
    out = par_pseudo_label(img, cam, labels, par, img_box=box)
    ref = ref_par_pseudo_label(img, cam, labels, par, 0.55, 0.35, None if box is None else box.tolist())
    assert out.dtype == torch.long and torch.equal(out, ref)
    assert set(out.unique().tolist()) <= {0, 255} | {c + 1 for c in range(k)}


def _scores(b, k, h, w, labels, gen):
    s = torch.rand(b, k + 1, h, w, generator=gen)
    return s * torch.cat([torch.ones(b, 1), labels], 1)[:, :, None, None]


def test_par_argmax_label_equals_refining_every_channel():
    """Refining only background + present channels gives the full-stack argmax (per-image loop)."""
    gen = torch.Generator().manual_seed(12)
    b, k, h, w = 3, 6, 12, 10
    img = torch.rand(b, 3, h, w, generator=gen)
    labels = _labels(b, k, gen)
    scores = torch.randn(b, k + 1, h // 2, w // 2, generator=gen) * 3
    par = PAR(num_iter=3)
    out = par_argmax_label(img, scores, labels, par)
    for i in range(b):
        present = [0] + [c + 1 for c in range(k) if labels[i, c] > 0]
        full = scores[i : i + 1].clone()
        absent = [c for c in range(k + 1) if c not in present]
        full[:, absent] = float("-inf")  # softmax over background + present classes, absent ones 0
        refined = par(img[i : i + 1], full.softmax(1))[0]
        refined[absent] = float("-inf")
        assert torch.equal(out[i], refined.argmax(0)), i
    assert out.shape == (b, h, w) and out.dtype == torch.long


@pytest.mark.parametrize("down", [2, 1, 3])
def test_par_refine_scores_label_faithful_matches_reference(down):
    """par.downscale governs the propagated label's PAR too (official 2); images sharing a box (refined
    in one call) equal the per-image reference."""
    gen = torch.Generator().manual_seed(11)
    b, k, h, w = 5, 4, 16, 18
    img = torch.rand(b, 3, h, w, generator=gen)
    labels = _labels(b, k, gen)
    sh, sl = _scores(b, k, h, w, labels, gen), _scores(b, k, h, w, labels, gen)
    sh[0, 2] = 0.9  # an absent class with large values must be ignored (official zeroes it)
    box = torch.tensor([[0, 16, 0, 18], [3, 14, 2, 17], [0, 10, 5, 18], [0, 16, 0, 18], [3, 14, 2, 17]])
    par = PAR(num_iter=3)
    kw = {} if down == 2 else {"downscale": down}
    out = par_refine_scores_label(img, sh, sl, labels, par, box, **kw)
    lh = ref_refine_cls_label(img, sh, labels, par, box, down)
    ll = ref_refine_cls_label(img, sl, labels, par, box, down)
    ref = lh.clone()
    ref[lh == 0] = 255
    ref[(lh + ll) == 0] = 0
    ref[~box_mask(box, (h, w))] = 255
    assert torch.equal(out, ref)


def test_par_refine_scores_label_batched_equals_faithful_on_full_boxes():
    gen = torch.Generator().manual_seed(12)
    b, k, h, w = 2, 3, 12, 16
    img = torch.rand(b, 3, h, w, generator=gen)
    labels = _labels(b, k, gen)
    sh, sl = _scores(b, k, 6, 8, labels, gen), _scores(b, k, 6, 8, labels, gen)  # token resolution
    box = torch.tensor([[0, h, 0, w]] * b)
    par = PAR(num_iter=3)
    for down in (2, 4):
        slow = par_refine_scores_label(img, sh, sl, labels, par, box, crop_to_box=True, downscale=down)
        fast = par_refine_scores_label(img, sh, sl, labels, par, box, crop_to_box=False, downscale=down)
        assert torch.equal(slow, fast)


def test_a_held_kernel_gives_the_same_labels_and_is_computed_once(monkeypatch):
    """AFA's training step holds one PAR kernel of the half-size image for its two labels: the labels
    equal those of the functions computing their own kernel (the per-image references above), the
    kernel is computed once, and a kernel of another size, or with crop_to_box, is an error."""
    gen = torch.Generator().manual_seed(13)
    b, k, h, w = 3, 4, 16, 14
    img = torch.rand(b, 3, h, w, generator=gen)
    cam = torch.rand(b, k, h, w, generator=gen)
    labels = _labels(b, k, gen)
    sh, sl = _scores(b, k, 8, 7, labels, gen), _scores(b, k, 8, 7, labels, gen)
    box = torch.tensor([[0, h, 0, w]] * b)
    par = PAR(num_iter=3)
    calls = []
    kernel_of = PAR.kernel
    monkeypatch.setattr(PAR, "kernel", lambda self, im: calls.append(im.shape) or kernel_of(self, im))
    held = ImageKernel(par, downscaled(img, 2))
    label = par_pseudo_label(img, cam, labels, par, img_box=box, kernel=held)
    prop = par_refine_scores_label(img, sh, sl, labels, par, box, crop_to_box=False, kernel=held)
    assert calls == [(b, 3, h // 2, w // 2)]
    assert torch.equal(label, ref_par_pseudo_label(img, cam, labels, par, 0.55, 0.35, box.tolist()))
    assert torch.equal(prop, par_refine_scores_label(img, sh, sl, labels, par, box, crop_to_box=True))
    with pytest.raises(ValueError, match=r"held PAR kernel is of a \(B, H, W\) = \(3, 16, 14\) image"):
        par_pseudo_label(img, cam, labels, par, kernel=ImageKernel(par, img))
    with pytest.raises(ValueError, match="crop_to_box=True refines each image in its box"):
        par_refine_scores_label(img, sh, sl, labels, par, box, crop_to_box=True, kernel=held)


def ref_affinity_labels(tok, window, ignore=255):
    b, n = tok.shape
    out = torch.zeros(b, n, n, dtype=torch.long)
    for i in range(b):
        for p in range(n):
            for q in range(n):
                if tok[i, p] == ignore or tok[i, q] == ignore or (window is not None and not window[p, q]):
                    out[i, p, q] = ignore
                else:
                    out[i, p, q] = int(tok[i, p] == tok[i, q])
    return out


def test_affinity_labels_toy_counts():
    # 2x2 token grid of 2x2 cells; top-left pixels: 0, 1 / 255, 0
    label = torch.tensor([[[0, 7, 1, 1], [7, 7, 1, 1], [255, 0, 0, 3], [0, 0, 3, 3]]])
    aff = affinity_labels(label, (2, 2))
    assert aff.shape == (1, 4, 4) and aff.dtype == torch.long
    # tokens 0, 1, 255, 0: valid pairs among {0, 1, 3}: positives = diag (3) + (0,3),(3,0); negatives = 4
    assert int((aff == 1).sum()) == 5 and int((aff == 0).sum()) == 4 and int((aff == 255).sum()) == 7
    assert aff[0, 0, 3] == 1 and aff[0, 0, 0] == 1  # bg-bg and diagonal are positives
    win = torch.eye(4, dtype=torch.bool)
    assert int((affinity_labels(label, (2, 2), window=win) == 1).sum()) == 3
    # centre sampling: pixel (1, 1) of each cell -> 7, 1, 0, 3; mode: 7, 1, 0, 3 (ties -> smallest)
    center = affinity_labels(label, (2, 2), sampling="center")
    assert int((center == 255).sum()) == 0 and int((center == 1).sum()) == 4
    mode = affinity_labels(label, (2, 2), sampling="mode")
    assert int((mode == 1).sum()) == 4


def test_affinity_labels_match_reference_with_window():
    gen = torch.Generator().manual_seed(13)
    label = torch.randint(0, 3, (2, 20, 24), generator=gen)
    label[label == 2] = 255
    grid = (5, 6)
    win = window_mask(*grid, 2)
    out = affinity_labels(label, grid, window=win)
    tok = label[:, ::4, ::4].reshape(2, -1)  # PyTorch nearest with factor 4 = top-left pixels
    assert torch.equal(out, ref_affinity_labels(tok, win))


def test_held_image_kernel_is_computed_once_and_changes_nothing(monkeypatch):
    """An ImageKernel computes its image's PAR kernel on first use and reuses it: refinements with it
    equal refinements without it, bit for bit; without one, every call computes its own."""
    from wsss.refine.par import ImageKernel

    par = PAR(num_iter=2)
    computed: list[int] = []
    plain = par._kernel
    monkeypatch.setattr(par, "_kernel", lambda img: computed.append(id(img)) or plain(img))
    img = torch.rand(2, 3, 6, 7)
    maps, other = torch.rand(2, 4, 6, 7), torch.rand(2, 2, 3, 4)  # other: resized to the image first
    alone = [par(img, maps), par(img, other)]
    assert len(computed) == 2
    held = ImageKernel(par, img)
    assert len(computed) == 2  # nothing computed before it is used
    shared = [held.refine(maps), par(img, other, kernel=held.kernel)]
    assert len(computed) == 3 and held.kernel is held.kernel
    assert all(torch.equal(a, b) for a, b in zip(alone, shared))


def test_par_argmax_with_a_held_kernel_equals_without() -> None:
    """Two refinements of one image (two score stacks, as 'cam_par' and 'aff_par') with a held kernel
    give the labels of each alone."""
    from wsss.methods.base import Method
    from wsss.refine.par import ImageKernel

    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 12, 10, generator=g)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    stacks = [torch.rand(2, 4, 6, 5, generator=g), torch.rand(2, 4, 12, 10, generator=g)]
    par = PAR(num_iter=3)
    held = ImageKernel(par, img)
    for scores in stacks:
        want = par_argmax_label(img, scores, labels, par)
        assert torch.equal(par_argmax_label(img, scores, labels, par, held.kernel), want)
    method = Method.__new__(Method)  # par_argmax reads only the PAR module
    method.par = par
    want = par_argmax_label(img, stacks[0], labels, par)
    assert torch.equal(method.par_argmax(img, stacks[0], labels, held), want)
    with pytest.raises(ValueError, match="another image"):
        method.par_argmax(img.clone(), stacks[0], labels, held)


def test_oracle_affinity_keeps_every_token_s_self_pair() -> None:
    from wsss.refine.labels import affinity_labels, oracle_affinity

    label = torch.tensor([[[1, 1, 255], [0, 0, 1]]])  # (1, 2, 3): one void cell
    target = affinity_labels(label, (2, 3), None)
    got = oracle_affinity(target)
    tok = label.flatten(1)[0].tolist()
    for i in range(6):
        for j in range(6):
            want = 1.0 if i == j or (tok[i] == tok[j] and tok[i] != 255) else 0.0
            assert float(got[0, i, j]) == want, (i, j)
