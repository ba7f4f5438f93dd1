"""Dense CRF (skipped without pydensecrf2) and visual helpers."""

from __future__ import annotations

import builtins
import io

import numpy as np
import pytest
from PIL import Image

from wsss.analysis import viz
from wsss.data.io import voc_palette
from wsss.refine import crf

needs_crf = pytest.mark.skipif(not crf.crf_available(), reason="pydensecrf2 not installed")


def _noisy_case(h=40, w=48, c=3, seed=0):
    rng = np.random.default_rng(seed)
    gt = np.zeros((h, w), dtype=np.int64)
    gt[:, w // 3 : 2 * w // 3] = 1
    gt[h // 2 :, 2 * w // 3 :] = 2
    colours = np.array([[20, 30, 200], [200, 60, 40], [90, 220, 100]])
    image = colours[gt].astype(np.uint8)
    logits = np.eye(c)[gt].transpose(2, 0, 1) * 1.0 + rng.normal(0, 1.2, (c, h, w))
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    return image, probs.astype(np.float32), gt


@needs_crf
def test_dense_crf_improves_noisy_softmax():
    image, probs, gt = _noisy_case()
    before = (probs.argmax(0) == gt).mean()
    q = crf.dense_crf(image, probs)
    assert q.shape == probs.shape and q.dtype == np.float32
    assert np.allclose(q.sum(0), 1.0, atol=1e-4)
    after = (q.argmax(0) == gt).mean()
    assert after > before + 0.1 and after > 0.95


@needs_crf
def test_unary_matches_pydensecrf_utils():
    from pydensecrf.utils import unary_from_labels

    lab = np.array([[0, 1], [2, 1]])
    ref = unary_from_labels(lab, 3, gt_prob=0.7, zero_unsure=False)
    assert np.allclose(crf.label_unary(lab, 3, 0.7), ref)
    image, probs, gt = _noisy_case(seed=1)
    noisy = probs.argmax(0)
    out = crf.crf_inference_label(image, noisy, n_labels=3)
    assert out.shape == gt.shape and (out == gt).mean() >= (noisy == gt).mean()


@needs_crf
def test_presets_batch_and_tensor():
    import torch

    image, probs, _ = _noisy_case(h=16, w=20)
    a = crf.crf_preset(image, probs, "aream")
    b = crf.crf_inference(image, probs)
    assert np.allclose(a, b)
    t = crf.dense_crf(torch.from_numpy(image), torch.from_numpy(probs))
    assert isinstance(t, torch.Tensor) and np.allclose(t.numpy(), crf.dense_crf(image, probs))
    images, probs_list = [image, image[:10]], [probs, probs[:, :10]]
    seq = crf.crf_batch(images, probs_list, workers=1)
    par = crf.crf_batch(images, probs_list, workers=2)
    for s, p in zip(seq, par):
        assert np.allclose(s, p)


def test_missing_package_message(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError("No module named 'pydensecrf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert not crf.crf_available()
    with pytest.raises(ImportError, match=r"pip install 'wsss\[crf\]' \(needs a C\+\+ compiler\)"):
        crf.dense_crf(np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 2), 0.5, np.float32))


def test_label_unary_hand_values():
    u = crf.label_unary(np.array([[1]]), 3, gt_prob=0.7)
    assert np.allclose(u[:, 0], [-np.log(0.15), -np.log(0.7), -np.log(0.15)])


# ------------------------------------------------------------------ viz


def test_colorize_palette_values():
    lab = np.array([[0, 1, 2], [15, 255, 3]])
    out = viz.colorize(lab)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    hand = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 15: (192, 128, 128),
            255: (224, 224, 192)}
    for (y, x), v in np.ndenumerate(lab):
        assert tuple(out[y, x]) == hand[v]
    assert np.array_equal(viz.colorize(lab), voc_palette()[lab])
    with pytest.raises(ValueError):
        viz.colorize(np.array([[256]]))


def test_jet_matches_matplotlib():
    mpl = pytest.importorskip("matplotlib")
    x = np.linspace(-0.1, 1.1, 301).reshape(7, 43)
    ref = mpl.colormaps["jet"](np.clip(x, 0, 1), bytes=True)[..., :3]
    assert np.array_equal(viz.apply_colormap(x), ref)


def test_overlay_heatmap_values():
    image = np.full((2, 2, 3), 100, np.uint8)
    heat = np.array([[0.0, 1.0], [0.5, 0.25]])
    out = viz.overlay_heatmap(image, heat, alpha=0.5)
    lut = viz.colormap_lut("jet")
    for (y, x), h in np.ndenumerate(heat):
        col = lut[min(int(h * 256), 255)].astype(float)
        for ch in range(3):
            assert out[y, x, ch] == int(np.rint(0.5 * 100 + 0.5 * col[ch]))
    assert tuple(viz.apply_colormap(np.array([[0.0]]))[0, 0]) == (0, 0, 127)  # jet starts dark blue


def test_overlay_label_skips_ignore():
    image = np.full((1, 3, 3), 200, np.uint8)
    out = viz.overlay_label(image, np.array([[0, 1, 255]]), alpha=0.5)
    assert tuple(out[0, 0]) == (100, 100, 100) and tuple(out[0, 1]) == (164, 100, 100)
    assert tuple(out[0, 2]) == (200, 200, 200)


def test_grid_png_legend():
    a = np.zeros((4, 5, 3), np.uint8)
    b = np.full((6, 3), 7, np.uint8)
    g = viz.make_grid([[a, b], [b]], pad=1)
    assert g.shape == (1 + 6 + 1 + 6 + 1, 1 + 5 + 1 + 3 + 1, 3)
    assert np.array_equal(g[1:5, 1:6], a) and np.all(g[1:7, 7:10] == 7) and np.all(g[8:14, 1:4] == 7)
    labelled = viz.make_grid([[a, a]], col_labels=["img", "cam"], row_labels=["x"])
    assert labelled.shape[0] > g.shape[0] - 10 and labelled.dtype == np.uint8
    png = viz.to_png_bytes(g)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), g)
    leg = viz.legend(["background", "aeroplane"])
    assert leg.dtype == np.uint8 and tuple(leg[18 + 5, 5]) == (128, 0, 0)
