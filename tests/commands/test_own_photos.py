"""Your own photographs end to end (issue 21): negatives (photos without any object), a held-out
split of a folder dataset, runs that start clean, thresholds calibrated on a few masks, predict's
masks from the segmentation head, and the class list carried by the labels file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_overrides
from wsss.config import load_config
from wsss.data.io import DataError
from wsss.engine.train import train
from wsss.methods import build_method, build_network

METHOD_CONFIGS = ["cam_mit_tiny_synthetic", "afa_mit_tiny_synthetic", "aream_mit_tiny_synthetic",
                  "toco_vit_micro_synthetic"]


def _tiny(config: str, *extra: str):
    """A 6-class (5 + background) untrained network of ``config`` and its method, in eval mode."""
    over = ["data.num_classes=6", "par.num_iter=2", *extra]
    if "vit" in config:
        over.append("model.backbone_kwargs.img_size=64")
    cfg = load_config(config, over)
    torch.manual_seed(0)
    net = build_network(cfg, 5).eval()
    return cfg, net, build_method(cfg, net)


def _samples(labels: list[list[float]], size: tuple[int, int] = (64, 64)) -> list[dict]:
    """Evaluation samples (as a dataset yields them) with these image labels; a negative's mask is
    all background, a positive's has its first class in the centre."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i, lab in enumerate(labels):
        h, w = size
        mask = torch.zeros(h, w, dtype=torch.long)
        if any(lab):
            mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1 + lab.index(1.0)
        out.append({"image": torch.rand(3, h, w, generator=g), "labels": torch.tensor(lab), "mask": mask,
                    "img_box": torch.tensor([0, h, 0, w]), "size": torch.tensor([h, w]), "name": f"im{i}"})
    return out


@pytest.mark.parametrize("config", METHOD_CONFIGS)
def test_negative_alone_in_a_batch_is_all_background(config: str) -> None:
    """Problem 1: a photo without objects alone in its batch (batch_size 1) no longer stops the
    evaluation with an empty-tensor error: every map of it is background, the sweep runs, and a
    batch of a negative and a positive gives the negative the same maps as alone."""
    from wsss.engine.evaluate import evaluate, predict_maps

    _, net, method = _tiny(config)
    data = _samples([[0.0] * 5, [1.0, 0, 0, 0, 0], [0.0] * 5])
    res = evaluate(method, net, data, 6, torch.device("cpu"), scales=[1.0, 0.5], flip=True, sweep=True,
                   batch_size=1)
    assert set(method.map_names(net)) <= set(res) and "_sweep" in res
    image, labels = torch.stack([d["image"] for d in data]), torch.stack([d["labels"] for d in data])
    alone = predict_maps(method, net, image[:1], labels[:1], [1.0], True)
    mixed = predict_maps(method, net, image[:2], labels[:2], [1.0], True)
    for name, pred in alone.items():
        if name != "seg":
            assert int(pred.max()) == 0, name
            assert torch.equal(mixed[name][0], pred[0]), name


def folder_set(tmp: Path, num_train: int = 8, num_val: int = 3) -> dict:
    """A synthetic set as your own photos: the images folder, the mask folder and labels CSVs
    ``train.csv`` / ``val.csv`` / ``all.csv`` (``name,labels`` with ``a;b``) built from the masks."""
    from wsss.data.synthetic import class_names_for, generate_synthetic

    root = generate_synthetic(tmp / "synthetic", num_train=num_train, num_val=num_val, size=64, num_classes=6)
    names = class_names_for(6)
    masks = root / "SegmentationClass"
    rows = {}
    for split in ("train", "val"):
        stems = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        lines = []
        for s in stems:
            ids = sorted({int(v) for v in np.unique(np.asarray(Image.open(masks / f"{s}.png")))} - {0, 255})
            lines.append(f"{s},{';'.join(names[i] for i in ids)}")
        rows[split] = lines
        (tmp / f"{split}.csv").write_text("name,labels\n" + "\n".join(lines) + "\n")
    (tmp / "all.csv").write_text("name,labels\n" + "\n".join(rows["train"] + rows["val"]) + "\n")
    return {"images": root / "JPEGImages", "masks": masks, "names": names, "train": tmp / "train.csv",
            "val": tmp / "val.csv", "all": tmp / "all.csv"}


