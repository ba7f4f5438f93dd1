"""``wsss analyze``: layer-wise attention analyses of a trained model (:mod:`wsss.analysis.analyze`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsss.analysis.analyze import analysis_lines, record_analysis, run_analysis
from wsss.analysis.loading import SquareResized
from wsss.analysis.plots import plots_available
from wsss.analysis.statistics import IOU_RULES
from wsss.commands.common import MAX_IMAGES_HELP, max_images_arg


def cmd_analyze(args: argparse.Namespace) -> int:
    from wsss.data.build import build_dataset
    from wsss.engine.runs import check_classes, open_run, run_dir_of

    cfg, net, _, _, _ = open_run(args.config, args.checkpoint, args.overrides, args.device)
    split = args.split or str(cfg.eval.get("split") or cfg.data.val_split)
    dataset = build_dataset(cfg.data, split=split, train=False)
    check_classes(net, dataset, args.checkpoint, split)
    if args.resize:
        dataset = SquareResized(dataset, args.resize)
    missing = plots_available()
    if missing:
        print(f"wsss analyze: {missing}; writing analysis.json only")
    run_dir = run_dir_of(args.checkpoint)
    out = Path(args.out) if args.out else run_dir / "analysis"
    data = run_analysis(net, cfg, dataset, out, split, args.max_images, args.batch_size, args.entropy,
                        missing is None, iou=args.iou)
    record_analysis(run_dir, out)
    print(analysis_lines(data))
    if args.entropy:
        print("paste into the AReAM training command:\n  " + data["entropy"]["override"])
    print(f"wrote {out / 'analysis.json'}")
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``wsss analyze``."""
    p = sub.add_parser("analyze", help="layer-wise attention analyses (Hellinger, entropy, refinement mIoU)")
    p.add_argument("config", nargs="?", default=None,
                   help="optional: a config whose settings replace the run's, except its data, model and "
                        "method (default: the checkpoint's run config alone)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the run's config, e.g. data.root=...")
    p.add_argument("--checkpoint", required=True, help="model/ release dir, run dir or checkpoint file")
    p.add_argument("--out", default=None,
                   help="output directory (analysis.json + PNG plots; default: the run's analysis/)")
    p.add_argument("--iou", choices=sorted(IOU_RULES), default="aream",
                   help="rule of the refinement mIoUs: aream (AReAM's evaluate.py, absent classes count as "
                        "0; default) or voc (wsss evaluate's rule); the oracle rows always use voc")
    p.add_argument("--split", default=None, help="dataset split (default: eval.split)")
    p.add_argument("--max-images", type=max_images_arg, default=None,
                   help=MAX_IMAGES_HELP)
    p.add_argument("--batch-size", type=int, default=4, help="images of equal size per forward")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--entropy", action="store_true",
                   help="also write aream_entropy.yaml (aream.entropy for aream.weighting=entropy_offline)")
    p.add_argument("--resize", type=int, default=None, metavar="N",
                   help="resize every image to N x N first, as the official entropy pass does "
                        "(224 for MCTformer, 384 for Conformer); default: the original size")
    p.set_defaults(fn=cmd_analyze)
    return p
