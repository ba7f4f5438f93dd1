"""``wsss pseudo-labels --ensemble``: the labels of several models' averaged CAMs (or seg softmax),
against a reference written here, the one-model identity, and bad input refused before any output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_overrides
from wsss import cli
from wsss.commands.pseudo_labels import run_pseudo_labels
from wsss.config import load_config, to_dict
from wsss.data.build import build_dataset
from wsss.data.io import load_mask
from wsss.engine.checkpoint import export_model
from wsss.engine.evaluate import ensemble_label_and_scores, label_and_scores, sweep_cam
from wsss.engine.runs import open_run
from wsss.methods import build_network
from wsss.methods.base import with_background

CFG = "cam_mit_tiny_synthetic"


@pytest.fixture(scope="module")
def releases(tiny_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Three untrained models of the same config (seeds 0-2) and one of another class count."""
    tmp = tmp_path_factory.mktemp("ensemble")
    over = tiny_overrides(tiny_synthetic, tmp / "r")
    cfg = load_config(CFG, over)
    out = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        net = build_network(cfg, 5)
        out.append(export_model(net, {"config": to_dict(cfg), "num_classes": 6}, tmp / f"m{seed}"))
    torch.manual_seed(3)
    other = export_model(build_network(cfg, 3), {"config": to_dict(cfg), "num_classes": 4}, tmp / "m3")
    names = ["background", *(f"c{i}" for i in range(5))]  # the same count, other classes
    renamed = export_model(build_network(cfg, 5), {"config": to_dict(cfg), "num_classes": 6,
                                                   "class_names": names}, tmp / "m4")
    return {"models": out, "other": other, "renamed": renamed, "over": over, "cfg": cfg}


def _members(paths: list[Path]) -> list[tuple[object, torch.nn.Module]]:
    """(method, net) of each release, as the command opens them."""
    members = []
    for p in paths:
        _, net, method, _, _ = open_run(None, p, [], "cpu")
        members.append((method, net))
    return members


def _batch(cfg: object) -> dict[str, torch.Tensor]:
    ds = build_dataset(cfg.data, split="val", train=False)
    sample = ds[0]
    return {"image": sample["image"][None], "labels": sample["labels"][None]}


def test_cam_maps_equal_a_reference_mean(releases: dict) -> None:
    members = _members(releases["models"])
    batch = _batch(releases["cfg"])
    image, labels = batch["image"], batch["labels"]
    method, net = members[0]
    # reference: each model's own masked CAM, averaged by an explicit sum, thresholded pixel by pixel
    cams = [sweep_cam(m, n, image, labels, [1.0, 0.5], True) for m, n in members]
    mean = sum(cams[1:], cams[0]) / len(cams)
    bkg = method.bkg_score
    ref = torch.zeros(mean.shape[-2:], dtype=torch.long)
    for i in range(mean.shape[-2]):
        for j in range(mean.shape[-1]):
            scores = [bkg] + [float(mean[0, k, i, j]) if labels[0, k] else -1.0 for k in range(mean.shape[1])]
            ref[i, j] = int(np.argmax(scores))
    label, scores = ensemble_label_and_scores(members, image, labels, "cam", [1.0, 0.5], True, True)
    torch.testing.assert_close(scores, mean, rtol=1e-6, atol=1e-6)
    assert torch.equal(label[0], ref)
    singles = [label_and_scores(m, n, image, labels, "cam", [1.0, 0.5], True, False)[0] for m, n in members]
    assert all(not torch.equal(label, s) for s in singles)  # the ensemble is none of its members
    # cam_par: PAR on the averaged one-scale CAMs with the first model's background score
    x, (h, w) = net.pad(image)
    assert (h, w) == tuple(x.shape[-2:])  # 64 px: no padding, so the reference needs none
    cams1 = [sweep_cam(m, n, image, labels, [1.0], False) for m, n in members]
    par_ref = method.par_argmax(image, with_background(sum(cams1[1:], cams1[0]) / 3, bkg), labels)
    par, _ = ensemble_label_and_scores(members, image, labels, "cam_par", [1.0], False, False)
    assert torch.equal(par, par_ref)


def test_seg_is_the_mean_softmax(releases: dict) -> None:
    members = _members(releases["models"])
    batch = _batch(releases["cfg"])
    image, labels = batch["image"], batch["labels"]
    probs = [label_and_scores(m, n, image, labels, "seg", [1.0], True, True)[1].softmax(1)
             for m, n in members]
    mean = (probs[0] + probs[1] + probs[2]) / 3
    label, logits = ensemble_label_and_scores(members, image, labels, "seg", [1.0], True, True)
    torch.testing.assert_close(logits.exp(), mean, rtol=1e-5, atol=1e-7)
    assert torch.equal(label, mean.argmax(1))


def test_command_one_model_twice_is_that_model(releases: dict, tmp_path: Path) -> None:
    m0, m1 = releases["models"][:2]
    over = releases["over"]
    single = run_pseudo_labels(CFG, m0, over, "val", tmp_path / "one", map_name="cam_par", verbose=False)
    twice = run_pseudo_labels(CFG, m0, over, "val", tmp_path / "two", map_name="cam_par", verbose=False,
                              ensemble=[m0])
    both = run_pseudo_labels(CFG, m0, over, "val", tmp_path / "both", map_name="cam_par", verbose=False,
                             ensemble=[m1], logits=True, logit_stride=1)
    assert single["written"] == twice["written"] == both["written"] == 3
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    same = [np.array_equal(load_mask(tmp_path / "one" / n, 256), load_mask(tmp_path / "two" / n, 256))
            for n in names]
    assert all(same)  # (a + a) / 2 == a: the same labels, bit for bit
    assert both["ensemble"] == [str(Path(m1).resolve())]
    with np.load(tmp_path / "both" / names[0].replace(".png", ".npz")) as z:  # the averaged CAM it labelled
        cam = z["logits"]
    assert cam.shape[1:] == load_mask(tmp_path / "both" / names[0], 256).shape
    assert 0 <= cam.min() <= cam.max() <= 1
    # the manifest names the ensemble: a single model's labels cannot resume into its folder
    with pytest.raises(ValueError, match="other settings.*ensemble_sha256"):
        run_pseudo_labels(CFG, m0, over, "val", tmp_path / "both", map_name="cam_par", verbose=False)


@pytest.mark.parametrize("case", ["own_map", "classes", "names", "missing"])
def test_bad_ensembles_write_nothing(releases: dict, tmp_path: Path, capsys, case: str) -> None:
    m0 = releases["models"][0]
    out = tmp_path / "out"
    args = ["pseudo-labels", CFG, *releases["over"], "--checkpoint", str(m0), "--split", "val",
            "--out", str(out), "--map", "cam_par", "--ensemble"]
    if case == "own_map":  # AFA's propagated label needs each model's own affinity: not averaged
        torch.manual_seed(0)
        afa_cfg = load_config("afa_mit_tiny_synthetic", releases["over"])
        afa = export_model(build_network(afa_cfg, 5), {"config": to_dict(afa_cfg), "num_classes": 6},
                           tmp_path / "afa")
        args[args.index("--checkpoint") + 1], args[args.index("--map") + 1] = str(afa), "aff_par"
        args, match = [*args, str(afa)], "aff_par"
    elif case == "classes":
        args, match = [*args, str(releases["other"])], str(releases["other"])
    elif case == "names":
        args, match = [*args, str(releases["renamed"])], f"{releases['renamed']}: its classes"
    else:
        args, match = [*args, str(tmp_path / "nowhere")], "nowhere"
    assert cli.main(args) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()
