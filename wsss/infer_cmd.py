"""Inference commands: ``wsss evaluate`` and ``wsss pseudo-labels`` (predict: :mod:`wsss.predict_cmd`), on top
of the inference layer (:mod:`wsss.engine.evaluate`) and the run loader (:mod:`wsss.engine.runs`).

* evaluate: mIoU + per-class IoU of every label map (:func:`wsss.engine.evaluate.evaluate`), with the
  protocol (split, scales, flip, CRF, checkpoint, images, thresholds) stated in the JSON and the table.
* pseudo-labels: one VOC-palette PNG per image (same stem as the image), resumable (readable PNGs are
  skipped, each PNG is written atomically), optional stride-s float16 logits (``.npz``), a summary JSON,
  and ``class_names.json`` (what the indices mean; a second stage's ``data.pseudo_dir`` checks it).
  The dataset's ground-truth image labels are used, as WSSS pseudo-label generation does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.data.io import load_mask, save_mask
from wsss.engine.checkpoint import atomic_write_files, check_writable
from wsss.engine.evaluate import label_and_scores
from wsss.engine.runs import check_classes, open_run, read_calibration, run_dir_of
from wsss.methods import all_map_names, config_sections
from wsss.refine.crf import CRFUnavailableError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


def config_note(config: str | os.PathLike | None) -> str:
    """Where a command's settings came from, for its JSON output."""
    from wsss.config import split_config_arg

    named = split_config_arg(None if config is None else str(config), [])[0]
    return "the run's config" + ("" if named is None else f" + {named} (all but data, model, method)")


def calibration_note(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The values ``wsss calibrate`` set for the run of ``checkpoint`` (in effect unless overridden),
    its file and the number of images it used; None when the run was not calibrated."""
    rec = read_calibration(checkpoint)
    if rec is None:
        return None
    return {"file": rec["file"], "values": rec["values"], "images": len(rec.get("images", []))}


def loading_options(ev: Any, batch_size: int | None, num_workers: int | None) -> dict[str, int]:
    """{batch_size, num_workers} of evaluate / pseudo-labels: the given values, else the config's eval
    section's; a bad value is an error before anything is read or written."""
    given = {"batch_size": batch_size, "num_workers": num_workers}
    out = {k: int(ev[k] if v is None else v) for k, v in given.items()}
    if out["batch_size"] < 1 or out["num_workers"] < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {out['batch_size']} and "
                         f"{out['num_workers']}")
    return out


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temp file beside ``path`` (same suffix, for format detection), then rename it
    onto ``path``: an interrupted run never leaves a half-written file under the final name."""
    atomic_write_files([(path, write)])


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda t: Path(t).write_text(json.dumps(obj, indent=2)))


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


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
        "overrides": list(overrides), "bkg_score": float(ev.bkg_score),
        "aff_bkg_score": float(ev.aff_bkg_score),
        "iou": "voc (mean over classes present in the ground truth)", "seconds": time.time() - t0,
        "image_labels": "ground truth (for the CAM / pseudo-label maps)", "class_names": class_names,
        "images_per_s": res["_protocol"]["images"] / max(time.time() - t0, 1e-9), **loading,
        "calibration": calibration_note(checkpoint),
    })
    out_path = Path(out) if out is not None else run_dir_of(checkpoint) / f"eval_{split}.json"
    _write_json(out_path, res)
    if opts.get("print_table", True):
        print(format_results(res, class_names))
        print(f"results written to {out_path}")
    return res


def format_results(res: dict[str, Any], class_names: Sequence[str]) -> str:
    """The protocol lines, a mIoU table of every map and the per-class IoU table."""
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
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# pseudo-labels
# ---------------------------------------------------------------------------------------------


def _readable(path: Path) -> bool:
    """True when ``path`` exists and decodes (a PNG, or an ``.npz`` holding 'logits')."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                z["logits"]
        else:
            with Image.open(path) as im:
                im.load()
    except Exception:
        return False
    return True


