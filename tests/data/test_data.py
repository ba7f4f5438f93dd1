"""Tests for wsss.data: IO, transforms, VOC/COCO/folder datasets, loaders."""

from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.data import (
    COCODataset,
    DataError,
    EvalTransform,
    FolderDataset,
    TrainTransform,
    VOCDataset,
    build_dataset,
    build_loader,
    build_transform,
    collate,
    color_jitter,
    convert_cls_labels_npy,
    image01_to_uint8,
    load_image,
    load_mask,
    random_crop,
    random_rescale,
    random_resized_crop,
    save_mask,
    to_image01,
    voc_palette,
)
from wsss.data.transforms import _shift_hue, pad_and_crop

# ----------------------------------------------------------------------------------------- IO


def _rand_rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_voc_palette_known_colours():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[255].tolist() == [224, 224, 192]


def test_load_image_modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = _rand_rgb(rng, 5, 7)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png"), rgb)

    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    out = load_image(tmp_path / "gray.png")
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)

    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    for y in range(5):
        for x in range(7):
            for c in range(3):
                ref = round(int(rgba[y, x, c]) * int(rgba[y, x, 3]) / 255)
                assert abs(int(out[y, x, c]) - ref) <= 1

    idx = rng.integers(0, 4, (5, 7), dtype=np.uint8)
    pal = [10, 20, 30, 200, 0, 0, 0, 200, 0, 1, 2, 250]
    p = Image.fromarray(idx)
    p.putpalette(pal)
    p.save(tmp_path / "pal.png")
    out = load_image(tmp_path / "pal.png")
    np.testing.assert_array_equal(out, np.asarray(pal).reshape(4, 3)[idx])

    p.save(tmp_path / "pal_t.png", transparency=0)  # index 0 transparent -> black
    out = load_image(tmp_path / "pal_t.png")
    ref = np.asarray(pal).reshape(4, 3)[idx]
    ref[idx == 0] = 0
    np.testing.assert_array_equal(out, ref)

    g16 = rng.integers(0, 65536, (5, 7)).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = load_image(tmp_path / "g16.png")
    for y in range(5):
        for x in range(7):
            assert abs(int(out[y, x, 0]) - round(int(g16[y, x]) * 255 / 65535)) <= 1


@pytest.mark.parametrize("orientation,k", [(6, -1), (8, 1), (3, 2), (1, 0)])
def test_load_image_exif_orientation(tmp_path, orientation, k):
    blocks = np.zeros((16, 24, 3), dtype=np.uint8)  # flat 8x8 blocks survive JPEG
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    for i in range(2):
        for j in range(3):
            blocks[8 * i : 8 * i + 8, 8 * j : 8 * j + 8] = colours[3 * i + j]
    img = Image.fromarray(blocks)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "r.png", exif=exif)
    ref = np.rot90(blocks, k)
    np.testing.assert_array_equal(load_image(tmp_path / "r.png"), ref)
    img.save(tmp_path / "r.jpg", exif=exif, quality=100, subsampling=0)
    out = load_image(tmp_path / "r.jpg").astype(int)
    assert out.shape == ref.shape and np.abs(out - ref).max() < 12


def test_load_image_bad_files(tmp_path):
    with pytest.raises(DataError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="empty.jpg"):
        load_image(tmp_path / "empty.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image" * 10)
    with pytest.raises(DataError, match="junk.jpg"):
        load_image(tmp_path / "junk.jpg")
    Image.fromarray(_rand_rgb(np.random.default_rng(0), 64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc.jpg"):
        load_image(tmp_path / "trunc.jpg")
    assert issubclass(DataError, ValueError)


def test_load_mask_formats(tmp_path):
    rng = np.random.default_rng(1)
    m = rng.integers(0, 21, (6, 9))
    m[0, :3] = 255
    save_mask(tmp_path / "p.png", m)
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = load_mask(tmp_path / "p.png", 21)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, m)
    Image.fromarray(m.astype(np.uint8)).save(tmp_path / "l.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "l.png", 21), m)
    # colour-coded VOC mask (RGB)
    Image.fromarray(voc_palette()[m]).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "rgb.png", 21), m)
    # index mask saved as grey RGBA (as some converted COCO masks are)
    g = np.repeat(np.where(m == 255, 255, m * 3 % 21)[..., None].astype(np.uint8), 3, axis=2)
    Image.fromarray(np.concatenate([g, np.full((6, 9, 1), 255, np.uint8)], 2)).save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "g.png", 21), g[..., 0])


