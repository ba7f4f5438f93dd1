"""Prediction on users' own photos: no attention kept, --max-size, outputs that never overwrite inputs or
each other, per-image failures, API inputs (paths, EXIF, bad values), devices, full or read-only disks."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss import cli
from wsss.api.predictor import Segmenter
from wsss.commands.predict import output_stems, run_predict
from wsss.config import load_config, to_dict
from wsss.data.io import load_mask
from wsss.data.synthetic import class_names_for
from wsss.engine.checkpoint import export_model
from wsss.engine.distributed import resolve_device
from wsss.methods import build_network


def _release(root: Path, config: str) -> Path:
    cfg = load_config(config, ["cam.scales=[1.0]"])
    torch.manual_seed(0)
    c = int(cfg.data.num_classes or 6)  # null: the synthetic root's 5 classes + background
    net = build_network(cfg, c - 1)
    meta = {"config": to_dict(cfg), "num_classes": c, "class_names": class_names_for(c)}
    return export_model(net, meta, root / config / "model")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict_models")
    return {m: _release(root, f"{m}_mit_tiny_synthetic") for m in ("afa", "cam")}


def _photo(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_prediction_computes_no_attention_and_max_size_maps_back(models: dict, monkeypatch) -> None:
    seg = Segmenter.from_pretrained(models["afa"], device="cpu")
    seen: list[tuple[list[int], tuple[int, int]]] = []
    bb = seg.net.backbone
    original = bb.forward_features

    def spy(x, attn_layers=(), attn_reduce=None):  # noqa: ANN001
        seen.append((list(attn_layers), tuple(x.shape[-2:])))
        return original(x, attn_layers, attn_reduce)

    monkeypatch.setattr(bb, "forward_features", spy)
    image = np.random.default_rng(0).integers(0, 256, (90, 200, 3), dtype=np.uint8)
    full = seg.predict(image)
    assert seen and all(layers == [] for layers, _ in seen)  # the AFA head's layers are never captured
    seen.clear()
    small = seg.predict(image, max_size=100)
    assert max(max(hw) for _, hw in seen) <= 112  # 100 px long side, padded to a multiple of 16
    assert small.mask.shape == full.mask.shape == (90, 200)
    assert small.cams.shape == (5, 90, 200) and small.image.shape == (90, 200, 3)


def test_outputs_never_collide_or_overwrite_inputs(models: dict, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _photo(a / "x.jpg", 40, 50, 1)
    _photo(b / "x.jpg", 30, 60, 2)
    _photo(a / "y.png", 20, 20, 3)
    _photo(a / "y.jpg", 24, 20, 4)  # same stem, other extension
    out = tmp_path / "out"
    assert run_predict(models["cam"], [a, b], out, device="cpu", progress=False) == 0
    stems = {p.relative_to(out).as_posix() for p in out.rglob("*.json")}
    assert stems == {"a/x.json", "b/x.json", "a/y_png.json", "a/y_jpg.json"}
    assert load_mask(out / "b" / "x.png", 256).shape == (30, 60)
    assert json.loads((out / "a" / "x.json").read_text())["image"] == str(a / "x.jpg")
    assert len(output_stems([a, a / "x.jpg"], out)) == 3  # a file given twice is predicted once
    before = {p: p.read_bytes() for p in a.iterdir()}
    with pytest.raises(ValueError, match="input folder"):
        run_predict(models["cam"], [a], a, device="cpu")
    png_in = _photo(tmp_path / "c" / "p.png", 20, 20)
    with pytest.raises(ValueError, match="would replace the input image"):
        run_predict(models["cam"], [png_in.parent / "p.png"], png_in.parent.parent / "c", device="cpu")
    assert {p: p.read_bytes() for p in a.iterdir()} == before


def test_each_failure_names_its_file_and_the_batch_goes_on(models: dict, tmp_path: Path, capsys) -> None:
    imgs = tmp_path / "imgs"
    _photo(imgs / "tiny.png", 1, 1)
    _photo(imgs / "strip.png", 16, 400)
    _photo(imgs / "ok.png", 40, 40)
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    code = cli.main(["predict", "--checkpoint", str(models["cam"]), str(imgs), "--out", str(out),
                     "--device", "cpu"])
    assert code == 1  # some failed
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "Traceback" not in err
    for stem, shape in (("tiny", (1, 1)), ("strip", (16, 400)), ("ok", (40, 40))):
        assert load_mask(out / f"{stem}.png", 256).shape == shape


def test_api_accepts_paths_applies_exif_rejects_bad_values(models: dict, tmp_path: Path) -> None:
    seg = Segmenter.from_pretrained(models["cam"], device="cpu")
    arr = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.fromarray(arr).save(path, exif=exif, quality=100)
    by_path = seg.predict(str(path))
    assert by_path.mask.shape == (50, 30)  # displayed orientation, as `wsss predict` gives
    with Image.open(path) as im:
        assert seg.predict(im).mask.shape == (50, 30)
    np.testing.assert_array_equal(seg.predict(path).mask, by_path.mask)
    x = torch.rand(3, 20, 20)
    with pytest.raises(ValueError, match="NaN or infinite"):
        seg.predict(torch.full((3, 20, 20), float("nan")))
    with pytest.raises(ValueError, match=r"\[0, 1\].*0\.\.255"):
        seg.predict(x * 255)
    with pytest.raises(ValueError, match="NaN or infinite"):
        seg.predict(np.full((20, 20, 3), np.inf, dtype=np.float32))


def test_present_agrees_with_scores(models: dict) -> None:
    seg = Segmenter.from_pretrained(models["afa"], device="cpu")
    bias = torch.tensor([4.0, -4.0, 4.0, -4.0, -4.0])  # classes 1 and 3 scored present, others absent
    head = seg.net.cam_head.classifier
    head.weight.data.zero_()
    if head.bias is None:
        head.bias = torch.nn.Parameter(bias)
    else:
        head.bias.data.copy_(bias)
    seg.net.seg_head.linear_pred.bias.data[:] = torch.arange(6.0) * 10  # the seg head prefers class 5
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    pred = seg.predict(image, gate=True)  # the mask over the classes the classifier predicts
    above = {n for n, s in zip(seg.class_names[1:], pred.scores.tolist()) if s > 0.5}
    assert above == {seg.class_names[1], seg.class_names[3]}
    assert set(pred.present()) - {"background"} <= above and pred.present()
    free = seg.predict(image)  # default: the seg head's argmax over all classes, the scores beside it
    assert free.present() == [seg.class_names[5]] and free.to_json()["objects"] == [seg.class_names[5]]
    np.testing.assert_array_equal(free.scores, pred.scores)


def test_device_errors_are_one_line(models: dict, tmp_path: Path, capsys) -> None:
    _photo(tmp_path / "p.png", 20, 20)
    for dev, what in (("cdua", "unknown device 'cdua'"), ("cuda:7", "not available")):
        if dev == "cuda:7" and torch.cuda.device_count() > 7:
            continue
        with pytest.raises(ValueError, match=what):
            resolve_device(dev)
        code = cli.main(["predict", "--checkpoint", str(models["cam"]), str(tmp_path / "p.png"), "--out",
                         str(tmp_path / "o"), "--device", dev])
        err = capsys.readouterr().err
        assert code == 2 and what in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()  # refused before any output


def test_out_file_read_only_and_full_disk(models: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    img = _photo(tmp_path / "in" / "p.png", 20, 20)
    _photo(tmp_path / "in" / "q.png", 20, 20, 1)
    base = ["predict", "--checkpoint", str(models["cam"]), str(img.parent), "--device", "cpu", "--out"]
    (tmp_path / "file").write_text("x")
    assert cli.main([*base, str(tmp_path / "file")]) == 2
    assert "is an existing file" in capsys.readouterr().err

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p).name == "ro" else real_access(p, m))
    (tmp_path / "ro").mkdir()
    assert cli.main([*base, str(tmp_path / "ro")]) == 1
    err = capsys.readouterr().err
    assert "permission denied" in err and "ro" in err and "Traceback" not in err
    monkeypatch.undo()

    calls = {"n": 0}

    def write_text(self, data, *a, **k):  # noqa: ANN001, ANN002, ANN003
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "full"
    code = cli.main([*base, str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "disk is full" in err and "Traceback" not in err and calls["n"] == 1
    assert [p.name for p in out.iterdir()] == []  # no mask without its overlay and JSON, no temp file


def test_batching_by_size_gives_the_same_outputs(models: dict, tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    for i, (h, w) in enumerate([(40, 40), (40, 40), (40, 40), (32, 48), (40, 40)]):
        _photo(imgs / f"p{i}.png", h, w, i)
    (imgs / "p2b.png").write_bytes(b"broken")  # sorted between p2 and p3: breaks a group
    one, three = tmp_path / "one", tmp_path / "three"
    assert run_predict(models["cam"], [imgs], one, device="cpu", progress=False) == 1
    assert run_predict(models["cam"], [imgs], three, device="cpu", progress=False, batch_size=3) == 1
    for i in range(5):
        np.testing.assert_array_equal(load_mask(one / f"p{i}.png", 256), load_mask(three / f"p{i}.png", 256))
        a, b = (json.loads((d / f"p{i}.json").read_text()) for d in (one, three))
        assert a["present"] == b["present"]
        np.testing.assert_allclose(list(a["scores"].values()), list(b["scores"].values()), atol=1e-5)
    assert not (three / "p2b.png").exists()
