"""``wsss calibrate``: choose a run's thresholds on the images that have masks, and keep them in the run.

    wsss calibrate --checkpoint runs/mine [--split val | --masks my_masks/] [--maps cam pseudo]

Sweeps each map's background score (and the pseudo label's ``cam.high`` / ``cam.low``; for a model
without a segmentation head, the classifier's presence threshold on the training labels) with
:mod:`wsss.engine.calibrate`, prints the curves and writes ``<run>/calibration.json`` (the chosen
values, the curves, the images used). Loading the run (:func:`wsss.engine.runs.load_run`) applies
those values from then on: ``evaluate``, ``pseudo-labels``, ``predict`` and ``analyze`` use them;
dotted overrides on the command line still win.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsss.commands.common import MAX_IMAGES_HELP, max_images_arg
from wsss.engine.calibrate import (
    DEFAULT_GRID,
    choose_presence,
    classifier_scores,
    map_forwards,
    sweep_key,
    sweep_pseudo,
)
from wsss.engine.checkpoint import atomic_write_files, check_writable
from wsss.engine.evaluate import image_indices, same_size_batches, spread
from wsss.engine.runs import CALIBRATION_FILE, check_classes, open_run, run_dir_of


def calibratable(method: Any, net: Any) -> list[str]:
    """The maps of ``method`` on ``net`` whose thresholds ``calibrate`` sweeps."""
    names = method.map_names(net)
    return [m for m in method.BKG_KEYS if m in names] + (["pseudo"] if "pseudo" in names else [])


def _batches(dataset: Any, indices: list[int], batch_size: int, device: Any) -> list[dict[str, Any]]:
    """The samples at ``indices`` in same-size batches on ``device`` (image, labels, mask), in memory."""
    return [{k: b[k].to(device) for k in ("image", "labels", "mask")} | {"name": b["name"]}
            for b in same_size_batches(dataset, indices, batch_size)]


def _masked_images(cfg: Any, net: Any, checkpoint: Any, split: str, max_images: int | None,
                   masks: Path | None = None) -> tuple[Any, list[int]]:
    """(dataset of ``split``, indices of its images that have a mask, at most ``max_images``);
    ``masks``: its masks are ``<masks>/<name>.png`` instead (its image labels stay the dataset's)."""
    from wsss.data.build import build_dataset

    dataset = build_dataset(cfg.data, split=split, train=False)
    check_classes(net, dataset, checkpoint, split)
    if masks is not None:
        dataset.mask_paths = {n: (masks / f"{n}.png" if (masks / f"{n}.png").is_file() else None)
                              for n in dataset.names}
    idx = [i for i, n in enumerate(dataset.names) if dataset.mask_paths.get(n) is not None]
    if not idx:
        raise ValueError(f"no image of split {split!r} has a mask: give --masks DIR with a few (PNG, same "
                         f"stem as the image; 0 = background, 1..K classes, 255 = ignore)")
    return dataset, spread(idx, max_images)


def run_calibrate(checkpoint: str | os.PathLike, split: str | None = None, masks: str | None = None,
                  maps: Sequence[str] | None = None, overrides: Sequence[str] = (),
                  max_images: int | None = None,
                  grid: Sequence[float] | None = None, device: str | None = None, verbose: bool = True
                  ) -> dict[str, Any]:
    """Calibrate the run of ``checkpoint`` on the images of ``split`` (default: its eval split) that have
    masks (``masks``: a folder of PNGs that replaces the dataset's masks); writes and returns the record."""
    if masks and not Path(masks).is_dir():
        raise FileNotFoundError(f"--masks {masks}: no such folder")
    out = run_dir_of(checkpoint) / CALIBRATION_FILE
    check_writable(out.parent)
    cfg, net, method, names, dev = open_run(None, checkpoint, overrides, device)
    split = str(split or cfg.eval.split)
    known = calibratable(method, net)
    maps = list(maps or known)
    bad = [m for m in maps if m not in known]
    if bad:
        raise ValueError(f"--maps {' '.join(bad)}: not calibrated for this model; choose from "
                         f"{', '.join(known)}")
    dataset, idx = _masked_images(cfg, net, checkpoint, split, max_images, Path(masks) if masks else None)
    batches = _batches(dataset, idx, int(cfg.eval.batch_size), dev)
    scales, flip = [float(s) for s in cfg.eval.scales], bool(cfg.eval.flip)
    grid = [float(t) for t in (grid or DEFAULT_GRID)]
    c = int(dataset.num_classes)
    forwards = map_forwards(cfg, net, batches, maps, scales, flip)  # the network once; thresholds after it
    curves = {m: (sweep_pseudo(cfg, net, forwards, grid, c) if m == "pseudo" else
                  sweep_key(cfg, net, forwards, m, method.BKG_KEYS[m], grid, c)) for m in maps}
    values: dict[str, Any] = {}
    # a key shared by a map and its PAR-refined version takes the refined map's choice (the label
    # that pseudo-labels and the seg heads use)
    for m, cur in sorted(curves.items(), key=lambda mc: mc[0].endswith("_par")):
        values[cur["key"]] = cur["best"]
        if m == "pseudo":
            values[cur["low_key"]] = cur["best_low"]
    record = {"values": values, "split": split, "masks": str(Path(masks).resolve()) if masks else None,
              "images": [n for b in batches for n in b["name"]], "scales": scales, "flip": flip,
              "maps": curves, "checkpoint": str(Path(checkpoint).resolve())}
    if net.seg_head is None:  # predict keeps classes by the classifier: calibrate its threshold too
        record["presence"] = _presence(cfg, net, dev, grid, max_images)
        values["eval.presence"] = record["presence"]["global"]
        values["eval.presence_per_class"] = record["presence"]["per_class"]
    text = json.dumps(record, indent=2)
    atomic_write_files([(out, lambda t: Path(t).write_text(text))])
    if verbose:
        print(calibration_table(record, names))
        print(f"calibration of {len(record['images'])} images written to {out}: evaluate, pseudo-labels, "
              f"predict and analyze on this run use it from now on")
    return record


def _presence(cfg: Any, net: Any, dev: Any, grid: list[float], max_images: int | None) -> dict[str, Any]:
    """The classifier's presence threshold (:func:`choose_presence`) on the training split's labels."""
    from wsss.data.build import build_dataset

    train = build_dataset(cfg.data, split=str(cfg.data.train_split), train=False)
    idx = image_indices(train, 10 * int(max_images) if max_images else None)
    scores, labels = classifier_scores(net, _batches(train, idx, int(cfg.eval.batch_size), dev))
    return {**choose_presence(scores, labels, grid), "split": str(cfg.data.train_split), "images": len(idx)}


def calibration_table(record: dict[str, Any], names: Sequence[str]) -> str:
    """The curves as text: one row per map (key, before -> chosen, mIoU before -> after, the curve)."""
    rows = [f"calibration on {len(record['images'])} images of {record['split']}"
            + (f" (masks {record['masks']})" if record["masks"] else "")]
    for m, cur in record["maps"].items():
        curve = " ".join(f"{t:g}:{100 * v:.1f}" for t, v in zip(cur["thresholds"], cur["miou"]))
        rows.append(f"  {m}: {cur['key']} {cur['before']:g} -> {cur['best']:g}, mIoU "
                    f"{100 * cur['before_miou']:.2f} -> {100 * cur['best_miou']:.2f}   [{curve}]")
    p = record.get("presence")
    if p:
        per = ", ".join(f"{n} {t:g}" for n, t in zip(names[1:], p["per_class"]))
        rows.append(f"  presence (classifier, {p['images']} {p['split']} images): {p['global']:g} "
                    f"(F1 {p['f1_global']:.3f}; at 0.5: {p['f1_at_0.5']:.3f}); per class: {per}")
    return "\n".join(rows)


def cmd_calibrate(args: argparse.Namespace) -> int:
    run_calibrate(args.checkpoint, split=args.split, masks=args.masks, maps=args.maps,
                  overrides=args.overrides, max_images=args.max_images, grid=args.thresholds,
                  device=args.device)
    return 0


def add_parser(sub: Any) -> None:
    """Register ``calibrate`` on the ``wsss`` CLI."""
    p = sub.add_parser("calibrate", help="choose a run's thresholds on a few masks and keep them in the run")
    p.add_argument("--checkpoint", required=True, help="run dir, release dir (model/) or ckpt_*.pt")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the run's config")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--split", default=None,
                       help="the images with masks of this split (default: the run's eval.split)")
    where.add_argument("--masks", default=None,
                       help="mask PNGs for some of the eval split's images (the others are skipped)")
    p.add_argument("--maps", nargs="+", default=None, help="the maps to calibrate (default: every one)")
    p.add_argument("--max-images", type=max_images_arg, default=None,
                   help=MAX_IMAGES_HELP)
    p.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help=f"candidate values (default {DEFAULT_GRID[0]} .. {DEFAULT_GRID[-1]} by 0.05)")
    p.set_defaults(fn=cmd_calibrate)