def test_load_mask_bad_values(tmp_path):
    m = np.zeros((4, 4), dtype=np.int64)
    m[1, 1], m[2, 2] = 30, 77
    save_mask(tmp_path / "bad.png", m)
    with pytest.raises(DataError, match=r"bad\.png.*\[30, 77\]"):
        load_mask(tmp_path / "bad.png", 21)
    load_mask(tmp_path / "bad.png", 81)  # fine for COCO
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "rgbbad.png")
    with pytest.raises(DataError, match=r"rgbbad\.png.*\(1, 2, 3\)"):
        load_mask(tmp_path / "rgbbad.png", 21)
    with pytest.raises(DataError, match="nomask.png"):
        load_mask(tmp_path / "nomask.png", 21)


# --------------------------------------------------------------------------------- transforms


def _ref_pad_crop(image, mask, S, pad, crop):
    """Loop reference of pad-then-crop."""
    h, w = image.shape[:2]
    H, W = max(S, h), max(S, w)
    canvas = [[(0, 0, 0) for _ in range(W)] for _ in range(H)]
    mcanvas = [[255 for _ in range(W)] for _ in range(H)]
    for y in range(h):
        for x in range(w):
            canvas[y + pad[0]][x + pad[1]] = tuple(image[y, x])
            mcanvas[y + pad[0]][x + pad[1]] = mask[y, x]
    out = np.zeros((S, S, 3), dtype=np.uint8)
    mout = np.zeros((S, S), dtype=np.int64)
    real = np.zeros((S, S), dtype=bool)
    for y in range(S):
        for x in range(S):
            out[y, x] = canvas[y + crop[0]][x + crop[1]]
            mout[y, x] = mcanvas[y + crop[0]][x + crop[1]]
            yy, xx = y + crop[0] - pad[0], x + crop[1] - pad[1]
            real[y, x] = 0 <= yy < h and 0 <= xx < w
    return out, mout, real


@pytest.mark.parametrize("h,w,S", [(5, 7, 8), (10, 4, 6), (9, 9, 9), (12, 15, 5), (3, 3, 7)])
def test_random_crop_matches_loop_reference(h, w, S):
    rng = np.random.default_rng(h * 100 + w)
    image = _rand_rgb(rng, h, w)
    mask = rng.integers(0, 21, (h, w))
    for trial in range(4):
        gen = np.random.default_rng(trial)
        out, mout, box = random_crop(image, mask, gen, S)
        # replay the offsets the function drew
        gen = np.random.default_rng(trial)
        H, W = max(S, h), max(S, w)
        pad = (int(gen.integers(H - h + 1)), int(gen.integers(W - w + 1)))
        crop = (int(gen.integers(H - S + 1)), int(gen.integers(W - S + 1)))
        ref, mref, real = _ref_pad_crop(image, mask, S, pad, crop)
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(mout, mref)
        assert box.dtype == np.int64 and box.shape == (4,)
        rows, cols = np.nonzero(real)
        assert box.tolist() == [rows.min(), rows.max() + 1, cols.min(), cols.max() + 1]
        assert (mout[~real] == 255).all() and (out[~real] == 0).all()


def test_pad_and_crop_small_image_padded_with_ignore():
    image = np.full((2, 3, 3), 200, dtype=np.uint8)
    mask = np.array([[1, 2, 0], [3, 4, 5]])
    out, m, box = pad_and_crop(image, mask, 4, (1, 0), (0, 0))
    assert box.tolist() == [1, 3, 0, 3]
    assert (m[0] == 255).all() and (m[:, 3] == 255).all()
    np.testing.assert_array_equal(m[1:3, :3], mask)
    assert (out[0] == 0).all() and (out[1:3, :3] == 200).all()


def test_random_crop_cat_max_ratio_fixed_condition():
    mask = np.zeros((40, 40), dtype=np.int64)
    mask[:, 20:] = 1
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    for seed in range(10):
        _, m, _ = random_crop(image, mask, np.random.default_rng(seed), 20, cat_max_ratio=0.75)
        _, cnt = np.unique(m[m != 255], return_counts=True)
        # accepted windows hold two classes unless all 10 tries failed (very unlikely here)
        assert len(cnt) == 2 and cnt.max() / cnt.sum() < 0.75


