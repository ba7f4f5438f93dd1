"""Bad input caught before work starts: labels files (unknown names, malformed rows, quotes, encodings,
tabs) and config values (type and range of every key, method options included)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss import cli
from wsss.config import DEFAULTS, load_config
from wsss.data.folder import FolderDataset
from wsss.data.io import DataError
from wsss.data.labels_file import read_labels_file

CLASSES = ["cat", "dog", "person"]


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(d / f"im{i}.jpg")
    return d


def _csv(tmp_path: Path, text: str | bytes, name: str = "labels.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def test_unknown_class_name_names_file_and_line(images: Path, tmp_path: Path) -> None:
    f = _csv(tmp_path, "name,labels\nim0,cat\nim1,dgo;person\nim2,dog\n")
    with pytest.raises(DataError, match=r"labels\.csv, line 3: image 'im1' has unknown class name 'dgo' "
                                        r"\(did you mean 'dog'\?\)"):
        FolderDataset(images, f, class_names=CLASSES)
    ok = FolderDataset(images, _csv(tmp_path, "im0,cat\nim1,dog\nim2,\n", "ok.csv"), class_names=CLASSES)
    assert list(ok.class_names) == ["background", *CLASSES]  # fixed by class_names, not by the file


def test_malformed_rows_and_quotes(images: Path, tmp_path: Path) -> None:
    cases = {
        'im0,cat\nim1,"dog;person\nim2,dog\n': r"line 2: .*quote",
        "im0,cat\nim1\nim2,dog\n": r"line 2: expected 'name,labels'",
        "im0,cat\nim1,dog\nim0,person\n": r"line 3: image 'im0' is already listed at line 1",
        "im0,cat\n,dog\n": r"line 2: expected",
    }
    for i, (text, err) in enumerate(cases.items()):
        f = _csv(tmp_path, text, f"bad{i}.csv")
        with pytest.raises(DataError, match=rf"bad{i}\.csv, {err}"):
            FolderDataset(images, f, class_names=CLASSES)
        with pytest.raises(DataError, match=rf"bad{i}\.csv"):  # the inferred class list too
            FolderDataset(images, f)


def test_undecodable_file_and_tabs(images: Path, tmp_path: Path) -> None:
    f = _csv(tmp_path, "im0,cat\nim1,d\xf6g\n".encode("latin-1"))
    for names in (CLASSES, None):
        with pytest.raises(DataError, match=r"labels\.csv, line 2: not UTF-8"):
            FolderDataset(images, f, class_names=names)
    tsv = _csv(tmp_path, "name\tlabels\nim0\tcat;dog\nim1\tperson\nim2\t\n", "labels.tsv")
    ds = FolderDataset(images, tsv)
    assert list(ds.class_names) == ["background", *CLASSES]
    labels, _ = read_labels_file(tsv, ds.class_names)
    assert labels == {"im0": [1, 2], "im1": [3], "im2": []}


def test_json_classes_must_agree_with_class_names(images: Path, tmp_path: Path) -> None:
    f = _csv(tmp_path, '{"classes": ["cat", "dgo"], "labels": {"im0": ["cat"]}}', "l.json")
    with pytest.raises(DataError, match="lists the classes.*data.class_names"):
        read_labels_file(f, ["background", *CLASSES])


@pytest.mark.parametrize("override, key", [
    ("train.max_iters=abc", "train.max_iters"),
    ("eval.bkg_score=abc", "eval.bkg_score"),
    ("eval.bkg_score=1.5", "eval.bkg_score"),
    ("afa.radius=0", "afa.radius"),
    ("afa.window=circel", "afa.window"),
    ("afa.sampling=middle", "afa.sampling"),
    ("cam.scales=[]", "cam.scales"),
    ("data.batch_size=0.5", "data.batch_size"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("train.amp=fp16", "train.amp"),
    ("aream.weighting=entropy", "aream.weighting"),
    ("par.dilations=[1,x]", "par.dilations"),
    ("eval.flip=maybe", "eval.flip"),
    ("threads=0", "threads"),
    ("data.num_classes=1", "data.num_classes"),
    ("data.pseudo_dir=[a]", "data.pseudo_dir"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.num_workers=-1", "eval.num_workers"),
])
def test_every_value_is_checked_when_loaded(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=rf"config key '{key}' must be"):
        load_config("afa_mit_tiny_synthetic", [override])


def test_bad_value_fails_before_the_run_folder_exists(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli.main(["train", "cam_mit_tiny_synthetic", f"out_dir={out}", "train.max_iters=abc"]) == 2
    err = capsys.readouterr().err
    assert "train.max_iters" in err and "Traceback" not in err
    assert not out.exists()


def test_every_default_key_has_a_checked_type() -> None:
    cfg = load_config(None)
    assert cfg.train.max_iters == DEFAULTS["train"]["max_iters"]
    for dotted in ("optim.lr=1e-3", "data.crop_size=null", "afa.aff_target_switch_iter=15000",
                   "aream.entropy=[0.5,0.4]", "eval.max_images=3", "data.class_names=[a,b]",
                   "data.num_classes=null", "data.num_classes=5", "threads=2", "data.pseudo_dir=pl",
                   "eval.batch_size=1", "eval.num_workers=2"):
        load_config("afa_mit_tiny_synthetic", [dotted])
    assert cfg.data.num_classes is None and cfg.threads is None  # null: from the dataset / torch's default


def test_overrides_of_a_run_config_are_checked() -> None:
    from wsss.config import run_config

    run_cfg = load_config("afa_mit_tiny_synthetic")
    assert run_config(run_cfg, None, ["eval.max_images=3"]).eval.max_images == 3
    with pytest.raises(ValueError, match="config key 'eval.bkg_score' must be"):
        run_config(run_cfg, None, ["eval.bkg_score=2"])


@pytest.mark.parametrize("command", ["evaluate", "calibrate", "analyze", "pseudo-labels"])
@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_max_images_below_one_is_an_error_in_every_command(command: str, value: str, tmp_path: Path,
                                                           capsys) -> None:
    """--max-images 0 once meant "all images" to calibrate and "none" to the others: now it is the same
    error everywhere, from the parser, before a checkpoint is opened or a file written."""
    out = tmp_path / "out"
    extra = {"calibrate": [], "pseudo-labels": ["--split", "train", "--out", str(out)]}.get(
        command, ["--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--checkpoint", str(tmp_path / "no_run"), "--max-images", value, *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--max-images" in err and f"got '{value}'" in err and "leave it out for all images" in err
    assert not out.exists()
    cli.build_parser().parse_args([command, "--checkpoint", "run", "--max-images", "1", *extra])  # 1 is fine


def test_evaluate_refuses_maps_the_model_does_not_make(tiny_synthetic: Path, tmp_path: Path, capsys) -> None:
    """``--maps`` is nargs='+': an override written after it was once taken for a map name and silently
    ignored (the run's own background score was used). Now every unknown name is an error naming it,
    before anything is written."""
    import torch

    from tests.conftest import tiny_overrides
    from wsss.config import to_dict
    from wsss.engine.checkpoint import export_model
    from wsss.methods import build_network

    over = tiny_overrides(tiny_synthetic, tmp_path / "r")
    cfg = load_config("cam_mit_tiny_synthetic", over)
    torch.manual_seed(0)
    release = export_model(build_network(cfg, 5), {"config": to_dict(cfg), "num_classes": 6}, tmp_path / "m")
    out = tmp_path / "eval.json"
    base = ["evaluate", *over, "--checkpoint", str(release), "--out", str(out), "--maps"]
    assert cli.main([*base, "cam_par", "eval.bkg_score=0.6"]) == 2
    err = capsys.readouterr().err
    assert "eval.bkg_score=0.6" in err and "goes before the options" in err and not out.exists()
    assert cli.main([*base, "aff_par"]) == 2
    err = capsys.readouterr().err
    assert "--maps aff_par" in err and "cam_par" in err and "goes before" not in err and not out.exists()
    assert cli.main([*base, "cam_par", "pseudo_strict"]) == 0 and out.exists()
    # an override given first (where a config could stand) is applied and recorded
    assert cli.main(["evaluate", "eval.bkg_score=0.6", *over, "--checkpoint", str(release), "--out", str(out),
                     "--maps", "cam"]) == 0
    protocol = json.loads(out.read_text())["_protocol"]
    assert protocol["bkg_score"] == 0.6 and "eval.bkg_score=0.6" in protocol["overrides"]