def folder_overrides(fs: dict, out_dir: Path, labels: Path | None = None, **extra: object) -> list[str]:
    """Tiny-training overrides of a folder dataset over :func:`folder_set`'s files."""
    base = {"data.type": "folder", "data.image_dir": fs["images"], "data.mask_dir": fs["masks"],
            "data.labels_file": labels or fs["train"], "data.val_labels_file": fs["val"],
            "data.class_names": "[" + ",".join(fs["names"][1:]) + "]", "data.num_classes": 6}
    base.update(extra)
    over = tiny_overrides(fs["images"], out_dir, **base)
    drop = ("data.root=", "data.num_train", "data.num_val", "data.val_labels_file=None")
    return [o for o in over if not o.startswith(drop)]


def _corrupt(mask: Path) -> bytes:
    """Write a value beyond the classes into ``mask`` (a PNG); returns the original bytes."""
    before = mask.read_bytes()
    arr = np.asarray(Image.open(mask)).copy()
    arr[0, 0] = 9
    Image.fromarray(arr.astype(np.uint8)).save(mask)
    return before


@pytest.mark.parametrize("split", ["train", "val"])
def test_failed_start_leaves_no_run(tmp_path: Path, split: str) -> None:
    """Problem 3: a mask value outside the classes is a clear error naming the file, and the folder
    holds no run afterwards (a val mask is found before anything is written, a train mask before the
    first checkpoint), so the corrected command runs without --overwrite."""
    fs = folder_set(tmp_path)
    stem = (fs[split].read_text().splitlines()[1]).split(",")[0]
    mask = fs["masks"] / f"{stem}.png"
    before = _corrupt(mask)
    out = tmp_path / "run"
    # 4 iterations of 2 read all 8 training images; the only checkpoint is the last one
    over = folder_overrides(fs, out, **{"train.max_iters": 4, "train.ckpt_every": 100, "eval.max_images": 2})
    cfg = load_config("cam_mit_tiny_synthetic", over)
    with pytest.raises(DataError, match=stem):
        train(cfg)
    assert not out.exists()
    mask.write_bytes(before)
    res = train(cfg)
    assert "cam" in res and (out / "model").is_dir()


@pytest.fixture(scope="module")
def seg_release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A synthetic set and an untrained CAM + seg-head model whose classifier says 0.5 for every class
    (an under-confident classifier: nothing passes a 0.5 gate), exported as a release."""
    from wsss.config import to_dict
    from wsss.data.synthetic import class_names_for, generate_synthetic
    from wsss.engine.checkpoint import export_model

    root = tmp_path_factory.mktemp("seg_release")
    data = generate_synthetic(root / "data", num_train=4, num_val=3, size=64, num_classes=6)
    over = [f"data.root={data}", "data.num_train=4", "data.num_val=3", "data.size=64", "data.num_classes=6",
            "par.num_iter=2"]
    cfg = load_config("cam_mit_tiny_synthetic", over)
    torch.manual_seed(0)
    net = build_network(cfg, 5)
    with torch.no_grad():
        net.cam_head.classifier.weight.zero_()
    meta = {"config": to_dict(cfg), "num_classes": 6, "class_names": class_names_for(6)}
    export_model(net, meta, root / "run" / "model")
    return {"root": root, "data": data, "over": over, "release": root / "run" / "model", "cfg": cfg}


def test_predict_mask_is_evaluate_seg_map(seg_release: dict, tmp_path: Path) -> None:
    """Problem 5: with a seg head, `wsss predict` on a split's images writes exactly the label maps of
    evaluate's 'seg' map (its argmax over all classes, whatever the classifier says), and those masks
    scored against the ground truth give evaluate's seg mIoU; --gate keeps the old classifier gate."""
    from wsss.commands.evaluate import run_evaluate
    from wsss.commands.predict import run_predict
    from wsss.data.build import build_dataset
    from wsss.engine.evaluate import predict_maps
    from wsss.engine.metrics import ConfusionMatrix
    from wsss.engine.runs import open_run

    scales, data = [1.0, 0.5], seg_release["data"]
    stems = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    photos = tmp_path / "photos"
    photos.mkdir()
    for s in stems:
        (photos / f"{s}.jpg").write_bytes((data / "JPEGImages" / f"{s}.jpg").read_bytes())
    assert run_predict(seg_release["release"], [photos], tmp_path / "pred", scales=scales, flip=True) == 0
    res = run_evaluate(None, seg_release["release"], seg_release["over"], split="val",
                       out=tmp_path / "e.json", scales=scales, flip=True, maps=["seg"], print_table=False)
    cfg, net, method, _, dev = open_run(None, seg_release["release"], seg_release["over"], None)
    dataset = build_dataset(cfg.data, split="val", train=False)
    cm = ConfusionMatrix(6)
    for i, stem in enumerate(dataset.names):
        sample = dataset[i]
        want = predict_maps(method, net, sample["image"][None], sample["labels"][None], scales, True,
                            maps=["seg"], msc_seg=True)["seg"][0]
        got = torch.from_numpy(np.asarray(Image.open(tmp_path / "pred" / f"{stem}.png")).astype(np.int64))
        assert torch.equal(got, want), stem
        cm.update(got[None], sample["mask"][None])
        info = json.loads((tmp_path / "pred" / f"{stem}.json").read_text())
        assert info["mask"]["classes"] == "all" and set(info["scores"]) == set(dataset.class_names[1:])
    assert max(int(np.asarray(Image.open(tmp_path / "pred" / f"{s}.png")).max()) for s in stems) > 0
    assert cm.compute()["miou"] == pytest.approx(res["seg"]["miou"], abs=1e-12)
    assert run_predict(seg_release["release"], [photos], tmp_path / "gated", gate=True) == 0
    gated = [np.asarray(Image.open(tmp_path / "gated" / f"{s}.png")) for s in stems]
    assert all(int(g.max()) == 0 for g in gated)  # nothing passes the 0.5 gate: background only


