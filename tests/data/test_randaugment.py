"""wsss.data.randaugment: the timm rand-m9-mstd0.5-inc1 / RandomErasing recipe of MCTformer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsss.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from wsss.config import load_config
from wsss.data.build import build_transform
from wsss.data.randaugment import (
    FILL,
    OPS,
    RandAugment,
    apply_op,
    erase_box,
    level_to_arg,
    random_erasing,
)


class _Sign:
    """A stand-in generator whose random() decides the sign (< 0.5 negates)."""

    def __init__(self, r: float) -> None:
        self.r = r

    def random(self) -> float:
        return self.r


@pytest.mark.parametrize("level", [0.0, 4.5, 10.0])
def test_level_to_arg_table(level):
    f = level / 10
    size = (200, 120)
    expected = {  # timm _*_level_to_arg, positive sign
        "Rotate": 30 * f, "ShearX": 0.3 * f, "ShearY": 0.3 * f,
        "TranslateXRel": 0.45 * f * 200, "TranslateYRel": 0.45 * f * 120,
        "PosterizeIncreasing": 4 - int(4 * f), "SolarizeIncreasing": 256 - int(256 * f),
        "SolarizeAdd": int(110 * f), "ColorIncreasing": 1 + 0.9 * f, "ContrastIncreasing": 1 + 0.9 * f,
        "BrightnessIncreasing": 1 + 0.9 * f, "SharpnessIncreasing": 1 + 0.9 * f,
        "AutoContrast": None, "Equalize": None, "Invert": None,
    }  # fmt: skip
    assert set(expected) == set(OPS)
    for op, want in expected.items():
        got = level_to_arg(op, level, _Sign(0.9), size)  # type: ignore[arg-type]
        assert got == pytest.approx(want) if want is not None else got is None, op
        if op in ("Rotate", "ShearX", "TranslateXRel", "ColorIncreasing"):
            neg = level_to_arg(op, level, _Sign(0.1), size)  # type: ignore[arg-type]
            centre = 1.0 if op.endswith("Increasing") else 0.0
            assert neg == pytest.approx(2 * centre - want), op
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        level_to_arg("Blur", 5, _Sign(0.9), size)  # type: ignore[arg-type]


def test_from_spec_and_errors():
    ra = RandAugment.from_spec("rand-m9-mstd0.5-inc1")
    assert (ra.n, ra.m, ra.mstd, ra.prob) == (2, 9.0, 0.5, 0.5)
    assert RandAugment.from_spec("rand-n3-m5-inc1").n == 3
    bad_specs = (("auto-m9", "start with"), ("rand-m9-x1-inc1", "cannot parse"), ("rand-m9", "increasing"))
    for bad, msg in bad_specs:
        with pytest.raises(ValueError, match=msg):
            RandAugment.from_spec(bad)
    with pytest.raises(ValueError, match="unknown RandAugment ops"):
        RandAugment(ops=("Blur",))


def test_solarize_add_matches_loops():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    out, _ = apply_op(img, None, "SolarizeAdd", 99)
    for idx in np.ndindex(img.shape):
        v = int(img[idx])
        assert out[idx] == (min(v + 99, 255) if v < 128 else v)


def test_geometric_ops_move_the_mask_with_the_image():
    img = np.zeros((40, 50, 3), dtype=np.uint8)
    img[10:20, 20:30] = 255
    mask = np.zeros((40, 50), dtype=np.int64)
    mask[10:20, 20:30] = 3
    out, m = apply_op(img, mask, "TranslateXRel", 8.0)  # content moves 8 px left
    assert m is not None and m.dtype == np.int64
    assert set(np.unique(m)) == {0, 3, 255}
    assert (m[10:20, 12:22] == 3).all() and (m == 3).sum() == 100
    assert (out[12:18, 14:20] > 200).all() and (out[12:18, 24:28] < 50).all()
    assert (m[:, -8:] == 255).all() and (np.abs(out[:, -8:].astype(int) - FILL).max() <= 1)
    for op, arg in (("Rotate", 17.0), ("ShearX", 0.2), ("ShearY", -0.25), ("TranslateYRel", -5.0)):
        out, m = apply_op(img, mask, op, arg)
        fg = (m == 3) & (m != 255)
        assert fg.sum() > 50 and out[fg].mean() > 180, op  # the mask still covers the bright square
    colour, m2 = apply_op(img, mask, "Equalize", None)
    assert m2 is mask  # photometric ops leave the mask alone


def test_rand_augment_is_seeded_and_keeps_dtypes():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (32, 48)).astype(np.int64)
    ra = RandAugment(n=4, prob=1.0)
    a = ra(img, mask, np.random.default_rng(7))
    b = ra(img, mask, np.random.default_rng(7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].dtype == np.uint8 and a[0].shape == img.shape and a[1].shape == mask.shape
    outs = {ra(img, mask, np.random.default_rng(s))[0].tobytes() for s in range(6)}
    assert len(outs) > 1
    assert RandAugment(prob=0.0)(img, mask, rng)[0] is img  # no op applied


def test_erase_box_bounds_and_pixel_fill():
    rng = np.random.default_rng(3)
    for _ in range(200):
        box = erase_box(rng, 60, 80)
        assert box is not None
        top, left, h, w = box
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        area = h * w / (60 * 80)
        assert 0.02 * 0.7 <= area <= 1 / 3 * 1.3  # rounding of h and w
        assert 0.3 / 1.3 <= h / max(w, 1) <= 1 / 0.3 * 1.3
    assert erase_box(rng, 1, 1) is None  # nothing fits
    img = np.zeros((3, 60, 80), dtype=np.float32)
    assert random_erasing(img, rng, p=0.0) is img
    out = random_erasing(img, np.random.default_rng(5), p=1.0)
    changed = np.argwhere((out != 0).any(0))
    (r0, c0), (r1, c1) = changed.min(0), changed.max(0)
    assert (out[:, r0 : r1 + 1, c0 : c1 + 1] != 0).mean() > 0.99  # one filled rectangle
    m, sd = np.asarray(IMAGENET_MEAN)[:, None, None], np.asarray(IMAGENET_STD)[:, None, None]
    normed = (out[:, r0 : r1 + 1, c0 : c1 + 1] - m) / sd  # what the network sees
    assert abs(float(normed.std()) - 1.0) < 0.2 and abs(float(normed.mean())) < 0.2  # N(0, 1)
    assert math.isclose(float(img.sum()), 0.0)  # the input is not modified


def test_mctformer_config_builds_the_recipe():
    cfg = load_config("aream_mctformer_deit_s_voc")
    t = build_transform(cfg.data, train=True)
    assert isinstance(t.rand_augment, RandAugment) and t.random_erasing == 0.25 and t.resized_crop
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    mask = np.zeros((50, 70), dtype=np.int64)
    x, m, box = t(img, mask, np.random.default_rng(11))
    x2, m2, _ = t(img, mask, np.random.default_rng(11))
    assert x.shape == (3, 224, 224) and m.shape == (224, 224)
    assert np.array_equal(x, x2) and np.array_equal(m, m2)
    assert list(box) == [0, 224, 0, 224]
    with pytest.raises(ValueError, match="random_erasing"):
        build_transform({"random_erasing": 2.0}, train=True)
    assert build_transform({"rand_augment": "none"}, train=True).rand_augment is None
