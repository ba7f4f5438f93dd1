"""``wsss predict``: mask PNG, colour overlay PNG and a JSON (present classes, scores) per image file.

A command on top of :class:`wsss.api.predictor.Segmenter` (the engine never imports it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from wsss.api.predictor import Segmenter
from wsss.commands.common import IMAGE_EXTS, add_checkpoint_args, crf_guard
from wsss.data.io import load_image, save_mask
from wsss.engine.checkpoint import atomic_write_files, check_writable
from wsss.engine.distributed import resolve_device

PREDICT_MAX_SIZE = 2048  # `wsss predict` default long side: a 24 MP photo is predicted as 3 MP


def _listed(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, int]]:
    """(file, index of the input argument it came from), directories listed by extension, sorted; a
    file given twice is listed once."""
    files: dict[Path, tuple[Path, int]] = {}
    for i, item in enumerate(inputs):
        p = Path(item)
        found = ([f for f in sorted(p.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_EXTS]
                 if p.is_dir() else [p])
        for f in found:
            files.setdefault(f.resolve(), (f, i))
    return list(files.values())


PREDICT_SUFFIXES = (".png", "_overlay.png", ".json")  # the files written per image, after its stem


def output_stems(inputs: Sequence[str | os.PathLike], out_dir: Path) -> list[tuple[Path, Path]]:
    """(image file, output stem) for every image: ``out/<stem>``; where two images share a stem (two
    folders holding ``a.jpg``, or ``a.jpg`` and ``a.png``) the input folder structure is mirrored,
    ``out/<folder name>/<stem>``, and the extension kept where that still collides. No two images get
    one output."""
    listed = _listed(inputs)
    labels: dict[int, str] = {}
    for i, item in enumerate(inputs):  # one sub-folder name per input argument, unique
        p = Path(item)
        base = (p if p.is_dir() else p.resolve().parent).name or "input"
        name, k = base, 2
        while name in labels.values():
            name, k = f"{base}_{k}", k + 1
        labels[i] = name

    def collisions(keys: list[str]) -> set[str]:
        low = [k.lower() for k in keys]  # case-insensitive file systems
        return {k for k, lk in zip(keys, low) if low.count(lk) > 1}

    keys = [f.stem for f, _ in listed]
    clash = collisions(keys)
    keys = [f"{labels[i]}/{f.stem}" if k in clash else k for (f, i), k in zip(listed, keys)]
    clash = collisions(keys)
    keys = [f"{k}_{f.suffix.lstrip('.').lower()}" if k in clash else k for (f, _), k in zip(listed, keys)]
    return [(f, out_dir / k) for (f, _), k in zip(listed, keys)]


def check_predict_out(inputs: Sequence[str | os.PathLike], pairs: Sequence[tuple[Path, Path]],
                      out_dir: Path) -> None:
    """Refuse an ``--out`` that is an existing file, an input folder, a folder that cannot be written, or
    where an output would replace an input image (nothing is created here)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is an existing file, not a folder")
    out_res = out_dir.resolve()
    for item in inputs:
        if Path(item).is_dir() and Path(item).resolve() == out_res:
            raise ValueError(f"--out {out_dir} is the input folder {item}: the masks would be written among "
                             f"(and could replace) your images; choose another folder")
    sources = {f.resolve() for f, _ in pairs}
    for _, stem in pairs:
        for suffix in PREDICT_SUFFIXES:
            target = Path(f"{stem}{suffix}")
            if target.resolve() in sources:
                raise ValueError(f"--out {out_dir}: an output would replace the input image {target}; "
                                 f"choose another folder")
    check_writable(out_dir)


def _save_prediction(f: Path, stem: Path, pred: Any) -> None:
    """Mask PNG, overlay PNG and JSON of one image, all or nothing (a full disk leaves none)."""
    mask, overlay = pred.mask.astype(np.uint8), pred.overlay()
    text = json.dumps({"image": str(f), **pred.to_json()}, indent=2)
    atomic_write_files([
        (Path(f"{stem}.png"), lambda t: save_mask(t, mask)),
        (Path(f"{stem}_overlay.png"), lambda t: Image.fromarray(overlay).save(t)),
        (Path(f"{stem}.json"), lambda t: Path(t).write_text(text)),
    ])