def test_random_rescale_sizes_and_nearest_mask():
    rng = np.random.default_rng(0)
    image = _rand_rgb(rng, 30, 20)
    mask = rng.integers(0, 5, (30, 20))
    for seed in range(5):
        ratio = np.random.default_rng(seed).uniform(0.5, 2.0)
        out, m = random_rescale(image, mask, np.random.default_rng(seed), (0.5, 2.0))
        assert out.shape == (int(ratio * 30), int(ratio * 20), 3)
        assert m.shape == out.shape[:2]
        assert set(np.unique(m)) <= set(np.unique(mask))


def test_train_transform_seeded_reproducible():
    rng = np.random.default_rng(3)
    image = _rand_rgb(rng, 40, 50)
    mask = rng.integers(0, 21, (40, 50))
    for t in (
        TrainTransform(32),
        TrainTransform(32, color_jitter=True, interpolation="bicubic"),
        TrainTransform(24, resized_crop=True),
    ):
        a = t(image, mask, np.random.default_rng(11))
        b = t(image, mask, np.random.default_rng(11))
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        outs = [t(image, mask, np.random.default_rng(s))[0] for s in range(5)]
        assert any(not np.array_equal(outs[0], o) for o in outs[1:])
        img, m, box = a
        assert img.dtype == np.float32 and img.shape[0] == 3 and m.shape == img.shape[1:]


def test_train_transform_without_mask_gives_ignore():
    image = np.full((10, 12, 3), 50, dtype=np.uint8)
    img, m, box = TrainTransform(16, scale_range=None, flip=False)(image, None, np.random.default_rng(0))
    assert img.shape == (3, 16, 16) and (m == 255).all()
    r0, r1, c0, c1 = box.tolist()
    assert (r1 - r0, c1 - c0) == (10, 12)


def test_eval_transform_keeps_full_image():
    rng = np.random.default_rng(0)
    image = _rand_rgb(rng, 7, 9)
    mask = rng.integers(0, 3, (7, 9))
    img, m, box = EvalTransform()(image, mask)
    np.testing.assert_array_equal(m, mask)
    assert box.tolist() == [0, 7, 0, 9] and img.shape == (3, 7, 9)