def test_folder_val_fraction_holds_images_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Problem 2: one labels file and no val split: the final table says that it scores the training
    images; with data.val_fraction a fixed, seeded part is held out (disjoint from the training
    images, recorded in split.json, the same part for `wsss evaluate` on the run). Also: a class in
    fewer than 5 training images is named before training, and the per-class IoU is printed by name."""
    from wsss.commands.evaluate import run_evaluate
    from wsss.data.build import build_dataset

    fs = folder_set(tmp_path)
    one = folder_overrides(fs, tmp_path / "one", labels=fs["all"], **{"data.val_labels_file": None})
    train(load_config("cam_mit_tiny_synthetic", one))
    out = capsys.readouterr()
    assert "the TRAINING images" in out.out and "fewer than 5 training images" in out.err
    assert "per-class IoU (seg): background" in out.out and fs["names"][1] in out.out
    held = folder_overrides(fs, tmp_path / "held", labels=fs["all"],
                            **{"data.val_labels_file": None, "data.val_fraction": 0.25,
                               "eval.max_images": "null"})
    cfg = load_config("cam_mit_tiny_synthetic", held)
    res = train(cfg)
    assert "held out of the labels file by data.val_fraction=0.25" in capsys.readouterr().out
    split = json.loads((tmp_path / "held" / "split.json").read_text())
    assert len(split["val"]) == 3 and len(split["train"]) == 8 and not set(split["val"]) & set(split["train"])
    val = build_dataset(cfg.data, split=str(cfg.data.val_split), train=False)
    assert val.names == split["val"] and res["_protocol"]["images"] == 3
    ev = run_evaluate(None, tmp_path / "held" / "model", [], out=tmp_path / "e.json")
    assert ev["_protocol"]["images"] == 3 and ev["cam"]["miou"] == pytest.approx(res["cam"]["miou"], abs=1e-9)
    # each class's most frequent mistake in the method's pseudo label, by name
    printed = capsys.readouterr().out
    assert "most frequent mistake per class (cam_par):" in printed
    table = printed.split("most frequent mistake per class (cam_par):")[1]
    for c, name in enumerate(fs["names"]):
        other, share = ev["cam_par"]["mistaken_for"][c], ev["cam_par"]["mistaken_share"][c]
        if share is None:  # no ground-truth pixel of the class: no row
            assert f"| {name} |" not in table
            continue
        wrong = "-" if other is None else fs["names"][other]
        assert f"| {name} | {100 * ev['cam_par']['iou'][c]:.2f} | {wrong} | {100 * share:.1f}% |" in table
    both = load_config("cam_mit_tiny_synthetic", held + [f"data.val_labels_file={fs['val']}"])
    with pytest.raises(DataError, match="not both"):
        build_dataset(both.data, split="val", train=False)


def test_calibrate_writes_thresholds_that_commands_use(tmp_path: Path) -> None:
    """Problem 4: `wsss calibrate` sweeps the CAM's background score, the pseudo label's high / low and
    (no seg head) the classifier's presence threshold on the images with masks, writes them with the
    images used into the run, and evaluate, pseudo-labels and predict use them from then on (a
    command-line override still wins); --masks takes a folder of a few masks."""
    from wsss.commands.calibrate import run_calibrate
    from wsss.commands.evaluate import run_evaluate
    from wsss.commands.predict import run_predict
    from wsss.commands.pseudo_labels import run_pseudo_labels
    from wsss.config import to_dict
    from wsss.data.synthetic import class_names_for, generate_synthetic
    from wsss.engine.checkpoint import export_model

    data = generate_synthetic(tmp_path / "data", num_train=4, num_val=3, size=64, num_classes=6)
    over = [f"data.root={data}", "data.num_train=4", "data.num_val=3", "data.size=64", "data.num_classes=6",
            "par.num_iter=2", "model.seg_head.enabled=false", "cam.scales=[1.0]"]
    cfg = load_config("cam_mit_tiny_synthetic", over)
    torch.manual_seed(0)
    net = build_network(cfg, 5)
    release = tmp_path / "run" / "model"
    export_model(net, {"config": to_dict(cfg), "num_classes": 6, "class_names": class_names_for(6)}, release)
    grid = [0.1, 0.3, 0.5, 0.7, 0.9]
    rec = run_calibrate(release, split="val", max_images=2, grid=grid, verbose=False)
    stored = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert stored["values"] == rec["values"] and len(stored["images"]) == 2
    v = rec["values"]
    assert set(v) == {"eval.bkg_score", "cam.high", "cam.low", "eval.presence", "eval.presence_per_class"}
    assert v["eval.bkg_score"] in grid and v["cam.high"] - v["cam.low"] == pytest.approx(0.2)
    assert rec["maps"]["cam"]["best_miou"] == max(rec["maps"]["cam"]["miou"])
    ev = run_evaluate(None, release, [], split="val", out=tmp_path / "e.json", max_images=2,
                      print_table=False)
    assert ev["_protocol"]["bkg_score"] == v["eval.bkg_score"]
    assert ev["_protocol"]["calibration"]["values"] == v
    # cam and cam_par share eval.bkg_score: the PAR-refined map's choice is kept
    assert v["eval.bkg_score"] == rec["maps"]["cam_par"]["best"]
    assert ev["cam_par"]["miou"] == pytest.approx(rec["maps"]["cam_par"]["best_miou"], abs=1e-9)
    pinned = run_evaluate(None, release, ["eval.bkg_score=0.3"], split="val", out=tmp_path / "p.json",
                          max_images=2, print_table=False)
    assert pinned["_protocol"]["bkg_score"] == 0.3
    s = run_pseudo_labels(None, release, [], "val", tmp_path / "pl", map_name="pseudo", verbose=False)
    assert (s["high"], s["low"]) == (v["cam.high"], v["cam.low"])
    photo = data / "JPEGImages" / f"{stored['images'][0]}.jpg"
    assert run_predict(release, [photo], tmp_path / "pred") == 0
    info = json.loads((tmp_path / "pred" / f"{photo.stem}.json").read_text())["mask"]
    assert info["bkg_score"] == v["eval.bkg_score"]
    per = v["eval.presence_per_class"]
    assert info["presence"] == (per[0] if len(set(per)) == 1 else dict(zip(class_names_for(6)[1:], per)))
    masks = tmp_path / "few"
    masks.mkdir()
    (masks / photo.with_suffix(".png").name).write_bytes(
        (data / "SegmentationClass" / f"{photo.stem}.png").read_bytes())
    few = run_calibrate(release, masks=str(masks), maps=["cam"], grid=grid, verbose=False)
    assert few["images"] == [photo.stem] and set(few["maps"]) == {"cam"}
    with pytest.raises(ValueError, match="choose from cam, cam_par, pseudo"):
        run_calibrate(release, maps=["aff"], verbose=False)


def _with_class_line(csv: Path, out: Path, classes: list[str]) -> Path:
    """``csv`` with a first line ``#classes: a;b`` written to ``out``."""
    out.write_text(f"#classes: {';'.join(classes)}\n" + csv.read_text())
    return out


