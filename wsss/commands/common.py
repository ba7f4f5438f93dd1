"""What the commands share: the config and checkpoint arguments, the notes of a command's JSON output
(where its settings came from, the run's calibration), the loading options, atomic JSON writes and the
one-line error of a missing CRF package."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from wsss.engine.checkpoint import atomic_write_files
from wsss.engine.runs import read_calibration
from wsss.refine.crf import CRFUnavailableError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")
MAX_IMAGES_HELP = ("at most this many images, spread evenly over the split (split lists are sorted by name, "
                   "and names often group a class); leave it out for all of them")


def max_images_arg(text: str) -> int:
    """argparse type of ``--max-images``: a whole number >= 1 (leaving the option out means all images;
    0 would be a pass over nothing, so it is an error, the same in every command)."""
    error = argparse.ArgumentTypeError(
        f"must be a whole number >= 1 (leave it out for all images), got {text!r}")
    try:
        value = int(text)
    except ValueError:
        raise error from None
    if value < 1:
        raise error
    return value


def config_note(config: str | os.PathLike | None) -> str:
    """Where a command's settings came from, for its JSON output."""
    from wsss.config import split_config_arg

    named = split_config_arg(None if config is None else str(config), [])[0]
    return "the run's config" + ("" if named is None else f" + {named} (all but data, model, method)")


def check_map_names(maps: Sequence[str], method: Any, net: Any, option: str,
                    also: Sequence[str] = ()) -> None:
    """A ValueError naming the entries of ``maps`` (given with ``option``) that ``method`` does not make
    for ``net`` nor are in ``also``. An option that takes several values swallows a dotted override
    written after it: the error then says where overrides go."""
    known = [*method.map_names(net), *also]
    bad = [m for m in maps if m not in known]
    if bad:
        hint = ("; a dotted override goes before the options (`wsss COMMAND key=value --checkpoint RUN "
                "...`)" if any("=" in m for m in bad) else "")
        raise ValueError(f"{option} {' '.join(bad)}: method {method.name} with this model makes "
                         f"{', '.join(known)}{hint}")


def overrides_note(config: str | os.PathLike | None, overrides: Sequence[str]) -> list[str]:
    """Every dotted override a command applied, for its JSON output: a first positional word with ``=``
    is an override, not a config (:func:`wsss.config.split_config_arg`)."""
    from wsss.config import split_config_arg

    return split_config_arg(None if config is None else str(config), overrides)[1]


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


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temp file beside ``path`` (same suffix, for format detection), then rename it
    onto ``path``: an interrupted run never leaves a half-written file under the final name."""
    atomic_write_files([(path, write)])


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda t: Path(t).write_text(json.dumps(obj, indent=2)))


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="config file or shipped config name (see configs/)")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.max_iters=100 data.root=/data/VOC2012"
    )


def crf_guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except CRFUnavailableError as err:
            print(f"wsss {args.command}: error: {err}", file=sys.stderr)
            return 2

    return run


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


def add_loading_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=None,
                   help="images of one size per forward (default: the config's eval.batch_size)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers reading images (default: the config's eval.num_workers)")

