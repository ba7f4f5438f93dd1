"""The user's path (issue 12): commands that read the run they are given, honest output, a second stage.

``test_user_path_shell`` runs ``tests/commands/user_path.sh`` (train -> evaluate -> pseudo-labels -> second
stage -> evaluate -> predict -> analyze -> report on a VOC-layout root, with only data.root / out_dir given)
and rescores the pseudo-label PNGs with a scorer written here. The other tests each pin one of the
problems the issue lists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_overrides
from wsss.config import load_config
from wsss.data.io import DataError, load_mask
from wsss.engine.train import train

REPO = Path(__file__).resolve().parents[2]


def rescore(pred_dir: Path, gt_dir: Path, names: list[str], c: int) -> tuple[float, float, float]:
    """(mIoU with 255 left out, mIoU with 255 counted as wrong, coverage) with plain per-class loops;
    mIoU over the classes present in the ground truth (evaluate's rule)."""
    tp, fp, fn = np.zeros((2, c)), np.zeros((2, c)), np.zeros((2, c))
    labelled = valid_total = 0
    for name in names:
        pred = load_mask(pred_dir / f"{name}.png", 256)
        gt = load_mask(gt_dir / f"{name}.png", 256)
        valid = gt != 255
        labelled += int((valid & (pred != 255)).sum())
        valid_total += int(valid.sum())
        for rule, keep in ((0, valid & (pred != 255)), (1, valid)):
            for k in range(c):
                tp[rule, k] += ((pred == k) & (gt == k) & keep).sum()
                fp[rule, k] += ((pred == k) & (gt != k) & keep).sum()
                fn[rule, k] += ((pred != k) & (gt == k) & keep).sum()
    mious = []
    for rule in (0, 1):
        present = [k for k in range(c) if tp[rule, k] + fn[rule, k] > 0]
        mious.append(
            float(np.mean([tp[rule, k] / (tp[rule, k] + fp[rule, k] + fn[rule, k]) for k in present]))
        )
    return mious[0], mious[1], labelled / valid_total


def test_user_path_shell(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(REPO / "tests" / "commands" / "user_path.sh"), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "data").exists()  # nothing fell back to the default synthetic root
    run, run2, pl = tmp_path / "runs" / "afa", tmp_path / "runs" / "second", tmp_path / "pseudo_train"
    root = tmp_path / "VOC2012"
    # train printed its table and where the model went; the run's config names the dataset's 21 classes
    out = (tmp_path / "train.out").read_text()
    assert "| aff_par |" in out and f"model saved to {run / 'model'}" in out
    assert load_config(run / "config.yaml").data.num_classes == 21
    # evaluate used the run's data (VOC class names, 21 rows)
    ev = json.loads((run / "eval_val.json").read_text())
    assert len(ev["aff_par"]["iou"]) == 21 and ev["_protocol"]["class_names"][15] == "person"
    assert "pseudo_strict" in ev and ev["pseudo_strict"]["miou"] <= ev["pseudo"]["miou"] + 1e-12
    # the pseudo-label PNGs rescored here give the printed numbers
    names = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert sorted(p.stem for p in pl.glob("*.png")) == sorted(names)
    left_out, wrong, coverage = rescore(pl, root / "SegmentationClass", names, 21)
    printed = (tmp_path / "pseudo.out").read_text()
    m = re.search(
        r"mIoU ([\d.]+) with uncertain \(255\) pixels left out \(coverage ([\d.]+)%\), ([\d.]+) with", printed
    )
    assert m, printed
    assert (float(m[1]), float(m[2]), float(m[3])) == (
        round(100 * left_out, 2),
        round(100 * coverage, 2),
        round(100 * wrong, 2),
    )
    scores = json.loads((pl / "summary.json").read_text())["scores"]
    assert scores["miou_uncertain_left_out"] == pytest.approx(left_out, abs=1e-12)
    assert scores["miou_uncertain_wrong"] == pytest.approx(wrong, abs=1e-12)
    assert scores["coverage"] == pytest.approx(coverage, abs=1e-12)
    # the second stage trained on those PNGs and was evaluated on the ground truth
    cfg2 = load_config(run2 / "config.yaml")
    assert cfg2.method == "supervised" and Path(cfg2.data.pseudo_dir) == pl
    assert set(json.loads((run2 / "eval_val.json").read_text())) == {"seg", "_protocol"}
    assert len(list((tmp_path / "predict").glob("*_overlay.png"))) == len(
        list((root / "JPEGImages").iterdir())
    )
    # analyze wrote elsewhere, labelled its rules; the report found it
    assert (tmp_path / "analysis" / "analysis.json").is_file()
    text = (tmp_path / "analyze.out").read_text()
    assert "AReAM rule" in text and "evaluate's rule" in text
    assert "Layer-wise analysis" in (run / "report.html").read_text()


# ---------------------------------------------------------------------------------------------
# One test per problem of the issue
# ---------------------------------------------------------------------------------------------


CFG = "afa_mit_tiny_synthetic"


@pytest.fixture(scope="module")
def afa_run(tiny_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained AFA run, shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("afa_run") / "run"
    train(load_config(CFG, tiny_overrides(tiny_synthetic, run)))
    return run


@pytest.fixture(scope="module")
def voc21(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VOC-layout root with 21 classes and no class_names.json (as PASCAL VOC itself)."""
    from wsss.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("voc21")
    generate_synthetic(root, num_train=4, num_val=2, size=64, seed=1, num_classes=21)
    (root / "class_names.json").unlink()
    return root


def test_num_classes_come_from_the_dataset(voc21: Path, tiny_synthetic: Path) -> None:
    from wsss.data.build import build_dataset

    cfg = load_config("afa_mit_tiny_synthetic", [f"data.root={voc21}"])
    assert cfg.data.num_classes is None
    ds = build_dataset(cfg.data, "val", train=False)
    assert ds.num_classes == 21 and ds.class_names[15] == "person"
    cfg = load_config("afa_mit_tiny_synthetic", [f"data.root={tiny_synthetic}"])
    assert build_dataset(cfg.data, "val", train=False).num_classes == 6  # the root's class_names.json


def test_mask_value_error_names_file_value_fix_before_writing(voc21: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(
        "afa_mit_tiny_synthetic",
        tiny_overrides(voc21, out, **{"data.num_classes": 6}) + ["data.class_names=null"],
    )
    (voc21 / "cls_labels_SegmentationClass.json").unlink(missing_ok=True)
    with pytest.raises(DataError, match=r"mask .*\.png has values \[.*\] outside 0\.\.5.*data\.num_classes"):
        train(cfg)
    assert not out.exists()


def test_commands_use_the_run_config(
    tiny_synthetic: Path, voc21: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsss.commands.evaluate import run_evaluate

    run = tmp_path / "run"
    train(load_config("cam_mit_tiny_synthetic", tiny_overrides(tiny_synthetic, run)))
    monkeypatch.chdir(tmp_path)  # a fallback to the config's default root would land here
    res = run_evaluate(None, run / "model", print_table=False)
    assert not (tmp_path / "data").exists()
    assert (
        res["_protocol"]["images"] == 2 and len(res["cam"]["iou"]) == 6
    )  # the run's eval.max_images, classes
    # a named config replaces the protocol, never the run's data
    res = run_evaluate("cam_mit_tiny_synthetic", run / "model", ["eval.max_images=1"], print_table=False)
    assert res["_protocol"]["images"] == 1 and not (tmp_path / "data").exists()
    with pytest.raises(ValueError) as err:
        run_evaluate(
            None,
            run / "model",
            [f"data.root={voc21}", "data.num_classes=21", "data.class_names=null"],
            print_table=False,
        )
    msg = str(err.value)
    assert "\n" not in msg and "predicts 6 classes" in msg and "has 21" in msg and str(voc21) in msg


def test_train_prints_evaluations_table_and_model_path(
    tiny_synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    train(
        load_config("cam_mit_tiny_synthetic", tiny_overrides(tiny_synthetic, run, **{"train.eval_every": 2}))
    )
    out = capsys.readouterr().out
    assert re.search(r"iter 2 eval: \{.*\"cam\"", out)
    assert "| cam_par |" in out and "| pseudo |" in out and f"model saved to {run / 'model'}" in out


def _maps_by_loop(method, net, dataset, n: int):  # noqa: ANN001, ANN202
    from wsss.engine.evaluate import predict_maps

    for i in range(n):
        s = dataset[i]
        yield (
            predict_maps(method, net, s["image"][None], s["labels"][None], [1.0], False)["pseudo"][0],
            s["mask"],
        )


def test_pseudo_scored_both_ways(afa_run: Path) -> None:
    from wsss.api.hub import load_run
    from wsss.data.build import build_dataset
    from wsss.engine.evaluate import evaluate, miou_table
    from wsss.methods import build_method

    net, cfg, _ = load_run(afa_run / "model")
    method = build_method(cfg, net)
    ds = build_dataset(cfg.data, "val", train=False)
    res = evaluate(method, net, ds, 6, torch.device("cpu"), max_images=3)
    # reference: loops over classes, 255 counted as a miss of the ground-truth class
    tp, fp, fn = np.zeros(6), np.zeros(6), np.zeros(6)
    for pred, gt in _maps_by_loop(method, net, ds, 3):
        pred, gt = pred.numpy(), gt.numpy()
        valid = gt != 255
        for k in range(6):
            tp[k] += ((pred == k) & (gt == k) & valid).sum()
            fp[k] += ((pred == k) & (gt != k) & valid).sum()
            fn[k] += ((pred != k) & (gt == k) & valid).sum()
    present = tp + fn > 0
    assert res["pseudo_strict"]["miou"] == pytest.approx(
        float(np.mean(tp[present] / (tp + fp + fn)[present])), abs=1e-12
    )
    row = next(r for r in miou_table(res).splitlines() if r.startswith("| pseudo |"))
    assert "coverage" in row and "left out" in row


def test_pseudo_labels_computes_only_the_requested_map(
    afa_run: Path, tiny_synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsss.commands.pseudo_labels import run_pseudo_labels
    from wsss.methods.afa import AFAMethod

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the AFA propagation ran for --map cam")

    monkeypatch.setattr(AFAMethod, "propagate", fail)
    over = tiny_overrides(tiny_synthetic, afa_run)  # the config and overrides of the run, as before
    s = run_pseudo_labels(CFG, afa_run / "model", over, "val", tmp_path / "pl", map_name="cam", verbose=False)
    assert s["written"] == 3
    with pytest.raises(ValueError, match="refined_par"):
        run_pseudo_labels(CFG, afa_run / "model", over, "val", tmp_path / "pl2", map_name="refined_par")
    assert not (tmp_path / "pl2").exists()


def test_evaluate_computes_only_the_requested_maps(
    afa_run: Path, tiny_synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--maps`` with batched evaluation: the others are not computed, the kept ones are unchanged."""
    from wsss.commands.evaluate import run_evaluate
    from wsss.methods.afa import AFAMethod

    over = tiny_overrides(tiny_synthetic, afa_run)
    kw = {"split": "val", "print_table": False, "batch_size": 2}
    full = run_evaluate(CFG, afa_run / "model", over, out=tmp_path / "all.json", **kw)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the AFA propagation ran for --maps cam pseudo_strict")

    monkeypatch.setattr(AFAMethod, "propagate", fail)
    some = ["cam", "pseudo_strict"]
    res = run_evaluate(CFG, afa_run / "model", over, out=tmp_path / "some.json", maps=some, **kw)
    assert set(res) == {"cam", "pseudo_strict", "_protocol"}
    for name in ("cam", "pseudo_strict"):
        np.testing.assert_allclose(np.array(res[name]["iou"], dtype=float),
                                   np.array(full[name]["iou"], dtype=float), atol=1e-12)


def test_resume_never_duplicates_history(tiny_synthetic: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    over = tiny_overrides(tiny_synthetic, run, **{"train.max_iters": 5, "train.ckpt_every": 2})
    train(load_config("cam_mit_tiny_synthetic", over), stop_after=3)  # checkpoint at 2, history to 3
    assert [json.loads(line)["iter"] for line in (run / "history.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    train(load_config("cam_mit_tiny_synthetic", over), resume=True)
    iters = [json.loads(line)["iter"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert iters == [1, 2, 3, 4, 5]
    # a fresh run in the same folder (issue 11: only with overwrite): its history only
    train(load_config("cam_mit_tiny_synthetic", over), overwrite=True)
    iters = [json.loads(line)["iter"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert iters == [1, 2, 3, 4, 5]


def test_report_finds_analysis_written_elsewhere(afa_run: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from wsss.analysis.report import build_html
    from wsss.cli import main

    over = tiny_overrides(tiny_synthetic, afa_run)
    args = ["analyze", CFG, *over, "--checkpoint", str(afa_run / "model"), "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "analysis.json").is_file() and not (afa_run / "analysis").exists()
    assert "Layer-wise analysis" in build_html(afa_run, images=0)


def test_analyze_labels_its_rules_and_offers_evaluates(
    afa_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from wsss.cli import main

    args = ["analyze", "--checkpoint", str(afa_run / "model"), "--device", "cpu", "--out"]
    capsys.readouterr()
    assert main([*args, str(tmp_path / "voc"), "--iou", "voc"]) == 0
    out = capsys.readouterr().out
    assert "refinement mIoU at the best background threshold (evaluate's rule: mean over the classes" in out
    assert "AReAM rule" not in out
    voc = json.loads((tmp_path / "voc" / "analysis.json").read_text())
    assert voc["refinement"]["_summary"]["protocol"] == "voc"
    assert main([*args, str(tmp_path / "aream")]) == 0
    out = capsys.readouterr().out
    assert "(AReAM rule: mean over all classes" in out and "affinity ceiling (evaluate's rule" in out
    aream = json.loads((tmp_path / "aream" / "analysis.json").read_text())
    # the same counts under the two rules: evaluate's mean over present classes is never below
    assert voc["refinement"]["cam"]["best_miou"] >= aream["refinement"]["cam"]["best_miou"]
    assert voc["oracle"] == aream["oracle"]


def test_conformer_offline_entropy_uses_the_official_eps() -> None:
    from wsss.analysis.statistics import layer_statistics
    from wsss.config import load_config as load
    from wsss.methods import build_network
    from wsss.ops.attention import attention_probs

    torch.manual_seed(0)
    cfg = load("aream_conformer_micro_synthetic", ["data.num_classes=6"])
    net = build_network(cfg, 5).eval()
    x = torch.randn(1, 3, 128, 128)
    labels = torch.tensor([[1.0, 0, 1, 0, 0]])
    layers = list(range(net.backbone.num_layers))
    st = layer_statistics(net, x, labels, layers)
    with torch.no_grad():
        out = net.forward_cam(x, layers)
    cam = out.cam.double()
    t = net.backbone.num_prefix_tokens
    for i, layer in enumerate(layers):  # official ent_voc_conformer.py: log2(p + 1e-6), raw CAM
        aff = attention_probs(out.attn[layer]).double()[0, t:, t:]
        s = sum(aff @ cam[0, c].reshape(-1) for c in (0, 2))
        p = torch.softmax(s, 0)
        ref = -float((p * torch.log2(p + 1e-6)).sum())
        assert float(st.entropy[i, 0]) == pytest.approx(ref, abs=2e-6)


def test_threads_option_and_config_key(tiny_synthetic: Path, tmp_path: Path) -> None:
    from wsss.cli import main

    torch.set_num_threads(2)
    try:
        assert (
            main(
                [
                    "train",
                    "cam_mit_tiny_synthetic",
                    *tiny_overrides(tiny_synthetic, tmp_path / "a"),
                    "--threads",
                    "1",
                ]
            )
            == 0
        )
        assert torch.get_num_threads() == 1
        assert load_config(tmp_path / "a" / "config.yaml").threads == 1
        torch.set_num_threads(2)
        train(
            load_config("cam_mit_tiny_synthetic", tiny_overrides(tiny_synthetic, tmp_path / "b", threads=1))
        )
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads.* >= 1"):  # validate_config or set_threads
            train(
                load_config(
                    "cam_mit_tiny_synthetic", tiny_overrides(tiny_synthetic, tmp_path / "c", threads=0)
                )
            )
    finally:
        torch.set_num_threads(1)
    assert "--threads" in (REPO / "README.md").read_text()


def test_second_stage_on_pseudo_pngs_any_backbone(tiny_synthetic: Path, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from wsss.commands.evaluate import run_evaluate
    from wsss.data.build import build_dataset
    from wsss.data.io import save_mask

    cfg = load_config("second_stage_mit_tiny_synthetic", tiny_overrides(tiny_synthetic, tmp_path / "run"))
    train_names = (tiny_synthetic / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    pl = tmp_path / "pl"
    pl.mkdir()
    rng = np.random.default_rng(0)
    for name in train_names[:-1]:
        h, w = load_mask(tiny_synthetic / "SegmentationClass" / f"{name}.png", 256).shape
        save_mask(pl / f"{name}.png", rng.choice([0, 1, 2, 255], size=(h, w)).astype(np.uint8))
    cfg.data.pseudo_dir = str(pl)
    with pytest.raises(DataError, match=re.escape(f"1 pseudo-label PNGs missing in {pl}: {train_names[-1]}")):
        train(cfg)
    assert not (tmp_path / "run").exists()
    h, w = load_mask(tiny_synthetic / "SegmentationClass" / f"{train_names[-1]}.png", 256).shape
    save_mask(pl / f"{train_names[-1]}.png", np.full((h, w), 255, dtype=np.uint8))
    ds = build_dataset(cfg.data, "train", train=True)
    ds.transform = build_dataset(cfg.data, "val", train=False).transform  # no crop: compare whole masks
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), load_mask(pl / f"{ds.names[0]}.png", 256))
    # your own folder of images takes the pseudo labels the same way
    labels = json.loads((tiny_synthetic / "cls_labels.json").read_text())
    (tmp_path / "labels.json").write_text(json.dumps({n: labels[n] for n in train_names}))
    folder = {"type": "folder", "image_dir": str(tiny_synthetic / "JPEGImages"), "pseudo_dir": str(pl),
              "labels_file": str(tmp_path / "labels.json"), "class_names": list(ds.class_names)}
    fds = build_dataset(folder, "train", train=True)
    assert fds.mask_paths == {n: pl / f"{n}.png" for n in train_names}
    for backbone, kwargs in (("mit_tiny", None), ("vit_micro", {"img_size": 64, "patch_size": 8})):
        c = OmegaConf.merge(cfg, {"out_dir": str(tmp_path / backbone), "model": {"backbone": backbone}})
        if kwargs is not None:
            c.model.backbone_kwargs = kwargs
        res = train(c)
        assert set(res) == {"seg", "_protocol"}
        ev = run_evaluate(None, tmp_path / backbone / "model", print_table=False)
        assert ev["seg"]["miou"] == pytest.approx(res["seg"]["miou"])