def test_labels_file_carries_its_classes(tmp_path: Path) -> None:
    """Problem 6: a labels CSV with names and a mask folder with indices needs no data.class_names when
    the CSV's first line (``#classes:``, background implied) or a ``classes.txt`` beside it lists the
    classes in the masks' order, ids-only rows included; a list that differs from data.class_names, or
    the two lists that differ, are an error naming both."""
    from wsss.data.folder import FolderDataset
    from wsss.data.labels_file import read_labels_file

    fs = folder_set(tmp_path)
    names = fs["names"]
    order = ["zebra", "cow", "yak", "ant", "dog"]  # mask index i is order[i - 1]; sorted, they would not be
    rename = dict(zip(names[1:], order))
    rows = fs["train"].read_text().splitlines()
    cells = [(r.split(",")[0], [t for t in r.split(",")[1].split(";") if t]) for r in rows[1:]]
    named = [f"{n},{';'.join(rename[t] for t in ts)}" for n, ts in cells]
    ids = [f"{n},{';'.join(str(names.index(t)) for t in ts)}" for n, ts in cells]
    csv = tmp_path / "named.csv"
    csv.write_text(f"#classes: background;{';'.join(order)}\nname,labels\n" + "\n".join(named) + "\n")
    (tmp_path / "ids").mkdir()
    (tmp_path / "ids" / "labels.csv").write_text("name,labels\n" + "\n".join(ids) + "\n")
    (tmp_path / "ids" / "classes.txt").write_text("\n".join(order) + "\n")
    for f in (csv, tmp_path / "ids" / "labels.csv"):
        ds = FolderDataset(fs["images"], f, mask_dir=fs["masks"])
        assert list(ds.class_names) == ["background", *order]
        for i in range(len(ds)):  # the image labels name the classes of the masks' indices
            mask = ds[i]["mask"]
            present = sorted(set(mask[mask != 255].tolist()) - {0})
            assert [c + 1 for c in ds[i]["labels"].nonzero().flatten().tolist()] == present
    with pytest.raises(DataError, match=r"named\.csv \(#classes: line\) lists the classes.*class_names"):
        FolderDataset(fs["images"], csv, class_names=names[1:])
    assert FolderDataset(fs["images"], csv, class_names=order).num_classes == 6
    (tmp_path / "classes.txt").write_text("\n".join(sorted(order)) + "\n")
    with pytest.raises(DataError, match=r"named\.csv \(#classes: line\) lists .* but .*classes\.txt lists"):
        read_labels_file(csv, None)
    bad = _with_class_line(fs["train"], tmp_path / "twice.csv", [*names[1:], names[1]])
    with pytest.raises(DataError, match=r"twice\.csv.*more than once"):
        FolderDataset(fs["images"], bad)


