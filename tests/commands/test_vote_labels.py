"""``wsss vote-labels``: the vote of pseudo-label folders, its scores, and the checks before any output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from wsss import cli
from wsss.data.build import use_pseudo_labels
from wsss.data.io import load_mask, save_mask

CLASSES = ["background", "cat", "dog", "person"]
STEMS = ["a", "b", "c"]


def _truth() -> dict[str, np.ndarray]:
    """A ground truth per stem: one object class on a background, plus 255 (void) in a corner."""
    out = {}
    for i, stem in enumerate(STEMS):
        m = np.zeros((6, 8), dtype=np.uint8)
        m[1:5, 2:7] = i + 1
        m[0, 0] = 255
        out[stem] = m
    return out


def _folder(path: Path, maps: dict[str, np.ndarray], classes: list[str] = CLASSES) -> Path:
    path.mkdir(parents=True)
    for stem, m in maps.items():
        save_mask(path / f"{stem}.png", m)
    (path / "class_names.json").write_text(json.dumps(classes))
    return path


def _runs(tmp_path: Path) -> list[Path]:
    """Three runs, each losing a different image's object to the background (and writing 255 elsewhere)."""
    truth = _truth()
    folders = []
    for r in range(3):
        maps = {s: np.where(m == 255, 0, m).astype(np.uint8) for s, m in truth.items()}
        maps[STEMS[r]][maps[STEMS[r]] > 0] = 0  # the class this run misses
        maps[STEMS[(r + 1) % 3]][5, r] = 255  # an abstention
        folders.append(_folder(tmp_path / f"run{r}", maps))
    return folders


def test_the_vote_recovers_what_each_run_misses(tmp_path: Path, capsys) -> None:
    folders = _runs(tmp_path)
    gt = _folder(tmp_path / "gt", _truth())
    out = tmp_path / "vote"
    args = ["vote-labels", *map(str, folders), "--out", str(out), "--masks", str(gt)]
    assert cli.main(args) == 0
    truth = _truth()
    for stem in STEMS:
        assert np.array_equal(load_mask(out / f"{stem}.png", 4), np.where(truth[stem] == 255, 0, truth[stem]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores"]["miou_uncertain_wrong"] == pytest.approx(1.0)
    assert all(s["miou_uncertain_wrong"] < 0.9 for s in summary["input_scores"])  # each run alone misses one
    assert sum(summary["winning_votes"].values()) == 3 * 6 * 8 and summary["winning_votes"]["0"] == 0
    assert json.loads((out / "class_names.json").read_text()) == CLASSES
    assert "vote: scored against the masks ground truth: mIoU 100.00" in capsys.readouterr().out

    class Data:  # what a second stage's data.pseudo_dir checks: the class list and every PNG
        names, class_names, mask_paths = STEMS, CLASSES, {}

    assert use_pseudo_labels(Data(), out).mask_paths == {s: out / f"{s}.png" for s in STEMS}
    assert cli.main([*args, "--min-votes", "3"]) == 2  # other settings in the same folder: an error
    assert cli.main([*args, "--min-votes", "3", "--overwrite"]) == 0
    assert (load_mask(out / "a.png", 4) == 255).sum() > 0  # where the runs disagree: uncertain


@pytest.mark.parametrize("case", ["classes", "no_classes", "missing", "size", "value", "out", "one",
                                  "min_votes", "mask_size", "mask_value"])
def test_bad_input_is_an_error_before_any_output(tmp_path: Path, case: str, capsys) -> None:
    folders = _runs(tmp_path)
    extra: list[str] = []
    bad = folders[1]
    if case == "classes":
        (bad / "class_names.json").write_text(json.dumps(["background", "cat", "dog", "horse"]))
        expect = f"{bad} labels the classes"
    elif case == "no_classes":
        (bad / "class_names.json").unlink()
        expect = f"{bad} has no class_names.json"
    elif case == "missing":
        (bad / "b.png").unlink()
        expect = f"1 label PNGs missing in {bad}: b"
    elif case == "size":
        save_mask(bad / "c.png", np.zeros((5, 8), dtype=np.uint8))
        expect = f"{bad / 'c.png'} is 5x8 but {folders[0] / 'c.png'} is 6x8"
    elif case == "value":
        save_mask(bad / "c.png", np.full((6, 8), 9, dtype=np.uint8))
        expect = rf"mask {bad / 'c.png'} has values \[9\] outside 0..3"
    elif case == "out":
        extra, expect = ["--overwrite"], "is one of the folders voted on"
    elif case in ("mask_size", "mask_value"):
        gt = _folder(tmp_path / "gt", _truth())
        wrong = np.zeros((6, 9), np.uint8) if case == "mask_size" else np.full((6, 8), 7, np.uint8)
        save_mask(gt / "c.png", wrong)
        extra = ["--masks", str(gt)]
        expect = (f"mask {gt / 'c.png'} is 6x9 but its labels are 6x8" if case == "mask_size"
                  else rf"mask {gt / 'c.png'} has values \[7\] outside 0..3")
    elif case == "one":
        folders, expect = folders[:1], "needs at least 2 label folders"
    else:
        extra, expect = ["--min-votes", "4"], "--min-votes must be between 1 and the 3 folders, got 4"
    out = folders[0] if case == "out" else tmp_path / "vote"
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert cli.main(["vote-labels", *map(str, folders), "--out", str(out), *extra]) == 2
    assert re.search(expect, capsys.readouterr().err)
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before  # nothing written