def test_image01_and_the_backbone_normalisation():
    """Batches carry x / 255; the backbone's normalisation of it equals normalising the 0..255 values
    with the ImageNet statistics (bit for bit: the network's input did not change)."""
    from wsss.backbones.base import Backbone

    rng = np.random.default_rng(0)
    image = _rand_rgb(rng, 4, 5)
    x01 = to_image01(image)
    assert x01.dtype == np.float32 and x01.shape == (3, 4, 5)
    for y in range(4):
        for x in range(5):
            for c in range(3):
                assert x01[c, y, x] == np.float32(image[y, x, c]) / np.float32(255)
    every = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    mean = np.asarray((123.675, 116.28, 103.53), dtype=np.float32)
    std = np.asarray((58.395, 57.12, 57.375), dtype=np.float32)
    pipeline = ((every.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    normed = Backbone().normalize(torch.from_numpy(to_image01(every))[None])[0].numpy()
    np.testing.assert_array_equal(normed, pipeline)
    back = image01_to_uint8(torch.from_numpy(x01))
    np.testing.assert_array_equal(back.numpy(), image)
    assert image01_to_uint8(torch.full((3, 1, 1), 2.0)).eq(255).all()


def test_the_network_pads_with_the_mean_colour():
    from wsss.config import load_config
    from wsss.methods import build_network

    net = build_network(load_config("cam_mit_tiny_synthetic"), 5)
    x = torch.rand(2, 3, 17, 32)
    out, size = net.pad(x)
    assert out.shape == (2, 3, 32, 32) and size == (17, 32)
    torch.testing.assert_close(out[..., :17, :], x)
    assert net.backbone.normalize(out)[..., 17:, :].eq(0).all()  # the mean colour: 0 once normalised
    same, size = net.pad(torch.rand(1, 3, 16, 16))
    assert same.shape == (1, 3, 16, 16) and size == (16, 16)
    big, _ = net.pad(torch.rand(1, 3, 20, 70), min_size=64)
    assert big.shape == (1, 3, 64, 80)


def test_hue_shift_matches_colorsys():
    rng = np.random.default_rng(0)
    img = _rand_rgb(rng, 3, 4).astype(np.float64)
    img[0, 0] = (100, 100, 100)  # grey: hue undefined
    for shift in (0.0, 0.07, -0.1):
        out = _shift_hue(img, shift)
        for y in range(3):
            for x in range(4):
                h, s, v = colorsys.rgb_to_hsv(*(img[y, x] / 255))
                ref = np.rint(np.asarray(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)) * 255)
                np.testing.assert_allclose(out[y, x], ref, atol=1)


def test_color_jitter_probability_and_range():
    rng = np.random.default_rng(0)
    image = _rand_rgb(rng, 8, 8)
    np.testing.assert_array_equal(color_jitter(image, np.random.default_rng(0), p=0.0), image)
    out = color_jitter(image, np.random.default_rng(0), p=1.0)
    assert out.dtype == np.uint8 and out.shape == image.shape and not np.array_equal(out, image)
    # brightness only: every pixel scaled by one factor in [0.6, 1.4]
    out = color_jitter(image, np.random.default_rng(5), 0.4, 0.0, 0.0, 0.0, p=1.0)
    g = np.random.default_rng(5)
    g.random()
    g.permutation(4)
    fb = g.uniform(0.6, 1.4)
    for y in range(8):
        for x in range(8):
            for c in range(3):
                assert out[y, x, c] == min(255, round(float(image[y, x, c]) * fb))


def test_random_resized_crop_shapes():
    rng = np.random.default_rng(0)
    image = _rand_rgb(rng, 30, 40)
    mask = rng.integers(0, 4, (30, 40))
    for s in range(5):
        out, m, box = random_resized_crop(image, mask, np.random.default_rng(s), 16)
        assert out.shape == (16, 16, 3) and m.shape == (16, 16) and box.tolist() == [0, 16, 0, 16]
        assert set(np.unique(m)) <= set(np.unique(mask))


# ------------------------------------------------------------------------------------ VOC


def _make_voc(root, n=6, size=(12, 10), num_classes=21, seed=0, absent=(5, 6, 7)):
    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = [f"2007_{i:06d}" for i in range(n)]
    present = [c for c in range(num_classes) if c not in absent]
    masks = {}
    for i, nm in enumerate(names):
        h, w = size[0] + i, size[1]
        Image.fromarray(_rand_rgb(rng, h, w)).save(root / "JPEGImages" / f"{nm}.jpg")
        m = rng.choice(present, size=(h, w)) if i % 3 else np.zeros((h, w), dtype=np.int64)
        m[0, 0] = 255
        masks[nm] = m
        save_mask(root / "SegmentationClass" / f"{nm}.png", m)
        save_mask(root / "SegmentationClassAug" / f"{nm}.png", m)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:4]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(names[4:]) + "\n")
    aug = "".join(f"/JPEGImages/{nm}.jpg /SegmentationClassAug/{nm}.png\n" for nm in names)
    (root / "ImageSets/Segmentation/train_aug.txt").write_text(aug)
    return names, masks


def test_voc_labels_from_masks_match_loop_reference(tmp_path):
    names, masks = _make_voc(tmp_path)
    ds = VOCDataset(tmp_path, "train_aug")
    assert ds.num_classes == 21 and ds.class_names[15] == "person" and len(ds) == 6
    assert ds.mask_dir.name == "SegmentationClassAug"
    for i, nm in enumerate(names):
        ref = [0.0] * 20
        for row in masks[nm]:
            for v in row:
                if 0 < v < 21:
                    ref[v - 1] = 1.0
        assert ds.labels[i].tolist() == ref
        s = ds[i]
        assert s["labels"].tolist() == ref and s["name"] == nm
        assert s["mask"].dtype == torch.long and torch.equal(s["mask"], torch.from_numpy(masks[nm]))
        h, w = masks[nm].shape
        assert s["size"].tolist() == [h, w] and s["img_box"].tolist() == [0, h, 0, w]
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, *masks[nm].shape)
    assert ds.labels[:, 4:7].sum() == 0  # absent classes are fine
    cache = tmp_path / "cls_labels_SegmentationClassAug.json"
    assert cache.is_file() and set(json.loads(cache.read_text())) == set(names)
    # the cache is used: corrupting the masks does not change labels read through it
    ds2 = VOCDataset(tmp_path, "train_aug")
    np.testing.assert_array_equal(ds2.labels, ds.labels)
    val = VOCDataset(tmp_path, "val")
    assert val.mask_dir.name == "SegmentationClass" and len(val) == 2


