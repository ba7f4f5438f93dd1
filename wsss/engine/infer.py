"""Inference commands: ``wsss evaluate``, ``wsss pseudo-labels`` and ``wsss predict``.

* evaluate: mIoU + per-class IoU of every label map (:func:`wsss.engine.evaluate.evaluate`), with the
  protocol (split, scales, flip, CRF, checkpoint, images, thresholds) stated in the JSON and the table.
* pseudo-labels: one VOC-palette PNG per image (same stem as the image), resumable (readable PNGs are
  skipped, each PNG is written atomically), optional stride-s float16 logits (``.npz``), a summary JSON.
  The dataset's ground-truth image labels are used, as WSSS pseudo-label generation does.
* predict: mask PNG, colour overlay PNG and a JSON (present classes, scores) per image file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.data.io import DataError, load_image, load_mask, save_mask
from wsss.refine.crf import CRFUnavailableError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")
PSEUDO_MAPS = ("pseudo", "aff_par", "refined_par", "cam_par", "cam", "aff", "refined", "seg")


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_dir_of(checkpoint: str | os.PathLike) -> Path:
    """The run directory of a release dir (``<run>/model``), run dir or checkpoint file."""
    p = Path(checkpoint).resolve()
    if p.is_file():
        p = p.parent
    if p.name in ("model", "checkpoints"):
        return p.parent
    return p


def _setup(config: str | os.PathLike | None, checkpoint: str | os.PathLike, overrides: Sequence[str],
           device: str | None) -> tuple[Any, Any, Any, list[str], torch.device]:
    """(cfg, net on device, method, class names, device): the checkpoint's weights and its run's config
    (data, classes, method, model), with ``config``'s other settings and the overrides on top
    (:func:`wsss.config.run_config`)."""
    from wsss.config import run_config, split_config_arg
    from wsss.engine.distributed import set_threads
    from wsss.hub import load_run
    from wsss.methods import build_method

    config, overrides = split_config_arg(None if config is None else str(config), overrides)
    net, run_cfg, names = load_run(checkpoint)
    cfg = run_config(run_cfg, config, overrides)
    set_threads(cfg.get("threads"))
    dev = _device(device)
    net = net.to(dev).eval()
    return cfg, net, build_method(cfg, net), names, dev


def config_note(config: str | os.PathLike | None) -> str:
    """Where a command's settings came from, for its JSON output."""
    from wsss.config import split_config_arg

    named = split_config_arg(None if config is None else str(config), [])[0]
    return "the run's config" + ("" if named is None else f" + {named} (all but data, model, method)")


def check_classes(net: Any, dataset: Any, checkpoint: str | os.PathLike, split: str) -> None:
    """One-line error when the checkpoint's class count differs from the dataset's."""
    model_c, data_c = int(net.num_classes) + 1, int(dataset.num_classes)
    if model_c != data_c:
        where = getattr(dataset, "root", None) or getattr(dataset, "image_dir", "the dataset")
        raise ValueError(
            f"checkpoint {checkpoint} predicts {model_c} classes (background included) but the dataset "
            f"{where} (split {split}) has {data_c}: use the data the model was trained on "
            f"(its run's config, without data overrides) or a model trained for {data_c} classes"
        )


def _atomic_write(path: Path, write: Callable[[str], None], suffix: str) -> None:
    """``write(tmp)`` to a temp file beside ``path`` (keeping the suffix for format detection), then
    rename onto ``path``: an interrupted run never leaves a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda t: Path(t).write_text(json.dumps(obj, indent=2)), ".json")


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


def run_evaluate(
    config: str | os.PathLike | None, checkpoint: str | os.PathLike, overrides: Sequence[str] = (),
    split: str | None = None, out: str | os.PathLike | None = None, **opts: Any,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``split`` with the protocol of its run's eval section (or of
    ``config``'s, when one is named; :func:`_setup`).

    opts: scales (list), flip (bool), crf (bool), sweep (bool), max_images (int), device (str),
    maps (names to keep), print_table (bool, default True). None = the config's value.
    Writes the results to ``out`` (default ``<run>/eval_<split>.json``) and returns them.
    """
    from wsss.data.build import build_dataset
    from wsss.engine.evaluate import evaluate

    cfg, net, method, names, dev = _setup(config, checkpoint, overrides, opts.get("device"))
    ev = cfg.eval
    split = str(split or ev.split)
    scales = [float(s) for s in (opts.get("scales") or ev.scales)]
    flip = bool(ev.flip if opts.get("flip") is None else opts["flip"])
    crf = bool(ev.crf if opts.get("crf") is None else opts["crf"])
    sweep = bool(ev.sweep if opts.get("sweep") is None else opts["sweep"])
    max_images = opts.get("max_images") if opts.get("max_images") is not None else ev.max_images
    dataset = build_dataset(cfg.data, split=split, train=False)
    check_classes(net, dataset, checkpoint, split)
    t0 = time.time()
    res = evaluate(method, net, dataset, int(dataset.num_classes), dev, scales=scales, flip=flip,
                   max_images=max_images, crf=crf, sweep=sweep)
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
    })
    if sweep:
        res["_protocol"]["sweep"] = {"protocol": "aream", "thresholds": res["_sweep"]["thresholds"],
                                     "best_threshold": res["_sweep"]["best_threshold"]}
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
    if "_sweep" in res:
        s = res["_sweep"]
        t = s["thresholds"]
        lines.append(
            f"background-threshold sweep on the refined CAM ({len(t)} thresholds {t[0]:.2f}..{t[-1]:.2f}, "
            f"AReAM protocol): best threshold {s['best_threshold']:.2f}, mIoU {100 * s['best_miou']:.2f}"
        )
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


