"""``wsss vote-labels``: one pseudo-label folder from several, by a per-pixel majority vote.

    wsss vote-labels runs/toco_s0/pseudo_train runs/toco_s1/pseudo_train runs/toco_s2/pseudo_train \\
        --out runs/toco_vote/pseudo_train [--min-votes 2] [--masks ROOT/SegmentationClass]

The folders are what ``wsss pseudo-labels`` writes (PNGs and ``class_names.json``), e.g. of first-stage
runs trained with different seeds. Each run loses some classes (a whole class labelled background or
another class) and the runs lose different ones, so the vote keeps what most runs get right
(docs/results.md). A tie goes to the earliest folder given among the tied; 255 (uncertain) is an
abstention. Every folder and PNG is checked before anything is written; the output is a folder that a
second stage's ``data.pseudo_dir`` reads.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss.commands.common import atomic_write, write_json
from wsss.commands.pseudo_labels import LabelScorer, claim_out_dir, format_label_scores
from wsss.data.base import list_stems, missing_error
from wsss.data.build import PSEUDO_CLASSES_FILE, read_pseudo_classes, same_classes
from wsss.data.io import DataError, load_mask, save_mask
from wsss.refine.vote import majority_vote


def _class_names(folder: Path) -> list[str]:
    """The class list of a pseudo-label folder (its ``class_names.json``); an error naming the folder."""
    if not folder.is_dir():
        raise DataError(f"vote-labels: {folder} is not a folder")
    path = folder / PSEUDO_CLASSES_FILE
    if not path.is_file():
        raise DataError(f"vote-labels: {folder} has no {PSEUDO_CLASSES_FILE}; the folders must be written by "
                        f"wsss pseudo-labels")
    names = read_pseudo_classes(path, "vote-labels")
    if len(names) < 2:
        raise DataError(f"vote-labels: {path} must be a list of at least 2 class names, got {names!r}")
    return names


def check_folders(folders: Sequence[Path], out: Path) -> tuple[list[str], list[str]]:
    """(class names, sorted PNG stems) that every folder shares; a DataError naming the folder that holds
    other classes or lacks a stem, or when ``out`` is one of the folders."""
    if len(folders) < 2:
        raise DataError(f"vote-labels needs at least 2 label folders (3 or more for a majority), got "
                        f"{len(folders)}")
    if out.resolve() in {f.resolve() for f in folders}:
        raise DataError(f"vote-labels: --out {out} is one of the folders voted on; choose another")
    classes = _class_names(folders[0])
    stems = list_stems(folders[0], (".png",))
    if not stems:
        raise DataError(f"vote-labels: {folders[0]} holds no PNG label")
    for folder in folders[1:]:
        other = _class_names(folder)
        if not same_classes(other, classes):
            raise DataError(f"vote-labels: {folder} labels the classes {other} but {folders[0]} labels "
                            f"{classes}")
        theirs = list_stems(folder, (".png",))
        for a, b, where in ((stems, theirs, folder), (theirs, stems, folders[0])):
            missing = sorted(set(a) - set(b))
            if missing:
                raise missing_error("label PNGs", missing, where)
    return classes, sorted(stems)


def _read(folders: Sequence[Path], stem: str, k: int) -> np.ndarray:
    """(N, H, W) int64: the stem's label in each folder; a DataError naming the file of another size."""
    maps = [load_mask(f / f"{stem}.png", k) for f in folders]
    for f, m in zip(folders[1:], maps[1:]):
        if m.shape != maps[0].shape:
            raise DataError(f"vote-labels: {f / (stem + '.png')} is {m.shape[0]}x{m.shape[1]} but "
                            f"{folders[0] / (stem + '.png')} is {maps[0].shape[0]}x{maps[0].shape[1]} (HxW)")
    return np.stack(maps)


def _truth(mask_dir: Path | None, stem: str, k: int, size: tuple[int, ...]) -> np.ndarray | None:
    """The stem's ground truth in ``mask_dir`` (None: no folder, or no mask of this stem); a DataError
    naming the mask when it is not ``size`` (its labels' HxW) or holds values outside the classes."""
    path = None if mask_dir is None else mask_dir / f"{stem}.png"
    if path is None or not path.is_file():
        return None
    gt = load_mask(path, k)
    if gt.shape != size:
        raise DataError(f"vote-labels: mask {path} is {gt.shape[0]}x{gt.shape[1]} but its labels are "
                        f"{size[0]}x{size[1]} (HxW)")
    return gt


