"""wsss.analysis.report: HTML structure (html.parser), embedded PNGs, no external resources."""

from __future__ import annotations

import argparse
import base64
import io
import json
from html.parser import HTMLParser

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from wsss.analysis.report import loss_svg, write_report
from wsss.commands.report import add_parser
from wsss.config import load_config, to_dict
from wsss.data.synthetic import generate_synthetic
from wsss.engine.checkpoint import export_model
from wsss.methods import build_network


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[str] = []
        self.tables: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self.tables.append({"class": a.get("class", ""), "rows": 0, "in_body": False})
        elif tag == "tbody" and self.tables:
            self.tables[-1]["in_body"] = True
        elif tag == "tr" and self.tables and self.tables[-1]["in_body"]:
            self.tables[-1]["rows"] += 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    generate_synthetic(tmp / "data", num_train=4, num_val=3, size=64, num_classes=6)
    cfg = load_config("afa_mit_tiny_synthetic", [f"data.root={tmp / 'data'}", f"out_dir={tmp / 'run'}",
                                                   "data.size=64", "eval.max_images=3"])
    run = tmp / "run"
    run.mkdir()
    torch.manual_seed(0)
    net = build_network(cfg, 5)
    names = ["background"] + [f"obj{i}" for i in range(1, 6)]
    export_model(net, {"config": to_dict(cfg), "num_classes": 6, "class_names": names}, run / "model")
    OmegaConf.save(cfg, run / "config.yaml")
    maps = {m: {"miou": 0.1 * i, "pixel_acc": 0.5, "mean_acc": 0.3, "iou": [0.1 * j for j in range(6)]}
            for i, m in enumerate(("aff", "aff_par", "cam", "cam_par", "pseudo", "seg"))}
    maps["pseudo"]["coverage"] = 0.7
    maps["_protocol"] = {"images": 3, "scales": [1.0], "flip": False, "crf": False}
    (run / "metrics.json").write_text(json.dumps({"iterations": 4, "s_per_iter": 1.0, "eval": maps}))
    hist = [{"iter": 2, "lr": 1e-4, "cls": 1.0, "s_per_iter": 1.0},
            {"iter": 4, "lr": 2e-4, "cls": 0.9, "seg": 1.7, "aff": 0.5, "s_per_iter": 1.0}]
    (run / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist) + "not json\n")
    (run / "analysis").mkdir()
    png = Image.new("RGB", (8, 6), (10, 20, 30))
    png.save(run / "analysis" / "hellinger.png")
    (run / "analysis" / "analysis.json").write_text(json.dumps({
        "layers": [3, 4], "layers_note": "layers [3, 4]", "protocol": {"images": 3},
        "hellinger": {"mean": [0.2, 0.1]}, "entropy": {"mean": [5.0, 6.0]},
        "refinement": {"layer_3": {"best_miou": 0.2, "best_threshold": 0.3},
                       "layer_4": {"best_miou": 0.25, "best_threshold": 0.4},
                       "fused": {"best_miou": 0.3, "best_threshold": 0.35},
                       "cam": {"best_miou": 0.1, "best_threshold": 0.2}},
        "oracle": {"miou": {"cam_par": 0.4, "learned_par": 0.35, "oracle_par": 0.5}},
        "plots": {"hellinger": "hellinger.png", "missing": "nope.png"}}))
    return run


def test_report_structure(run_dir):
    path = write_report(run_dir, images=2)
    text = path.read_text()
    p = _Collect()
    p.feed(text)
    ids = {a.get("id") for t, a in p.tags if t == "section"}
    assert {"config", "metrics", "curves", "images", "analysis"} <= ids
    tables = {t["class"]: t["rows"] for t in p.tables}
    assert tables["miou"] == 6  # one row per map
    assert tables["per-class"] == 6  # one row per class (background included)
    assert tables["protocol"] == 4
    assert tables["grid"] == 2  # one row per image
    assert tables["analysis"] == 4  # 2 layers + fused + cam
    assert tables["oracle"] == 3 and "learned_par" in text
    assert "obj3" in text and "aff_par" in text
    imgs = [a["src"] for t, a in p.tags if t == "img"]
    # 2 rows x (image, gt, CAM, refined, pseudo, seg) + legend + 1 analysis plot (the missing one is skipped)
    assert len(imgs) == 2 * 6 + 1 + 1
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        im.load()
        assert im.size[0] > 0
    assert sum(t == "svg" for t, _ in p.tags) == 2  # losses + learning rate
    assert sum(t == "polyline" for t, _ in p.tags) == 4  # aff, cls, seg + lr
    for tag, a in p.tags:
        for key in ("src", "href"):
            assert not str(a.get(key, "")).startswith(("http:", "https:", "//")), (tag, a)
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text and "<script" not in text and "<link" not in text


def test_report_cli_and_no_model(run_dir, tmp_path):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "r.html"
    args = parser.parse_args(["report", str(run_dir), "--out", str(out), "--images", "0"])
    assert args.fn(args) == 0 and out.is_file()
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ValueError, match="is not a wsss run folder"):
        write_report(bare, images=1)
    assert not (bare / "report.html").exists()
    (bare / "history.jsonl").write_text("")  # a run that has only started: a report of what there is
    text = write_report(bare, images=1).read_text()
    assert "no metrics.json" in text and "image grid unavailable" in text


def test_report_cli_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    from wsss import cli

    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a wsss run folder" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_resumed_history_draws_no_line_back(tmp_path):
    from wsss.analysis.report import read_history

    first = [{"iter": i, "cls": 1.0 / i} for i in (1, 2, 3, 4)]
    recs = first + [{"iter": i, "cls": 2.0 / i} for i in (3, 4, 5)]  # resumed from the checkpoint at 2
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    hist = read_history(tmp_path / "history.jsonl")
    assert [r["iter"] for r in hist] == [1, 2, 3, 4, 5]
    assert [r["cls"] for r in hist][2:] == [2.0 / 3, 2.0 / 4, 2.0 / 5]  # the resumed run's records
    points = loss_svg(hist, ["cls"], "t").split('points="')[1].split('"')[0]
    xs = [float(p.split(",")[0]) for p in points.split()]
    assert xs == sorted(xs)


def test_affinity_display_is_not_nearly_white_and_captions_are_words(run_dir):
    from wsss.analysis.plots import display_normalize

    n = 64
    aff = torch.eye(n) * 0.9 + torch.rand(n, n, generator=torch.Generator().manual_seed(0)) * 0.02
    aff = aff / aff.sum(-1, keepdim=True)  # a softmax-like affinity: a bright diagonal
    shown = display_normalize(torch.stack([aff, aff * 3]))
    assert shown.shape == (2, n, n) and float(shown.min()) == 0.0 and float(shown.max()) == 1.0
    off = ~torch.eye(n, dtype=torch.bool)
    assert float(shown[0][off].mean()) > 0.3  # min-max by the maximum: about 0.01, nearly white
    torch.testing.assert_close(shown[0], shown[1])  # each map on its own scale
    text = write_report(run_dir, images=0).read_text()
    assert "<figcaption>hellinger</figcaption>" not in text
    assert "Hellinger distance" in text and "alt=\"hellinger\"" not in text


def test_loss_svg_scaling():
    svg = loss_svg([{"iter": 0, "a": 1.0}, {"iter": 10, "a": 3.0}], ["a"], "t", width=200, height=100)
    # plot box: x 56..90, y 24..66; first point bottom-left, last top-right
    assert 'points="56.0,66.0 90.0,24.0"' in svg
    assert "no data" in loss_svg([], ["a"], "t")