def test_class_list_travels_to_runs_and_pseudo_labels(tmp_path: Path) -> None:
    """Problem 6: a run trained from a labels CSV that carries its classes keeps the list (config.yaml,
    the release's config.json), `wsss pseudo-labels` writes it as class_names.json before any label, and
    a second stage reading those labels with other classes is an error naming both lists."""
    from omegaconf import OmegaConf

    from wsss.commands.pseudo_labels import run_pseudo_labels
    from wsss.data.build import build_dataset

    fs = folder_set(tmp_path)
    names = fs["names"]
    order = [names[i] for i in (3, 1, 5, 2, 4)]
    _with_class_line(fs["train"], fs["train"], order)
    _with_class_line(fs["val"], fs["val"], order)
    over = folder_overrides(fs, tmp_path / "run", **{"data.class_names": "null", "data.num_classes": "null"})
    train(load_config("cam_mit_tiny_synthetic", over))
    run = tmp_path / "run"
    assert list(OmegaConf.load(run / "config.yaml").data.class_names) == ["background", *order]
    assert json.loads((run / "model" / "config.json").read_text())["class_names"] == ["background", *order]
    pl = tmp_path / "pl"
    run_pseudo_labels(None, run / "model", [], "train", pl, map_name="cam", max_images=2, verbose=False)
    assert json.loads((pl / "class_names.json").read_text()) == ["background", *order]
    (pl / "summary.json").unlink()  # as after an interrupted run: the list is there before any label
    second = load_config("cam_mit_tiny_synthetic", over + [f"data.pseudo_dir={pl}", "eval.max_images=null"])
    other = load_config("cam_mit_tiny_synthetic", over + [f"data.pseudo_dir={pl}",
                                                          f"data.labels_file={fs['all']}",
                                                          f"data.class_names=[{','.join(names[1:])}]"])
    with pytest.raises(DataError, match=r"class_names\.json gives the pseudo labels 6 classes.*has 6"):
        build_dataset(other.data, split="train", train=True)
    with pytest.raises(DataError, match="pseudo-label PNGs missing"):  # same classes: on to the PNGs
        build_dataset(second.data, split="train", train=True)