def test_voc_split_by_path_and_labels_file(tmp_path):
    names, _ = _make_voc(tmp_path)
    split = tmp_path / "mine.txt"
    split.write_text(f"{names[1]}\n{names[2]}\n")
    lf = tmp_path / "labels.json"
    lf.write_text(json.dumps({names[1]: [15, "cat"], names[2]: []}))
    ds = VOCDataset(tmp_path, split, labels_file=lf, mask_dir=None)
    assert ds[0]["labels"].nonzero().flatten().tolist() == [7, 14]
    assert ds[1]["labels"].sum() == 0 and (ds[1]["mask"] == 255).all()
    lf.write_text(json.dumps({names[1]: [15]}))
    with pytest.raises(DataError, match=names[2]):
        VOCDataset(tmp_path, split, labels_file=lf, mask_dir=None)
    lf.write_text(json.dumps({names[1]: [15], names[2]: [42]}))
    with pytest.raises(DataError, match="42"):
        VOCDataset(tmp_path, split, labels_file=lf, mask_dir=None)
    npy = tmp_path / "cls.npy"
    np.save(npy, {names[1]: np.eye(20)[3], names[2]: np.eye(20)[0] + np.eye(20)[19]}, allow_pickle=True)
    with pytest.raises(DataError, match="convert_cls_labels_npy"):
        VOCDataset(tmp_path, split, labels_file=npy, mask_dir=None)
    with pytest.warns(UserWarning, match="allow_pickle"):
        conv = convert_cls_labels_npy(npy, tmp_path / "conv.json")
    assert conv == {names[1]: [4], names[2]: [1, 20]}
    ds = VOCDataset(tmp_path, split, labels_file=tmp_path / "conv.json", mask_dir=None)
    assert ds.labels[1].nonzero()[0].tolist() == [0, 19]


def test_voc_missing_files_listed(tmp_path):
    names, _ = _make_voc(tmp_path)
    (tmp_path / "JPEGImages" / f"{names[1]}.jpg").unlink()
    (tmp_path / "JPEGImages" / f"{names[3]}.jpg").unlink()
    with pytest.raises(DataError, match=f"2 images missing.*{names[1]}.*{names[3]}"):
        VOCDataset(tmp_path, "train")
    with pytest.raises(DataError, match="nosuchsplit"):
        VOCDataset(tmp_path, "nosuchsplit")


def test_voc_missing_mask_and_bad_mask(tmp_path):
    names, _ = _make_voc(tmp_path)
    (tmp_path / "SegmentationClass" / f"{names[2]}.png").unlink()
    with pytest.raises(DataError, match=f"masks missing.*{names[2]}"):
        VOCDataset(tmp_path, "train", mask_dir="SegmentationClass")
    save_mask(tmp_path / "SegmentationClass" / f"{names[2]}.png", np.full((3, 3), 99))
    with pytest.raises(DataError, match=rf"{names[2]}\.png.*99"):
        VOCDataset(tmp_path, "train", mask_dir="SegmentationClass")


def test_voc_mask_size_mismatch_names_both(tmp_path):
    names, _ = _make_voc(tmp_path)
    lf = tmp_path / "l.json"
    lf.write_text(json.dumps({n: [1] for n in names}))
    save_mask(tmp_path / "SegmentationClass" / f"{names[1]}.png", np.zeros((3, 3)))
    ds = VOCDataset(tmp_path, "train", labels_file=lf, mask_dir="SegmentationClass")
    with pytest.raises(DataError, match=rf"{names[1]}\.png.*{names[1]}\.jpg"):
        ds[1]


def test_voc_corrupt_image_named(tmp_path):
    names, _ = _make_voc(tmp_path)
    (tmp_path / "JPEGImages" / f"{names[0]}.jpg").write_bytes(b"\xff\xd8garbage")
    ds = VOCDataset(tmp_path, "train")
    with pytest.raises(DataError, match=f"{names[0]}.jpg"):
        ds[0]


# --------------------------------------------------------------------------------- folder


def _make_folder(root, n=4):
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    for i in range(n):
        Image.fromarray(_rand_rgb(rng, 8, 9)).save(root / "img" / f"im{i}.png")


