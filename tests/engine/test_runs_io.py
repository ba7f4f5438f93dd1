"""Run folders and written files: out_dir reuse, --resume without a checkpoint, demo resume, stale pseudo
labels, file modes under the umask, byte-identical exports, a full disk while checkpointing."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_overrides
from wsss import cli
from wsss.commands.pseudo_labels import run_pseudo_labels
from wsss.config import load_config, to_dict
from wsss.data.io import load_mask
from wsss.engine import checkpoint as ck
from wsss.engine.checkpoint import export_model, find_latest
from wsss.engine.train import train
from wsss.methods import build_network

CFG = "cam_mit_tiny_synthetic"


def test_out_dir_reuse_needs_resume_or_overwrite(tiny_synthetic: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    args = tiny_overrides(tiny_synthetic, run, **{"train.max_iters": 2, "eval.max_images": 1})
    train(load_config(CFG, args))
    history = (run / "history.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train(load_config(CFG, args))
    assert (run / "history.jsonl").read_text() == history  # nothing touched
    assert cli.main(["train", CFG, *args]) == 2
    assert "already holds a run" in capsys.readouterr().err
    train(load_config(CFG, args), overwrite=True)
    assert len((run / "history.jsonl").read_text().splitlines()) == len(history.splitlines())

    fresh = tmp_path / "fresh"
    train(load_config(CFG, tiny_overrides(tiny_synthetic, fresh, **{"train.max_iters": 1})), resume=True)
    assert "--resume: no checkpoint in" in capsys.readouterr().err


def test_demo_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    from wsss.commands import demo

    calls: list[tuple[str, bool]] = []

    def fake_train(cfg, resume=False, overwrite=False):  # noqa: ANN001
        out = Path(cfg.out_dir)
        calls.append((out.name, resume))
        (out / "model").mkdir(parents=True, exist_ok=True)
        res = {"cam": {"miou": 0.5}, "cam_par": {"miou": 0.6}}
        (out / "metrics.json").write_text(json.dumps({"eval": res}))
        return res

    monkeypatch.setattr("wsss.engine.train.train", fake_train)
    monkeypatch.setattr(demo, "analyze_run", lambda *a, **k: {})
    monkeypatch.setattr("wsss.analysis.report.write_report", lambda *a, **k: None)
    demo.run_demo(tmp_path / "d", quick=True, methods=["cam"], backbone="scratch", jobs=1)
    (tmp_path / "d" / "cam" / "metrics.json").unlink()  # interrupted: no metrics yet
    with pytest.raises(ValueError, match="already holds demo runs"):
        demo.run_demo(tmp_path / "d", quick=True, methods=["cam", "supervised"], backbone="scratch", jobs=1)
    summary = demo.run_demo(tmp_path / "d", quick=True, methods=["cam", "supervised"], backbone="scratch",
                                  resume=True, jobs=1)
    assert calls == [("cam", False), ("cam", True), ("supervised", True)]
    summary = demo.run_demo(tmp_path / "d", quick=True, methods=["cam", "supervised"], backbone="scratch",
                                  resume=True, jobs=1)
    assert len(calls) == 3 and summary["cam"]["pseudo_miou"] == 0.6  # finished runs are kept


def test_pseudo_labels_detect_stale_outputs(tiny_synthetic: Path, tmp_path: Path) -> None:
    cfg = load_config(CFG, tiny_overrides(tiny_synthetic, tmp_path / "r"))
    over = tiny_overrides(tiny_synthetic, tmp_path / "r")
    releases = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build_network(cfg, 5)
        releases.append(export_model(net, {"config": to_dict(cfg), "num_classes": 6}, tmp_path / f"m{seed}"))
    out = tmp_path / "pl"
    s = run_pseudo_labels(CFG, releases[0], over, "val", out, map_name="cam", verbose=False)
    assert s["written"] == 3
    first = load_mask(out / f"{s_name(out)}.png", 256)
    with pytest.raises(ValueError, match="other settings.*weights_sha256"):
        run_pseudo_labels(CFG, releases[1], over, "val", out, map_name="cam", verbose=False)
    with pytest.raises(ValueError, match="other settings.*map"):
        run_pseudo_labels(CFG, releases[0], over, "val", out, map_name="cam_par", verbose=False)
    again = run_pseudo_labels(CFG, releases[0], over, "val", out, map_name="cam", verbose=False)
    assert again["written"] == 0 and again["skipped_existing"] == 3
    s2 = run_pseudo_labels(CFG, releases[1], over, "val", out, map_name="cam", verbose=False, overwrite=True)
    assert s2["written"] == 3 and s2["skipped_existing"] == 0
    assert load_mask(out / f"{s_name(out)}.png", 256).shape == first.shape
    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="without a manifest"):
        run_pseudo_labels(CFG, releases[0], over, "val", alien, map_name="cam", verbose=False)


def s_name(out: Path) -> str:
    return sorted(p.stem for p in out.glob("*.png"))[0]


def test_files_follow_the_umask_and_exports_are_byte_identical(tmp_path: Path) -> None:
    cfg = load_config(CFG)
    torch.manual_seed(0)
    net = build_network(cfg, 5)
    old = os.umask(0o022)
    try:
        blobs = {export_model(net, {"num_classes": 6}, tmp_path / f"e{i}").joinpath("model.safetensors")
                 .read_bytes() for i in range(8)}
        ckpt = ck.save_training_state(tmp_path / "ck", net, None, None, 1)
    finally:
        os.umask(old)
    assert len(blobs) == 1  # identical weights, identical bytes
    for f in (tmp_path / "e0" / "model.safetensors", tmp_path / "e0" / "config.json", ckpt):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_full_disk_while_checkpointing_keeps_the_previous_one(tiny_synthetic: Path, tmp_path: Path,
                                                             monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    args = tiny_overrides(tiny_synthetic, run, **{"train.max_iters": 3, "train.keep_ckpts": 3})
    real_save = torch.save
    state = {"n": 0}

    def save(obj, f, *a, **k):  # noqa: ANN001, ANN002, ANN003
        state["n"] += 1
        if state["n"] == 2:  # the second checkpoint: half written, then the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", save)
    assert cli.main(["train", CFG, *args]) == 1
    err = capsys.readouterr().err
    assert "disk is full" in err and "Traceback" not in err and err.count("error:") == 1
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt_00000001.pt"]  # no temp file left
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert cli.main(["train", CFG, *args, "--resume"]) == 0
    assert find_latest(run / "checkpoints").name == "ckpt_00000003.pt"
    assert np.isfinite(json.loads((run / "metrics.json").read_text())["iterations"])


def test_read_only_or_blocked_run_folder_is_one_line(tiny_synthetic: Path, tmp_path: Path, monkeypatch,
                                                     capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p).name == "ro" else real_access(p, m))
    assert cli.main(["train", CFG, *tiny_overrides(tiny_synthetic, ro / "run")]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and str(ro) in err and "Traceback" not in err
    assert not (ro / "run").exists()
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    assert cli.main(["train", CFG, *tiny_overrides(tiny_synthetic, tmp_path / "file" / "run")]) == 1
    assert "a file is in the way" in capsys.readouterr().err
