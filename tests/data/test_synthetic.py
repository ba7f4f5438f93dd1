"""Tests for the synthetic WSSS generator (wsss.data.synthetic)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from wsss.data import VOCDataset, build_dataset, generate_synthetic, render_sample
from wsss.data.synthetic import PART_FRACTION, _palette, main


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    generate_synthetic(root, num_train=24, num_val=6, size=64, seed=3, num_classes=5)
    return root


def test_layout_and_loadable(syn_root):
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "SegmentationPart"):
        assert (syn_root / d).is_dir()
    names = json.loads((syn_root / "class_names.json").read_text())
    assert names[0] == "background" and len(names) == 5
    ds = VOCDataset(syn_root, "train_aug")
    assert len(ds) == 24 and ds.num_classes == 5 and ds.class_names == tuple(names)
    val = VOCDataset(syn_root, "val")
    assert len(val) == 6
    s = ds[0]
    assert s["image"].shape == (3, 64, 64) and s["labels"].shape == (4,)
    cls_labels = json.loads((syn_root / "cls_labels.json").read_text())
    for i, n in enumerate(ds.names):  # labels written by the generator == labels derived from masks
        ref = np.zeros(4)
        ref[np.asarray(cls_labels[n], dtype=int) - 1] = 1
        np.testing.assert_array_equal(ds.labels[i], ref)
    a = np.asarray(Image.open(syn_root / "SegmentationClass" / f"{n}.png"))
    b = np.asarray(Image.open(syn_root / "SegmentationClassAug" / f"{n}.png"))
    np.testing.assert_array_equal(a, b)


def test_deterministic(tmp_path, syn_root):
    generate_synthetic(tmp_path, num_train=24, num_val=6, size=64, seed=3, num_classes=5)
    for sub in ("JPEGImages/train_00005.jpg", "SegmentationClass/val_00002.png", "cls_labels.json"):
        assert (tmp_path / sub).read_bytes() == (syn_root / sub).read_bytes()
    a, b = render_sample(np.random.default_rng(7), 48, 4), render_sample(np.random.default_rng(7), 48, 4)
    for x, y in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(x, y)
    c = render_sample(np.random.default_rng(8), 48, 4)
    assert not np.array_equal(a[0], c[0])


def test_classes_per_image_in_range(syn_root):
    ds = VOCDataset(syn_root, "train")
    counts = ds.labels.sum(1)
    assert counts.min() >= 1 and counts.max() <= 3
    assert len(set(counts.tolist())) >= 2  # not always the same number
    assert ds.labels.sum(0).min() >= 1  # every class appears


def test_discriminative_part_is_small(syn_root):
    """Measured from the masks: visible part pixels / visible object pixels, per class and image;
    a share of the objects (about 1 - PART_PROB) shows no part at all."""
    fracs, without = [], 0
    for n in VOCDataset(syn_root, "train").names:
        mask = np.asarray(Image.open(syn_root / "SegmentationClass" / f"{n}.png")).astype(int)
        part = np.asarray(Image.open(syn_root / "SegmentationPart" / f"{n}.png")).astype(int)
        assert ((part > 0) <= (mask > 0)).all() and (part[part > 0] == mask[part > 0]).all()
        for c in np.unique(mask[mask > 0]):
            p = (part == c).sum()
            if p == 0:
                without += 1
                continue
            fracs.append(p / (mask == c).sum())
    assert 0.15 < without / (without + len(fracs)) < 0.6
    fracs = np.asarray(fracs)
    assert 0.08 < np.median(fracs) < 0.2 and fracs.max() < 0.45
    meta = json.loads((syn_root / "synthetic_meta.json").read_text())["objects"]
    full = [
        o["full_part_area"] / o["full_area"] for objs in meta.values() for o in objs if o["full_part_area"]
    ]
    assert PART_FRACTION[0] * 0.7 < min(full) and max(full) < PART_FRACTION[1] * 1.3


def test_bodies_weak_evidence_parts_distinct():
    """Part colours are class-specific; a body's colour leans to its class hue but is often another's."""
    parts, bodies = _palette(4)
    assert len(bodies) == 4
    d_parts = min(np.abs(parts[i] - parts[j]).sum() for i in range(4) for j in range(i + 1, 4))
    assert d_parts > 100
    rng = np.random.default_rng(0)
    own, other = 0, 0
    for _ in range(60):
        img, mask, part, _ = render_sample(rng, 64, 5)
        for c in np.unique(mask[mask > 0]):
            body = (mask == c) & (part == 0)
            if body.sum() > 30:
                mean = img[body].mean(0)
                nearest = int(np.argmin(np.abs(bodies - mean).sum(1))) + 1
                own += nearest == c
                other += nearest != c
    assert own > 1.5 * other  # the body is evidence of the class ...
    assert other > 0.1 * (own + other)  # ... but not proof


def test_background_cluttered():
    rng = np.random.default_rng(1)
    stds = []
    for _ in range(10):
        img, mask, _, _ = render_sample(rng, 64, 5)
        stds.append(img[mask == 0].astype(float).std(0).mean())
    assert np.mean(stds) > 12


def test_build_dataset_generates_and_cli(tmp_path, capsys):
    root = tmp_path / "gen"
    cfg = {"type": "synthetic", "root": str(root), "num_train": 5, "num_val": 2, "size": 32, "crop_size": 24}
    ds = build_dataset(cfg, "train", train=True)
    assert len(ds) == 5 and ds[0]["image"].shape == (3, 24, 24)
    assert len(build_dataset(cfg, "val", train=False)) == 2
    main([str(tmp_path / "cli"), "--num-train", "3", "--num-val", "1", "--size", "32"])
    assert "wrote 3 train" in capsys.readouterr().out
    assert len(VOCDataset(tmp_path / "cli", "train")) == 3


def test_speed(tmp_path):
    import time

    t = time.perf_counter()
    rng = np.random.default_rng(0)
    for _ in range(50):
        render_sample(rng, 128, 5)
    assert time.perf_counter() - t < 5.0  # hundreds of images in a few seconds