def test_folder_csv_and_json(tmp_path):
    _make_folder(tmp_path)
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("name,labels\nim0.png,cat;dog\nim1,dog\nim2,\nim3,cat dog\n")
    ds = FolderDataset(tmp_path / "img", csv_file)
    assert ds.class_names == ("background", "cat", "dog") and ds.num_classes == 3
    assert ds.labels.tolist() == [[1, 1], [0, 1], [0, 0], [1, 1]]
    s = ds[0]
    assert s["mask"].eq(255).all() and s["name"] == "im0"
    ids_csv = tmp_path / "ids.csv"
    ids_csv.write_text("name,labels\nim0,2\nim1,1;2\n")
    ds = FolderDataset(tmp_path / "img", ids_csv, class_names=["cat", "dog"])
    assert ds.labels.tolist() == [[0, 1], [1, 1]]
    js = tmp_path / "labels.json"
    spec = {"classes": ["cat", "dog", "cow"], "labels": {"im1": ["cow"], "im3": ["cat", "cow"]}}
    js.write_text(json.dumps(spec))
    (tmp_path / "masks").mkdir()
    save_mask(tmp_path / "masks" / "im1.png", np.full((8, 9), 3))
    ds = FolderDataset(tmp_path / "img", js, mask_dir=tmp_path / "masks")
    assert ds.num_classes == 4 and ds.labels.tolist() == [[0, 0, 1], [1, 0, 1]]
    assert ds[0]["mask"].eq(3).all() and ds[1]["mask"].eq(255).all()