@torch.no_grad()
def _label_and_scores(method: Any, net: Any, image: torch.Tensor, labels: torch.Tensor, map_name: str,
                      scales: list[float], flip: bool, want_scores: bool) -> tuple[torch.Tensor, Any]:
    """Label map (H, W) of ``map_name`` for one normalised image (1, 3, H, W) and, if asked, its
    scores: seg logits (C, H, W) for 'seg', else the masked multi-scale CAM (K, H, W)."""
    from wsss.engine.evaluate import multiscale_seg, pad_batch, predict_maps, predict_seg, sweep_cam

    if map_name == "seg":
        label = predict_seg(method, net, image, scales, flip)[0]
        if not want_scores:
            return label, None
        x, (h, w) = pad_batch(image)
        return label, multiscale_seg(method, net, x, scales, flip)[0, :, :h, :w]  # type: ignore[index]
    maps = predict_maps(method, net, image, labels, scales, flip, maps=[map_name])
    scores = sweep_cam(method, net, image, labels, scales, flip)[0] if want_scores else None
    return maps[map_name][0], scores


def run_pseudo_labels(config: str | os.PathLike | None, checkpoint: str | os.PathLike,
                      overrides: Sequence[str], split: str, out: str | os.PathLike, map_name: str = "pseudo",
                      logits: bool = False, logit_stride: int = 4, scales: Sequence[float] | None = None,
                      flip: bool | None = None, max_images: int | None = None, device: str | None = None,
                      verbose: bool = True) -> dict[str, Any]:
    """Write ``<out>/<name>.png`` for every image of ``split`` (resumable); returns the summary.

    Only ``map_name`` is computed. Where the split has ground-truth masks, the written labels (and
    those already present) are scored against them: uncertain pixels (255) left out, with the
    coverage, and counted as wrong (``summary["scores"]``).
    """
    from wsss.data.build import build_dataset
    from wsss.engine.evaluate import num_images

    cfg, net, method, names, dev = _setup(config, checkpoint, overrides, device)
    if map_name not in method.map_names(net):
        raise ValueError(f"--map {map_name}: method {method.name} with this model produces "
                         f"{', '.join(method.map_names(net))}")
    scales_l = [float(s) for s in (scales or cfg.eval.scales)]
    flip_b = bool(cfg.eval.flip if flip is None else flip)
    stride = int(logit_stride)
    if stride < 1:
        raise ValueError(f"--logit-stride must be >= 1, got {stride}")
    dataset = build_dataset(cfg.data, split=split, train=False)
    check_classes(net, dataset, checkpoint, split)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = num_images(dataset, max_images)
    written, skipped, counts = 0, 0, np.zeros(256, dtype=np.int64)
    scorer = LabelScorer(int(dataset.num_classes))
    t0 = time.time()
    for idx in range(n):
        name = dataset.names[idx]
        png, npz = out_dir / f"{name}.png", out_dir / f"{name}.npz"
        sample = dataset[idx]
        if _readable(png) and (not logits or _readable(npz)):
            skipped += 1
            scorer.update(torch.from_numpy(load_mask(png, int(dataset.num_classes))), sample["mask"])
            continue
        label, scores = _label_and_scores(method, net, sample["image"][None].to(dev),
                                          sample["labels"][None].to(dev), map_name, scales_l, flip_b, logits)
        lab = label.cpu().numpy().astype(np.uint8)
        _atomic_write(png, lambda t, lab=lab: save_mask(t, lab), ".png")
        if logits:
            small = downscale(scores, stride).half().cpu().numpy()
            kind = "seg_logits" if map_name == "seg" else "cam"
            arrays = {"logits": small, "size": np.asarray(lab.shape), "stride": np.asarray(stride),
                      "kind": np.asarray(kind)}
            _atomic_write(npz, lambda t, a=arrays: np.savez_compressed(t, **a), ".npz")
        counts += np.bincount(lab.reshape(-1), minlength=256)
        scorer.update(label.cpu(), sample["mask"])
        written += 1
        if verbose and written % 50 == 0:
            print(f"pseudo-labels: {written + skipped}/{n}", file=sys.stderr)
    summary = {
        "split": split, "map": map_name, "images": n, "written": written, "skipped_existing": skipped,
        "checkpoint": str(Path(checkpoint).resolve()), "config": config_note(config),
        "overrides": list(overrides),
        "scales": scales_l, "flip": flip_b, "image_labels": "ground truth", "ignore_value": 255,
        "bkg_score": float(cfg.eval.bkg_score), "high": float(cfg.cam.high), "low": float(cfg.cam.low),
        "logits": ({"stride": stride, "dtype": "float16",
                    "kind": "seg_logits" if map_name == "seg" else "cam (K, h, w) in [0, 1], masked"}
                   if logits else None),
        "class_names": list(dataset.class_names),
        "pixels_written": {str(i): int(c) for i, c in enumerate(counts) if c},
        "scores": scorer.compute(),
        "seconds": time.time() - t0,
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
        """label, gt: (H, W) integer maps."""
        from wsss.engine.evaluate import leave_out_uncertain

        label, gt = label.long(), gt.long()
        self.wrong.update(label, gt)
        pred, target, counts = leave_out_uncertain(label, gt)
        self.left_out.update(pred, target)
        self.labelled, self.valid = self.labelled + int(counts[0]), self.valid + int(counts[1])

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
# predict
# ---------------------------------------------------------------------------------------------


def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files given directly, plus the image files (by extension) of the directories given, sorted."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        else:
            files.append(p)
    return files


def run_predict(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike,
                labels: str | None = None, crf: bool = False, device: str | None = None,
                scales: Sequence[float] | None = None, flip: bool | None = None) -> int:
    """Mask PNG, overlay PNG and JSON per image; returns the number of images that failed."""
    from wsss.predictor import Segmenter

    seg = Segmenter.from_pretrained(checkpoint, device=device)
    if labels:
        seg.label_vector(labels)  # unknown names fail before any image
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    files = list_images(inputs)
    if not files:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    for f in files:
        try:
            image = load_image(f)
        except DataError as err:
            print(f"wsss predict: error: {err}", file=sys.stderr)
            failed += 1
            continue
        pred = seg.predict(image, labels=labels, scales=scales, flip=flip, crf=crf)
        stem = out_dir / f.stem
        mask, overlay = pred.mask.astype(np.uint8), pred.overlay()
        _atomic_write(stem.with_suffix(".png"), lambda t, m=mask: save_mask(t, m), ".png")
        _atomic_write(Path(f"{stem}_overlay.png"), lambda t, o=overlay: Image.fromarray(o).save(t), ".png")
        _write_json(stem.with_suffix(".json"), {"image": str(f), **pred.to_json()})
    print(f"predict: {len(files) - failed} of {len(files)} images -> {out_dir}"
          + (f" ({failed} unreadable)" if failed else ""))
    return failed


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _crf_guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
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
                 max_images=args.max_images, device=args.device, maps=args.maps)
    return 0