def test_evaluate_sweep_names_calibrate(seg_release: dict, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """Problem 4: `wsss evaluate --sweep` (once AReAM's background sweep) and eval.sweep=true stop with
    one line that names `wsss calibrate`, before any output is written."""
    from wsss.cli import main

    out = tmp_path / "e.json"
    for extra in (["--sweep"], ["eval.sweep=true"]):
        assert main(["evaluate", "--checkpoint", str(seg_release["release"]), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "wsss calibrate --checkpoint" in err and extra[0].split("=")[0] in err, err
        assert not out.exists()


def test_analyze_affinity_on_negatives_alone() -> None:
    """Problem 1 in `wsss analyze`: on images without any object (batches of negatives alone) the
    affinity check runs, and the mean affinity of different-class pairs, which do not exist there, is
    None and said so, not a 0 that reads as a perfect separation."""
    from wsss.analysis.analyze import oracle_summary
    from wsss.analysis.oracle import oracle_quality

    _, net, method = _tiny("afa_mit_tiny_synthetic")
    q = oracle_quality(method, net, _samples([[0.0] * 5, [0.0] * 5]), 6)
    assert q["pairs"]["mean_different_class"] is None and q["pairs"]["pairs"] > 0
    assert q["miou"]["cam_par"] == 1.0 and "no different-class pairs" in oracle_summary(q)
    mixed = oracle_quality(method, net, _samples([[0.0] * 5, [1.0, 0, 0, 0, 0]]), 6)
    assert 0.0 <= mixed["pairs"]["mean_different_class"] <= 1.0


def test_predict_mixed_sizes_orientations_and_an_empty_photo(seg_release: dict, tmp_path: Path) -> None:
    """Also-item of issue 21: a folder of photos of mixed sizes, one stored sideways with an EXIF
    rotation and one of a flat wall (none of the classes), predicted in batches of 3: every mask and
    overlay has the displayed size, and with the classifier gate (which passes nothing here) every
    mask is background and every JSON says that no object is present."""
    from wsss.commands.predict import run_predict

    photos = tmp_path / "photos"
    photos.mkdir()
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(photos / "wide.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 x 72 (h x w), shown rotated: 72 x 40
    Image.fromarray(g.integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(photos / "tall.jpg", exif=exif)
    Image.fromarray(g.integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(photos / "same.png")
    Image.fromarray(np.full((30, 50, 3), 128, dtype=np.uint8)).save(photos / "wall.png")
    shown = {"wide": (48, 80), "tall": (72, 40), "same": (40, 72), "wall": (30, 50)}
    for gate, out in ((False, tmp_path / "pred"), (True, tmp_path / "gated")):
        assert run_predict(seg_release["release"], [photos], out, batch_size=3, gate=gate) == 0
        for stem, size in shown.items():
            mask = np.asarray(Image.open(out / f"{stem}.png"))
            assert mask.shape == size and Image.open(out / f"{stem}_overlay.png").size == size[::-1], stem
            info = json.loads((out / f"{stem}.json").read_text())
            assert len(info["scores"]) == 5, stem
            if gate:
                assert int(mask.max()) == 0 and info["objects"] == [] and info["present"] == ["background"]