def test_folder_unknown_class_named(tmp_path):
    _make_folder(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,labels\nim0,cat\nim1,zebra\n")
    with pytest.raises(DataError, match=r"bad\.csv.*im1.*zebra"):
        FolderDataset(tmp_path / "img", bad, class_names=["cat", "dog"])
    missing = tmp_path / "missing.csv"
    missing.write_text("name,labels\nim9,cat\n")
    with pytest.raises(DataError, match="im9"):
        FolderDataset(tmp_path / "img", missing)


# ----------------------------------------------------------------------------------- COCO


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_coco_converter_and_dataset(tmp_path):
    pytest.importorskip("pycocotools")
    from wsss.data import convert_coco_instances

    h, w = 10, 12

    def rect(y0, y1, x0, x1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    from pycocotools import mask as mask_utils

    crowd = np.zeros((h, w), dtype=np.uint8, order="F")
    crowd[8:10, 0:3] = 1
    rle = mask_utils.encode(crowd)
    rle["counts"] = rle["counts"].decode()
    anns = [
        {"id": 1, "image_id": 1, "category_id": 90, "segmentation": rect(1, 9, 1, 11), "area": 80,
         "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": rect(3, 6, 3, 6), "area": 9, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 13, "segmentation": rle, "area": 6, "iscrowd": 1},
    ]
    cats = [{"id": cid, "name": f"c{cid}"} for cid in (1, 13, 90)]
    inst = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": h, "width": w},
                       {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": h, "width": w}],
            "annotations": anns, "categories": cats}  # fmt: skip
    (tmp_path / "inst.json").write_text(json.dumps(inst))
    out = tmp_path / "coco" / "SegmentationClass" / "train2014"
    written = convert_coco_instances(tmp_path / "inst.json", out)
    assert written == ["COCO_train2014_000000000001", "COCO_train2014_000000000002"]
    m = load_mask(out / f"{written[0]}.png", 81)
    # reference from pycocotools' own rasterisation, painted by loops
    from pycocotools.coco import COCO

    coco = COCO(str(tmp_path / "inst.json"))
    big, small = (coco.annToMask(a) for a in anns[:2])
    ref = np.zeros((h, w), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            if big[y, x]:
                ref[y, x] = 3  # id 90 -> 3rd category
            if small[y, x]:
                ref[y, x] = 1
            if crowd[y, x]:
                ref[y, x] = 255
    np.testing.assert_array_equal(m, ref)
    assert (load_mask(out / f"{written[1]}.png", 81) == 0).all()
    # read back through COCODataset
    img_dir = tmp_path / "coco" / "JPEGImages" / "train2014"
    img_dir.mkdir(parents=True)
    for n in written:
        Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(img_dir / f"{n}.jpg")
    ds = COCODataset(tmp_path / "coco", "train")
    assert ds.num_classes == 81 and ds.class_names[1] == "person" and len(ds) == 2
    assert ds.labels[0].nonzero()[0].tolist() == [0, 2] and ds.labels[1].sum() == 0
    assert torch.equal(ds[0]["mask"], torch.from_numpy(ref))


# ------------------------------------------------------------------------ build and loader


def test_build_and_loader_reproducible(tmp_path):
    _make_voc(tmp_path, n=6, size=(20, 18))
    cfg = {"type": "voc", "root": str(tmp_path), "crop_size": 16, "splits": {"train": "train_aug"}}
    ds = build_dataset(cfg, "train", train=True)
    assert isinstance(ds.transform, TrainTransform) and len(ds) == 6

    def run(workers, seed):
        loader = build_loader(ds, 2, train=True, num_workers=workers, seed=seed)
        return [b for _ in range(2) for b in loader]

    a, b, c = run(0, 1), run(2, 1), run(0, 2)
    assert len(a) == 6 and a[0]["image"].shape == (2, 3, 16, 16) and a[0]["img_box"].shape == (2, 4)
    for x, y in zip(a, b):  # independent of the number of workers
        assert x["name"] == y["name"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(a, c))
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(a[:3], a[3:]))  # epochs differ
    # two ranks draw different augmentation and disjoint shards
    r0 = list(build_loader(ds, 1, True, seed=1, distributed=True, rank=0, world_size=2))
    r1 = list(build_loader(ds, 1, True, seed=1, distributed=True, rank=1, world_size=2))
    assert not {b["name"][0] for b in r0} & {b["name"][0] for b in r1}

    ev = build_dataset(cfg, "val", train=False)
    batches = list(build_loader(ev, 2, train=False))
    assert [n for b in batches for n in b["name"]] == ev.names


def test_build_reads_null_as_its_documented_meaning(tmp_path):
    """``data.mask_dir: null`` is "no masks" and ``data.crop_size: null`` the full image, as documented;
    a key left out takes its default (masks found automatically, a 512 crop)."""
    names, _ = _make_voc(tmp_path, n=6, size=(20, 18))
    lf = tmp_path / "labels.json"
    lf.write_text(json.dumps({n: [15] for n in names}))
    base = {"type": "voc", "root": str(tmp_path), "splits": {"train": "train_aug"}, "labels_file": str(lf)}
    assert build_dataset(base, "train", train=True).mask_dir.name == "SegmentationClassAug"
    assert build_dataset({**base, "mask_dir": None}, "train", train=True).mask_dir is None
    assert build_transform(base, train=True).crop_size == 512
    full = build_transform({"crop_size": None, "scale_range": "none"}, train=True)
    _, mask, _ = full(np.zeros((20, 18, 3), np.uint8), None, np.random.default_rng(0))
    assert full.crop_size is None and mask.shape == (20, 18)


def test_collate_pads_different_sizes():
    s1 = {"image": torch.ones(3, 4, 5), "labels": torch.tensor([1.0, 0.0]), "mask": torch.zeros(4, 5).long(),
          "img_box": torch.tensor([0, 4, 0, 5]), "name": "a", "size": torch.tensor([4, 5])}  # fmt: skip
    s2 = {"image": torch.ones(3, 6, 3), "labels": torch.tensor([0.0, 1.0]), "mask": torch.ones(6, 3).long(),
          "img_box": torch.tensor([0, 6, 0, 3]), "name": "b", "size": torch.tensor([6, 3])}  # fmt: skip
    b = collate([s1, s2])
    assert b["image"].shape == (2, 3, 6, 5) and b["mask"].shape == (2, 6, 5)
    assert b["mask"][0, 4:].eq(255).all() and b["mask"][1, :, 3:].eq(255).all()
    assert b["image"][0, :, 4:].eq(0).all() and b["name"] == ["a", "b"]
    assert b["img_box"].tolist() == [[0, 4, 0, 5], [0, 6, 0, 3]]


def test_voc_label_cache_dir(tmp_path):
    root = tmp_path / "voc"
    names, _ = _make_voc(root)
    ds = VOCDataset(root, "train", cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").glob("*cls_labels_SegmentationClass.json"))
    assert len(files) == 1 and set(json.loads(files[0].read_text())) == set(names[:4])
    assert not (root / "cls_labels_SegmentationClass.json").exists() and len(ds) == 4
