"""``make demo``: the whole job on the built-in synthetic set, on a CPU, in minutes.

1. generate the synthetic VOC-layout dataset (once);
2. train the CAM baseline, AFA, AReAM and the fully supervised upper bound with the small configs;
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

# The demo's backbones: "hybrid" (default; ImageNet-pretrained EfficientNet-Lite0 + transformer
# blocks, needs the `pretrained` extra) and "scratch" (a MiT trained from scratch, no download).
DEMO_BACKBONES = {"hybrid": "hybrid_lite0", "scratch": "mit_tiny"}
DEMO_METHODS = ("cam", "afa", "aream", "supervised")


def demo_configs(backbone: str = "hybrid") -> dict[str, str]:
    """method -> shipped config name of the demo on ``backbone`` ("hybrid" or "scratch")."""
    if backbone not in DEMO_BACKBONES:
        raise ValueError(f"demo backbone must be one of {sorted(DEMO_BACKBONES)}, got {backbone!r}")
    return {m: f"{m}_{DEMO_BACKBONES[backbone]}_synthetic" for m in DEMO_METHODS}


# The label map that each method's pseudo labels come from (its refined, PAR-processed CAM).
PSEUDO_MAP = {"cam": "cam_par", "afa": "aff_par", "aream": "refined_par", "supervised": None}
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


def run_demo(
    out: str | Path = "runs/demo", quick: bool = False, methods: list[str] | None = None,
    backbone: str = "hybrid", resume: bool = False, overwrite: bool = False,
) -> dict[str, Any]:
    """The demo into ``out``. ``resume``: methods whose run finished (``model/`` and ``metrics.json``)
    are kept, an interrupted one continues from its newest checkpoint; ``overwrite``: every method
    is trained again. Without either, an ``out`` that holds a method's run is an error."""
    from wsss.engine.train import RUN_FILES, train

    configs = demo_configs(backbone)
    if backbone == "hybrid":
        from wsss.backbones.efficientnet import weights_path

        weights_path()  # fails before any training when the weights package is missing
    out = Path(out)
    data_root = out / "data"
    summary: dict[str, Any] = {}
    methods = list(methods or configs)
    unknown = [m for m in methods if m not in configs]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; choose from {', '.join(configs)}")
    used = [m for m in methods if any((out / m / n).exists() for n in RUN_FILES)]
    if used and not (resume or overwrite):  # checked before any method trains
        raise ValueError(f"{out} already holds demo runs ({', '.join(used)}): pass --resume to keep them "
                         f"and continue, --overwrite to train them again, or choose another --out")
    for method in methods:
        overrides = [f"data.root={data_root}", f"out_dir={out / method}", f"name={method}"]
        if quick:
            overrides += [
                "train.max_iters=4",
                "train.log_every=2",
                "eval.max_images=4",
                "afa.warmup_iters=1",
                "afa.switch_iter=2",
                "aream.warmup_iters=1",
            ]
        cfg = load_config(configs[method], overrides)
        t0 = time.time()
        done = out / method / "metrics.json"
        if resume and done.is_file() and (out / method / "model").is_dir():
            results = json.loads(done.read_text())["eval"]  # finished before: keep it
            print(f"demo: {method} already trained in {out / method} (--resume)")
        else:
            results = train(cfg, resume=resume, overwrite=overwrite)
        pseudo_key = PSEUDO_MAP[method]
        summary[method] = {
            "config": configs[method],
            "minutes": (time.time() - t0) / 60,
            "pseudo_miou": results[pseudo_key]["miou"] if pseudo_key in results else None,
            "seg_miou": results["seg"]["miou"] if "seg" in results else None,
            "maps": {k: v["miou"] for k, v in results.items() if isinstance(v, dict) and "miou" in v},
        }
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
    if notes:
        head = f"Refinement with the model's affinity vs a perfect one (<= {ANALYSIS_IMAGES} val images):"
        rows += ["", head, *[n.replace("\n", "; ") for n in notes]]
    return "\n".join(rows)