def cmd_pseudo_labels(args: argparse.Namespace) -> int:
    run_pseudo_labels(args.config, args.checkpoint, args.overrides, args.split, args.out, map_name=args.map,
                      logits=args.logits, logit_stride=args.logit_stride, scales=args.scales, flip=args.flip,
                      max_images=args.max_images, device=args.device)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    failed = run_predict(args.checkpoint, args.images, args.out, labels=args.labels, crf=args.crf,
                         device=args.device, scales=args.scales, flip=args.flip)
    return 1 if failed else 0


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
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


def add_parsers(sub: Any) -> None:
    """Register ``evaluate``, ``pseudo-labels`` and ``predict`` on the ``wsss`` CLI."""
    p = sub.add_parser("evaluate", help="mIoU + per-class IoU of every label map of a checkpoint")
    _common(p)
    p.add_argument("--split", default=None, help="default: the config's eval.split")
    p.add_argument("--crf", action="store_true", help="dense CRF on the segmentation map (AFA test preset)")
    p.add_argument("--sweep", action="store_true", help="AReAM background-threshold sweep on the refined CAM")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--maps", nargs="+", default=None, help="report only these maps (default: all)")
    p.add_argument("--out", default=None, help="results JSON (default: <run>/eval_<split>.json)")
    p.set_defaults(fn=_crf_guard(cmd_evaluate))

    p = sub.add_parser("pseudo-labels", help="write pseudo-label PNGs (VOC palette) for multi-stage training")
    _common(p)
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--map", default="pseudo", choices=PSEUDO_MAPS,
                   help="label map to write: pseudo (255 = uncertain), aff_par (AFA), refined_par (AReAM), "
                        "cam_par, seg, ...")
    p.add_argument("--logits", action="store_true", help="also write <name>.npz with float16 scores")
    p.add_argument("--logit-stride", type=int, default=4, help="downscale factor of the saved scores")
    p.add_argument("--max-images", type=int, default=None)
    p.set_defaults(fn=_crf_guard(cmd_pseudo_labels))

    p = sub.add_parser("predict", help="masks, overlays and class lists for image files")
    _common(p, config=False)
    p.add_argument("images", nargs="+", help="image files and/or directories")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--labels", default=None, help="comma-separated class names (default: the classifier's)")
    p.add_argument("--crf", action="store_true", help="dense CRF post-processing")
    p.set_defaults(fn=_crf_guard(cmd_predict))