def downscale(scores: torch.Tensor, stride: int) -> torch.Tensor:
    """(C, H, W) -> (C, ceil(H/s), ceil(W/s)) by bilinear resizing (antialiased when shrinking)."""
    h, w = scores.shape[-2:]
    size = (-(-h // stride), -(-w // stride))
    if size == (h, w):
        return scores
    return F.interpolate(scores[None].float(), size=size, mode="bilinear", align_corners=False,
                         antialias=True)[0]


MANIFEST = "manifest.json"


def weights_digest(net: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes, shapes and values; the file format does not matter)."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def claim_out_dir(out_dir: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Make ``out_dir`` the folder of the pseudo labels that ``manifest`` describes (model weights, map,
    settings). Label files already there are reused only when its manifest is the same; files of another
    model, map or setting (or of unknown origin) are an error naming what differs, unless ``overwrite``
    (then every label is written again). The manifest is written before any label."""
    path = out_dir / MANIFEST
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is an existing file, not a folder")
    old: dict[str, Any] | None = None
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
    check_writable(out_dir)
    labels_there = out_dir.is_dir() and any(out_dir.glob("*.png"))
    if not overwrite and (old is not None or labels_there) and old != manifest:
        if old is None:
            why = "label PNGs without a manifest (written by something else)"
        else:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            why = f"pseudo labels of other settings (differing: {', '.join(diff)})"
        raise ValueError(f"--out {out_dir} holds {why}: choose another folder, or pass --overwrite to "
                         f"write every label again")
    _write_json(path, manifest)


def _label_done(out_dir: Path, name: str, logits: bool) -> bool:
    """Whether ``<name>.png`` (and, with ``logits``, ``<name>.npz``) is in ``out_dir`` and readable."""
    return _readable(out_dir / f"{name}.png") and (not logits or _readable(out_dir / f"{name}.npz"))


def _write_label(out_dir: Path, name: str, label: torch.Tensor, scores: torch.Tensor | None, stride: int,
                 map_name: str) -> np.ndarray:
    """Write ``<name>.png`` (and ``<name>.npz`` with the stride-``stride`` float16 scores when given)
    atomically; returns the label map (H, W) uint8."""
    lab = label.cpu().numpy().astype(np.uint8)
    _atomic_write(out_dir / f"{name}.png", lambda t: save_mask(t, lab))
    if scores is not None:
        small = downscale(scores, stride).half().cpu().numpy()
        kind = "seg_logits" if map_name == "seg" else "cam"
        arrays = {"logits": small, "size": np.asarray(lab.shape), "stride": np.asarray(stride),
                  "kind": np.asarray(kind)}
        _atomic_write(out_dir / f"{name}.npz", lambda t: np.savez_compressed(t, **arrays))
    return lab


def run_pseudo_labels(config: str | os.PathLike | None, checkpoint: str | os.PathLike,
                      overrides: Sequence[str], split: str, out: str | os.PathLike, map_name: str = "pseudo",
                      logits: bool = False, logit_stride: int = 4, scales: Sequence[float] | None = None,
                      flip: bool | None = None, max_images: int | None = None, device: str | None = None,
                      verbose: bool = True, overwrite: bool = False, batch_size: int | None = None,
                      num_workers: int | None = None) -> dict[str, Any]:
    """Write ``<out>/<name>.png`` for every image of ``split`` (resumable: labels of the same model and
    settings, per ``<out>/manifest.json``, are kept); returns the summary. ``overwrite``: write every
    label again, whatever the folder holds. batch_size / num_workers: images of one size per forward
    and DataLoader workers (default: the config's eval.batch_size / eval.num_workers).

    Only ``map_name`` is computed. Where the split has ground-truth masks, the written labels (and
    those already present) are scored against them: uncertain pixels (255) left out, with the
    coverage, and counted as wrong (``summary["scores"]``).
    """
    from wsss.config import to_dict
    from wsss.data.build import PSEUDO_CLASSES_FILE, build_dataset
    from wsss.engine.evaluate import num_images, same_size_batches

    cfg, net, method, names, dev = open_run(config, checkpoint, overrides, device)
    if map_name not in method.map_names(net):
        raise ValueError(f"--map {map_name}: method {method.name} with this model produces "
                         f"{', '.join(method.map_names(net))}")
    scales_l = [float(s) for s in (scales or cfg.eval.scales)]
    flip_b = bool(cfg.eval.flip if flip is None else flip)
    stride = int(logit_stride)
    if stride < 1:
        raise ValueError(f"--logit-stride must be >= 1, got {stride}")
    loading = loading_options(cfg.eval, batch_size, num_workers)
    dataset = build_dataset(cfg.data, split=split, train=False)
    check_classes(net, dataset, checkpoint, split)
    out_dir = Path(out)
    c = to_dict(cfg)
    manifest = {"weights_sha256": weights_digest(net), "map": map_name, "scales": scales_l, "flip": flip_b,
                "logit_stride": stride if logits else None, "method": c["method"],
                "settings": {k: c[k] for k in ("cam", "par", *sorted(config_sections()))},
                "eval_bkg_score": c["eval"]["bkg_score"], "aff_bkg_score": c["eval"]["aff_bkg_score"]}
    claim_out_dir(out_dir, manifest, overwrite)
    _write_json(out_dir / PSEUDO_CLASSES_FILE, list(dataset.class_names))  # what the PNGs' indices mean
    n = num_images(dataset, max_images)
    written, counts = 0, np.zeros(256, dtype=np.int64)
    scorer = LabelScorer(int(dataset.num_classes))
    t0 = time.time()
    pending = [idx for idx in range(n) if overwrite or not _label_done(out_dir, dataset.names[idx], logits)]
    skipped = n - len(pending)
    scorer.update_existing(dataset, sorted(set(range(n)) - set(pending)), out_dir)
    for batch in same_size_batches(dataset, pending, loading["batch_size"], loading["num_workers"]):
        label_b, scores_b = label_and_scores(method, net, batch["image"].to(dev), batch["labels"].to(dev),
                                              map_name, scales_l, flip_b, logits)
        scorer.update(label_b.cpu(), batch["mask"])
        for i, name in enumerate(batch["name"]):
            lab = _write_label(out_dir, name, label_b[i], scores_b[i] if logits else None, stride, map_name)
            counts += np.bincount(lab.reshape(-1), minlength=256)
            written += 1
            if verbose and written % 50 == 0:
                print(f"pseudo-labels: {written + skipped}/{n}", file=sys.stderr)
    summary = {
        "split": split, "map": map_name, "images": n, "written": written, "skipped_existing": skipped,
        "checkpoint": str(Path(checkpoint).resolve()), "config": config_note(config),
        "overrides": list(overrides),
        "scales": scales_l, "flip": flip_b, "image_labels": "ground truth", "ignore_value": 255,
        "bkg_score": float(cfg.eval.bkg_score), "high": float(cfg.cam.high), "low": float(cfg.cam.low),
        "calibration": calibration_note(checkpoint),
        "logits": ({"stride": stride, "dtype": "float16",
                    "kind": "seg_logits" if map_name == "seg" else "cam (K, h, w) in [0, 1], masked"}
                   if logits else None),
        "class_names": list(dataset.class_names),
        "pixels_written": {str(i): int(c) for i, c in enumerate(counts) if c},
        "scores": scorer.compute(),
        "seconds": time.time() - t0, "images_per_s": written / max(time.time() - t0, 1e-9),
        **loading,
    }
    _write_json(out_dir / "summary.json", summary)
    if verbose:
        print(f"pseudo-labels ({map_name}, {split}): {written} written, {skipped} already present "
              f"-> {out_dir}")
        if summary["scores"] is not None:
            print(format_label_scores(summary["scores"], split))
    return summary


class LabelScorer:
    """mIoU (evaluate's rule) of label maps with 255 = uncertain against ground-truth masks, both ways:
    uncertain pixels left out (with the coverage: the labelled share of valid ground-truth pixels)
    and counted as wrong. Images without a mask (all 255) add nothing."""

    def __init__(self, num_classes: int) -> None:
        from wsss.engine.metrics import ConfusionMatrix

        self.left_out = ConfusionMatrix(num_classes)
        self.wrong = ConfusionMatrix(num_classes)
        self.labelled, self.valid = 0, 0

    def update(self, label: torch.Tensor, gt: torch.Tensor) -> None:
        """label, gt: (H, W) or (B, H, W) integer maps of one shape."""
        from wsss.engine.evaluate import leave_out_uncertain

        label, gt = label.long(), gt.long()
        self.wrong.update(label, gt)
        pred, target, counts = leave_out_uncertain(label, gt)
        self.left_out.update(pred, target)
        self.labelled, self.valid = self.labelled + int(counts[0]), self.valid + int(counts[1])

    def update_existing(self, dataset: Any, indices: Sequence[int], out_dir: Path) -> None:
        """Score the labels ``<out_dir>/<name>.png`` already written for the samples at ``indices``."""
        k = int(dataset.num_classes)
        for idx in indices:
            png = out_dir / f"{dataset.names[idx]}.png"
            self.update(torch.from_numpy(load_mask(png, k)), dataset[idx]["mask"])

    def compute(self) -> dict[str, Any] | None:
        """None without ground truth, else miou_left_out, miou_wrong, coverage, per-class IoU lists."""
        if self.valid == 0:
            return None
        a, b = self.left_out.compute(), self.wrong.compute()
        return {"miou_uncertain_left_out": a["miou"], "miou_uncertain_wrong": b["miou"],
                "coverage": self.labelled / self.valid, "iou_uncertain_left_out": a["iou"],
                "iou_uncertain_wrong": b["iou"],
                "rule": "voc (mean over classes present in the ground truth)"}


def format_label_scores(scores: dict[str, Any], split: str) -> str:
    """One line: both mIoUs and the coverage of written labels."""
    return (f"scored against the {split} ground truth: mIoU {100 * scores['miou_uncertain_left_out']:.2f} "
            f"with uncertain (255) pixels left out (coverage {100 * scores['coverage']:.2f}%), "
            f"{100 * scores['miou_uncertain_wrong']:.2f} with them counted as wrong")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def crf_guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except CRFUnavailableError as err:
            print(f"wsss {args.command}: error: {err}", file=sys.stderr)
            return 2

    return run


def cmd_evaluate(args: argparse.Namespace) -> int:
    run_evaluate(args.config, args.checkpoint, args.overrides, split=args.split, out=args.out,
                 scales=args.scales, flip=args.flip, crf=args.crf or None, sweep=args.sweep or None,
                 max_images=args.max_images, device=args.device, maps=args.maps,
                 batch_size=args.batch_size, num_workers=args.workers)
    return 0


def cmd_pseudo_labels(args: argparse.Namespace) -> int:
    run_pseudo_labels(args.config, args.checkpoint, args.overrides, args.split, args.out, map_name=args.map,
                      logits=args.logits, logit_stride=args.logit_stride, scales=args.scales, flip=args.flip,
                      max_images=args.max_images, device=args.device, overwrite=args.overwrite,
                      batch_size=args.batch_size, num_workers=args.workers)
    return 0


def add_checkpoint_args(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("config", nargs="?", default=None,
                       help="optional: a config whose settings replace the run's, except its data, model "
                            "and method (default: the checkpoint's run config alone)")
        p.add_argument("overrides", nargs="*", help="dotted overrides of the run's config, e.g. "
                                                    "eval.max_images=50 or data.root=/other/VOC2012")
    p.add_argument("--checkpoint", required=True,
                   help="release dir (model/), run dir or training checkpoint ckpt_*.pt")
    p.add_argument("--scales", type=float, nargs="+", default=None, help="default: the config's eval.scales")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="flip augmentation (default: the config's eval.flip)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")


def _loading(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=None,
                   help="images of one size per forward (default: the config's eval.batch_size)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers reading images (default: the config's eval.num_workers)")


def add_parsers(sub: Any) -> None:
    """Register ``evaluate`` and ``pseudo-labels`` on the ``wsss`` CLI."""
    p = sub.add_parser("evaluate", help="mIoU + per-class IoU of every label map of a checkpoint")
    add_checkpoint_args(p)
    p.add_argument("--split", default=None, help="default: the config's eval.split")
    p.add_argument("--crf", action="store_true", help="dense CRF on the segmentation map (AFA test preset)")
    p.add_argument("--sweep", action="store_true",
                   help="replaced by `wsss calibrate` (an error that says how to call it)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--maps", nargs="+", default=None,
                   help="compute and report only these maps (default: all)")
    p.add_argument("--out", default=None, help="results JSON (default: <run>/eval_<split>.json)")
    _loading(p)
    p.set_defaults(fn=crf_guard(cmd_evaluate))

    p = sub.add_parser("pseudo-labels", help="write pseudo-label PNGs (VOC palette) for multi-stage training")
    add_checkpoint_args(p)
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--map", default="pseudo", choices=all_map_names(),
                   help="label map to write: pseudo (255 = uncertain), a method's own maps (its "
                        "PSEUDO_MAP: the refined CAM after PAR), cam_par, seg, ...")
    p.add_argument("--logits", action="store_true", help="also write <name>.npz with float16 scores")
    p.add_argument("--logit-stride", type=int, default=4, help="downscale factor of the saved scores")
    p.add_argument("--overwrite", action="store_true",
                   help="write every label again (--out holds labels of another model, map or setting)")
    p.add_argument("--max-images", type=int, default=None)
    _loading(p)
    p.set_defaults(fn=crf_guard(cmd_pseudo_labels))
