"""``make demo``: the whole job on the built-in synthetic set, on a CPU, in minutes.

1. generate the synthetic VOC-layout dataset (once);
2. train the CAM baseline, AFA, AReAM and the fully supervised upper bound with the small configs;
   after AFA, the second stage of the multi-stage recipe: AFA's pseudo labels (``aff_par``) on the
   train split, then a segmentation network trained on them (``second_stage_mit_tiny_synthetic``);
3. evaluate each (CAM, refined CAM, pseudo label, segmentation head) on the validation split;
4. for AFA and AReAM, ``wsss analyze`` on part of the validation split: attention statistics and the
   refinement with the model's own affinity against a perfect one from the ground truth
   (:mod:`wsss.analysis.affinity`), which tells whether the affinity is what holds a method back;
5. print the mIoU table and write ``summary.json`` / ``summary.md`` and the HTML reports.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from wsss.analysis.analyze import oracle_summary
from wsss.config import load_config

DEMO_CONFIGS = {
    "cam": "cam_mit_tiny_synthetic",
    "afa": "afa_mit_tiny_synthetic",
    "second_stage": "second_stage_mit_tiny_synthetic",  # on AFA's pseudo labels: runs after "afa"
    "aream": "aream_mit_tiny_synthetic",
    "supervised": "supervised_mit_tiny_synthetic",
}
# The label map that each method's pseudo labels come from (its refined, PAR-processed CAM).
PSEUDO_MAP = {"cam": "cam_par", "afa": "aff_par", "aream": "refined_par", "supervised": None,
              "second_stage": None}
SECOND_STAGE_FROM = "afa"  # the method whose pseudo labels (its PSEUDO_MAP) the second stage learns
ANALYZED = ("afa", "aream")  # methods whose affinity the demo compares with a perfect one
ANALYSIS_IMAGES = 50


def analyze_run(cfg: Any, run_dir: Path, max_images: int) -> dict[str, Any]:
    """``wsss analyze`` of a finished run into ``run_dir/analysis`` (plots when matplotlib is there)."""
    from wsss.analysis.analyze import load_model, plots_available, run_analysis
    from wsss.data.build import build_dataset

    net, cfg, _ = load_model(run_dir / "model", cfg)
    split = str(cfg.eval.get("split") or cfg.data.val_split)
    dataset = build_dataset(cfg.data, split=split, train=False)
    return run_analysis(net, cfg, dataset, run_dir / "analysis", split, max_images,
                        plots=plots_available() is None)


def write_stage_labels(out: Path, method: str) -> dict[str, Any]:
    """``wsss pseudo-labels`` of the demo's finished ``method`` run on the train split (its PSEUDO_MAP)
    into ``<run>/pseudo_train``; returns the folder, the map, the minutes and the scores."""
    from wsss.engine.infer import run_pseudo_labels

    run_dir = out / method
    if not (run_dir / "model").is_dir():
        raise FileNotFoundError(f"the second stage needs the trained {method} run first ({run_dir})")
    t0 = time.time()
    map_name = PSEUDO_MAP[method] or "pseudo"
    s = run_pseudo_labels(None, run_dir / "model", [], "train", run_dir / "pseudo_train", map_name=map_name,
                          verbose=False)
    return {"dir": str(run_dir / "pseudo_train"), "map": map_name, "from": method,
            "minutes": (time.time() - t0) / 60, "scores": s["scores"]}


def run_demo(
    out: str | Path = "runs/demo", quick: bool = False, methods: list[str] | None = None
) -> dict[str, Any]:
    from wsss.engine.train import train

    out = Path(out)
    data_root = out / "data"
    summary: dict[str, Any] = {}
    for method in methods or list(DEMO_CONFIGS):
        overrides = [f"data.root={data_root}", f"out_dir={out / method}", f"name={method}"]
        labels = None
        if method == "second_stage":
            labels = write_stage_labels(out, SECOND_STAGE_FROM)
            overrides.append(f"data.pseudo_dir={labels['dir']}")
        if quick:
            overrides += [
                "train.max_iters=4",
                "train.log_every=2",
                "data.num_train=16",  # the second stage needs pseudo labels of every train image
                "data.num_val=8",
                "eval.max_images=4",
                "afa.warmup_iters=1",
                "afa.switch_iter=2",
                "aream.warmup_iters=1",
            ]
        cfg = load_config(DEMO_CONFIGS[method], overrides)
        t0 = time.time()
        results = train(cfg)
        pseudo_key = PSEUDO_MAP[method]
        summary[method] = {
            "config": DEMO_CONFIGS[method],
            "minutes": (time.time() - t0) / 60,
            "pseudo_miou": results[pseudo_key]["miou"] if pseudo_key in results else None,
            "seg_miou": results["seg"]["miou"] if "seg" in results else None,
            "maps": {k: v["miou"] for k, v in results.items() if isinstance(v, dict) and "miou" in v},
        }
        if labels is not None:
            summary[method]["train_labels"] = labels
        if method in ANALYZED:
            data = analyze_run(cfg, out / method, 4 if quick else ANALYSIS_IMAGES)
            summary[method]["oracle"] = data.get("oracle")
    table = summary_table(summary)
    print(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(table + "\n")
    try:
        from wsss.analysis.report import write_report
    except ImportError:
        return summary
    for method in summary:
        write_report(out / method)
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    rows = [
        "| method | config | pseudo-label mIoU | seg mIoU | CAM mIoU | minutes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for m, s in summary.items():
        rows.append(
            f"| {m} | {s['config']} | {pct(s['pseudo_miou'])} | {pct(s['seg_miou'])} | "
            f"{pct(s['maps'].get('cam'))} | {s['minutes']:.1f} |"
        )
    notes = [f"- {m}: {oracle_summary(s['oracle'])}" for m, s in summary.items() if s.get("oracle")]
    for m, s in summary.items():
        lab = s.get("train_labels")
        if lab:
            sc = lab["scores"]
            rows.append(f"\n{m}: a segmentation network trained on {lab['from']}'s {lab['map']} pseudo "
                        f"labels of the train split (their train mIoU {pct(sc['miou_uncertain_left_out'])}, "
                        f"written in {lab['minutes']:.1f} min)")
    if notes:
        head = f"Refinement with the model's affinity vs a perfect one (<= {ANALYSIS_IMAGES} val images):"
        rows += ["", head, *[n.replace("\n", "; ") for n in notes]]
    return "\n".join(rows)