def _size_groups(pairs: Sequence[tuple[Path, Path]], batch_size: int
                 ) -> Iterator[list[tuple[Path, Path, np.ndarray | Exception]]]:
    """Consecutive images of one size, at most ``batch_size`` at a time, as ``(file, stem, uint8 image)``;
    an unreadable file comes alone with its error in place of the image."""
    group: list[tuple[Path, Path, np.ndarray | Exception]] = []
    for f, stem in pairs:
        try:
            item: np.ndarray | Exception = load_image(f)
        except (ValueError, OSError) as err:
            item = err
        if group and (isinstance(item, Exception) or len(group) >= batch_size
                      or group[0][2].shape != item.shape):  # type: ignore[union-attr]
            yield group
            group = []
        group.append((f, stem, item))
        if isinstance(item, Exception):
            yield group
            group = []
    if group:
        yield group


def _predict_group(seg: Any, group: list[tuple[Path, Path, Any]], opts: dict[str, Any]) -> list[Any]:
    """Predictions (or the error of each image that failed) of one size group: one batch, and image by
    image when the batch fails, so that the error names its file."""
    if not isinstance(group[0][2], Exception):
        try:
            return seg.predict_batch([im for _, _, im in group], **opts)
        except (ValueError, RuntimeError) as err:
            if len(group) == 1:
                return [err]
    out: list[Any] = []
    for _, _, im in group:
        try:
            out.append(im if isinstance(im, Exception) else seg.predict(im, **opts))
        except (ValueError, RuntimeError) as err:  # too small, out of memory, ...: the next one
            out.append(err)
    return out


def run_predict(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike,
                labels: str | None = None, crf: bool = False, device: str | None = None,
                scales: Sequence[float] | None = None, flip: bool | None = None,
                max_size: int | None = None, progress: bool | None = None, batch_size: int = 1,
                gate: bool = False) -> int:
    """Mask PNG, overlay PNG and JSON per image; returns the number of images that failed (each named
    on stderr; the others are still predicted). ``max_size``: long side of the copy predicted (the
    results are mapped back to the original size); None = full resolution. ``batch_size``: consecutive
    images of one size are predicted together, up to this many. ``gate``: a seg head's mask only over
    the classes the classifier predicts (default: its argmax over all classes)."""
    if int(batch_size) < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    out_dir = Path(out)
    pairs = output_stems(inputs, out_dir)
    if not pairs:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    check_predict_out(inputs, pairs, out_dir)
    seg = Segmenter.from_pretrained(checkpoint, device=resolve_device(device))  # a bad device: before loading
    if labels:
        seg.label_vector(labels)  # unknown names fail before any image
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = {"labels": labels, "scales": scales, "flip": flip, "crf": crf, "max_size": max_size, "gate": gate}
    failed = 0
    bar = tqdm(total=len(pairs), desc="predict", unit="image",
               disable=(not progress) if progress is not None else None)
    for group in _size_groups(pairs, int(batch_size)):
        for (f, stem, _), pred in zip(group, _predict_group(seg, group, opts)):
            if isinstance(pred, Exception):
                msg = str(pred).splitlines()[0] if str(pred) else type(pred).__name__
                bar.write(f"wsss predict: error: {msg if str(f) in msg else f'{f}: {msg}'}", file=sys.stderr)
                failed += 1
            else:
                _save_prediction(f, stem, pred)
            bar.update(1)
    bar.close()
    print(f"predict: {len(pairs) - failed} of {len(pairs)} images -> {out_dir}"
          + (f" ({failed} failed)" if failed else ""))
    return failed


def cmd_predict(args: argparse.Namespace) -> int:
    failed = run_predict(args.checkpoint, args.images, args.out, labels=args.labels, crf=args.crf,
                         device=args.device, scales=args.scales, flip=args.flip,
                         max_size=args.max_size or None, batch_size=args.batch_size, gate=args.gate)
    return 1 if failed else 0


def add_parser(sub: Any) -> None:
    """Register ``predict`` on the ``wsss`` CLI."""
    p = sub.add_parser("predict", help="masks, overlays and class lists for image files")
    add_checkpoint_args(p, config=False)
    p.add_argument("images", nargs="+", help="image files and/or directories")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--labels", default=None, help="comma-separated class names (default: the classifier's)")
    p.add_argument("--crf", action="store_true", help="dense CRF post-processing")
    p.add_argument("--gate", action="store_true",
                   help="a model with a seg head: restrict its mask to the classes the classifier predicts "
                        "(default: the seg head's argmax over all classes)")
    p.add_argument("--max-size", type=int, default=PREDICT_MAX_SIZE,
                   help="predict on a copy whose long side is at most this many pixels; the masks are mapped "
                        f"back to the original size (default {PREDICT_MAX_SIZE}; 0 = full resolution)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="predict consecutive images of one size together, up to this many (default 1)")
    p.set_defaults(fn=crf_guard(cmd_predict))
