"""``wsss evaluate``: mIoU + per-class IoU of every label map (:func:`wsss.engine.evaluate.evaluate`), with
the protocol (split, scales, flip, CRF, checkpoint, images, thresholds) stated in the JSON and the table;
on top of the inference layer (:mod:`wsss.engine.evaluate`) and the run loader (:mod:`wsss.engine.runs`).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsss.commands.common import (
    MAX_IMAGES_HELP,
    add_checkpoint_args,
    add_loading_args,
    calibration_note,
    check_map_names,
    config_note,
    crf_guard,
    loading_options,
    max_images_arg,
    overrides_note,
    write_json,
)
from wsss.engine.runs import check_classes, open_run, run_dir_of

SWEEP_MOVED = ("the background sweep of `wsss evaluate` is now `wsss calibrate --checkpoint {checkpoint} "
               "[--split S]`: it sweeps every map's background score (and the pseudo label's high / low) on "
               "the images with masks and keeps the best values in the run, which `wsss evaluate` then uses")


def run_evaluate(
    config: str | os.PathLike | None, checkpoint: str | os.PathLike, overrides: Sequence[str] = (),
    split: str | None = None, out: str | os.PathLike | None = None, **opts: Any,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``split`` with the protocol of its run's eval section (or of
    ``config``'s, when one is named; :func:`_setup`).

    opts: scales (list), flip (bool), crf (bool), max_images (int), device (str),
    maps (the only names computed and kept), batch_size, num_workers (int), print_table (bool, default
    True). None = the config's value. ``sweep`` (or ``eval.sweep: true``) is an error that names
    ``wsss calibrate``, which replaced the background sweep (:data:`SWEEP_MOVED`).
    Writes the results to ``out`` (default ``<run>/eval_<split>.json``) and returns them.
    """
    from wsss.data.build import build_dataset
    from wsss.engine.evaluate import evaluate

    if opts.get("sweep"):
        raise ValueError(f"--sweep: {SWEEP_MOVED.format(checkpoint=checkpoint)}")
    cfg, net, method, names, dev = open_run(config, checkpoint, overrides, opts.get("device"))
    if opts.get("maps"):  # 'pseudo_strict' is the 'pseudo' map scored another way
        strict = ["pseudo_strict"] if "pseudo" in method.map_names(net) else []
        check_map_names(opts["maps"], method, net, "--maps", strict)
    ev = cfg.eval
    if ev.sweep:
        raise ValueError(f"eval.sweep=true: {SWEEP_MOVED.format(checkpoint=checkpoint)}; set it false")
    split = str(split or ev.split)
    scales = [float(s) for s in (opts.get("scales") or ev.scales)]
    flip = bool(ev.flip if opts.get("flip") is None else opts["flip"])
    crf = bool(ev.crf if opts.get("crf") is None else opts["crf"])
    max_images = opts.get("max_images") if opts.get("max_images") is not None else ev.max_images
    dataset = build_dataset(cfg.data, split=split, train=False)
    check_classes(net, dataset, checkpoint, split)
    t0 = time.time()
    loading = loading_options(ev, opts.get("batch_size"), opts.get("num_workers"))
    res = evaluate(method, net, dataset, int(dataset.num_classes), dev, scales=scales, flip=flip,
                   max_images=max_images, crf=crf, maps=opts.get("maps") or None, **loading)
    keep = opts.get("maps")
    if keep:
        res = {k: v for k, v in res.items() if k.startswith("_") or k in keep}
    class_names = list(dataset.class_names)
    for k, v in res.items():
        if not k.startswith("_") and "iou" in v:
            v["per_class"] = {n: (None if x != x else x) for n, x in zip(class_names, v["iou"])}
    res["_protocol"].update({
        "split": split, "checkpoint": str(Path(checkpoint).resolve()),
        "config": config_note(config),
        "overrides": overrides_note(config, overrides), "bkg_score": float(ev.bkg_score),
        "aff_bkg_score": float(ev.aff_bkg_score),
        "iou": "voc (mean over classes present in the ground truth)", "seconds": time.time() - t0,
        "image_labels": "ground truth (for the CAM / pseudo-label maps)", "class_names": class_names,
        "images_per_s": res["_protocol"]["images"] / max(time.time() - t0, 1e-9), **loading,
        "calibration": calibration_note(checkpoint),
    })
    out_path = Path(out) if out is not None else run_dir_of(checkpoint) / f"eval_{split}.json"
    write_json(out_path, res)
    if opts.get("print_table", True):
        print(format_results(res, class_names, focus=_focus_map(method, res)))
        print(f"results written to {out_path}")
    return res


