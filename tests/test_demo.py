"""`wsss demo --quick`: the whole demo path (data, training, evaluation, analysis, reports) in seconds."""

from __future__ import annotations

import json

import pytest

from wsss.engine.demo import run_demo, summary_table


def test_quick_demo_writes_table_analysis_and_reports(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    summary = run_demo(out, quick=True, methods=["cam", "afa", "second_stage", "aream"])
    assert set(summary) == {"cam", "afa", "second_stage", "aream"}
    for method in summary:
        assert (out / method / "report.html").is_file()
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
    assert "- afa: AFA affinity" in table and "- aream: mIoU" in table
    assert "second_stage: a segmentation network trained on afa's aff_par pseudo labels" in table