def run_vote_labels(folders: Sequence[str | Path], out: str | Path, min_votes: int = 1,
                    masks: str | Path | None = None, overwrite: bool = False, verbose: bool = True
                    ) -> dict[str, Any]:
    """Write ``<out>/<stem>.png`` = the vote of the folders' ``<stem>.png`` for every stem, with
    ``class_names.json``, ``manifest.json`` and ``summary.json`` (the winning vote counts; with
    ``masks``, a folder of ground-truth ``<stem>.png``, the scores of the vote and of each folder)."""
    folders = [Path(f) for f in folders]
    out_dir = Path(out)
    if not 1 <= min_votes <= len(folders):
        raise ValueError(f"--min-votes must be between 1 and the {len(folders)} folders, got {min_votes}")
    classes, stems = check_folders(folders, out_dir)
    k = len(classes)
    mask_dir = None if masks is None else Path(masks)
    if mask_dir is not None and not mask_dir.is_dir():
        raise DataError(f"vote-labels: --masks {mask_dir} is not a folder")
    for stem in stems:  # every label and mask readable, in range and of one size: before any output
        _truth(mask_dir, stem, k, _read(folders, stem, k).shape[1:])
    manifest = {"inputs": [str(f.resolve()) for f in folders], "min_votes": int(min_votes)}
    claim_out_dir(out_dir, manifest, overwrite)
    write_json(out_dir / PSEUDO_CLASSES_FILE, classes)
    t0 = time.time()
    votes_hist = np.zeros(len(folders) + 1, dtype=np.int64)
    scorers = [LabelScorer(k) for _ in range(len(folders) + 1)]  # the vote, then each folder
    for stem in stems:
        maps = torch.from_numpy(_read(folders, stem, k))
        label, votes = majority_vote(maps, min_votes=min_votes)
        lab = label.numpy().astype(np.uint8)
        atomic_write(out_dir / f"{stem}.png", lambda t, lab=lab: save_mask(t, lab))
        votes_hist += np.bincount(votes.reshape(-1).numpy(), minlength=len(folders) + 1)
        gt = _truth(mask_dir, stem, k, tuple(label.shape))
        if gt is not None:
            for scorer, m in zip(scorers, [label, *maps]):
                scorer.update(m, torch.from_numpy(gt))
    summary = {
        "images": len(stems), "inputs": manifest["inputs"], "min_votes": int(min_votes),
        "class_names": classes, "ties": "the earliest folder given among the tied labels",
        "winning_votes": {str(i): int(c) for i, c in enumerate(votes_hist)},
        "scores": scorers[0].compute(), "input_scores": [s.compute() for s in scorers[1:]],
        "masks": None if mask_dir is None else str(mask_dir.resolve()), "seconds": time.time() - t0,
    }
    write_json(out_dir / "summary.json", summary)
    if verbose:
        _print_summary(summary, folders, out_dir)
    return summary


def _print_summary(summary: dict[str, Any], folders: Sequence[Path], out_dir: Path) -> None:
    """What was written, the share of pixels by winning vote count, and the scores against the masks."""
    total = max(sum(summary["winning_votes"].values()), 1)
    shares = ", ".join(f"{v} votes {100 * c / total:.1f}%" for v, c in summary["winning_votes"].items())
    print(f"vote-labels: {summary['images']} labels -> {out_dir} (pixels by winning votes: {shares})")
    if summary["scores"] is not None:
        print(f"vote: {format_label_scores(summary['scores'], 'masks')}")
        for folder, scores in zip(folders, summary["input_scores"]):
            print(f"{folder}: {format_label_scores(scores, 'masks')}")


def cmd_vote_labels(args: argparse.Namespace) -> int:
    run_vote_labels(args.folders, args.out, min_votes=args.min_votes, masks=args.masks,
                    overwrite=args.overwrite)
    return 0


def add_parser(sub: Any) -> None:
    """Register ``vote-labels`` on the ``wsss`` CLI."""
    p = sub.add_parser("vote-labels",
                       help="merge pseudo-label folders (e.g. of several seeds) by a per-pixel majority vote")
    p.add_argument("folders", nargs="+", help="pseudo-label folders of `wsss pseudo-labels`, in priority "
                                              "order (ties go to the earliest)")
    p.add_argument("--out", required=True, help="output folder (a second stage's data.pseudo_dir)")
    p.add_argument("--min-votes", type=int, default=1,
                   help="label a pixel only where its winning label has this many votes, else 255 "
                        "(default 1: every pixel with a vote)")
    p.add_argument("--masks", default=None,
                   help="optional folder of ground-truth <name>.png: score the vote and each folder")
    p.add_argument("--overwrite", action="store_true",
                   help="write every label again (--out holds labels of other inputs or settings)")
    p.set_defaults(fn=cmd_vote_labels)