def _focus_map(method: Any, res: dict[str, Any]) -> str | None:
    """The map whose mistakes evaluate prints: the method's pseudo label, else its seg head's map."""
    for name in (method.PSEUDO_MAP, "seg"):
        if name in res:
            return name
    return None


def mistakes_table(res: dict[str, Any], class_names: Sequence[str], name: str) -> str:
    """Each class's most frequent mistake in map ``name``: the class its pixels are labelled as most
    often after its own, and the share of its pixels that takes (classes without ground-truth pixels
    left out)."""
    r = res[name]
    lines = [f"most frequent mistake per class ({name}):", "",
             "| class | IoU | most often labelled as | share of its pixels |", "|---|---:|---|---:|"]
    for c, cname in enumerate(class_names):
        share, other = r["mistaken_share"][c], r["mistaken_for"][c]
        if share is None:  # no pixel of the class in the ground truth
            continue
        wrong = "-" if other is None else class_names[other]
        lines.append(f"| {cname} | {100 * r['iou'][c]:.2f} | {wrong} | {100 * share:.1f}% |")
    return "\n".join(lines)


def format_results(res: dict[str, Any], class_names: Sequence[str], focus: str | None = None) -> str:
    """The protocol lines, a mIoU table of every map, the per-class IoU table and, for map ``focus``,
    each class's most frequent mistake (:func:`mistakes_table`)."""
    from wsss.engine.evaluate import miou_table

    p = res["_protocol"]
    lines = [
        f"checkpoint: {p.get('checkpoint')}",
        f"split: {p.get('split')}  images: {p['images']}  scales: {p['scales']}  flip: {p['flip']}  "
        f"CRF: {p['crf'] or 'off'}",
        f"CAM background score: {p.get('bkg_score')}  affinity background score: {p.get('aff_bkg_score')}  "
        f"image labels: ground truth  IoU: {p.get('iou')}",
    ]
    lines += ["", miou_table(res)]
    maps = [k for k in res if not k.startswith("_")]
    if maps:
        lines += ["", "| class | " + " | ".join(maps) + " |", "|---|" + "---:|" * len(maps)]
        for c, name in enumerate(class_names):
            cells = []
            for m in maps:
                v = res[m]["iou"][c]
                cells.append("-" if v != v else f"{100 * v:.2f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if focus is not None and "mistaken_for" in res.get(focus, {}):
        lines += ["", mistakes_table(res, class_names, focus)]
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    run_evaluate(args.config, args.checkpoint, args.overrides, split=args.split, out=args.out,
                 scales=args.scales, flip=args.flip, crf=args.crf or None, sweep=args.sweep or None,
                 max_images=args.max_images, device=args.device, maps=args.maps,
                 batch_size=args.batch_size, num_workers=args.workers)
    return 0



def add_parser(sub: Any) -> None:
    """Register ``evaluate`` on the ``wsss`` CLI."""
    p = sub.add_parser("evaluate", help="mIoU + per-class IoU of every label map of a checkpoint")
    add_checkpoint_args(p)
    p.add_argument("--split", default=None, help="default: the config's eval.split")
    p.add_argument("--crf", action="store_true", help="dense CRF on the segmentation map (AFA test preset)")
    p.add_argument("--sweep", action="store_true",
                   help="replaced by `wsss calibrate` (an error that says how to call it)")
    p.add_argument("--max-images", type=max_images_arg, default=None,
                   help=MAX_IMAGES_HELP)
    p.add_argument("--maps", nargs="+", default=None,
                   help="compute and report only these maps (default: all)")
    p.add_argument("--out", default=None, help="results JSON (default: <run>/eval_<split>.json)")
    add_loading_args(p)
    p.set_defaults(fn=crf_guard(cmd_evaluate))
