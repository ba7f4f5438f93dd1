"""Command line: ``wsss train | evaluate | pseudo-labels | vote-labels | calibrate | predict | analyze |
report | demo``."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    # each command is one module of wsss.commands: its sub-parser and the function that runs it
    from wsss.commands import (
        analyze,
        calibrate,
        demo,
        evaluate,
        predict,
        pseudo_labels,
        report,
        train,
        vote_labels,
    )

    parser = argparse.ArgumentParser(prog="wsss", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, evaluate, pseudo_labels, vote_labels, calibrate, predict, analyze, report, demo):
        command.add_parser(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--threads", type=int, default=None, metavar="N",
            help="CPU threads for torch (default: the config's 'threads', else torch's default of one per "
                 "core); on a machine where other processes are busy, 1 or 2 is much faster",
        )
    return parser


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads N``: set it now and pass it on as the ``threads=N`` override of a config command."""
    from wsss.engine.distributed import set_threads

    if args.threads is None:
        return
    set_threads(args.threads)
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, f"threads={args.threads}"]


def os_error_message(err: OSError) -> str:
    """One line for a failed file operation: what, which file, and what to do for the common cases."""
    what = err.strerror or str(err) or type(err).__name__
    where = f": {err.filename}" if err.filename else ""
    hint = {
        errno.ENOSPC: " (the disk is full: free some space and run it again; finished files are kept)",
        errno.EDQUOT: " (disk quota exceeded: free some space and run the command again)",
        errno.EROFS: " (read-only file system: choose a writable folder)",
        errno.EACCES: " (no permission: choose a folder you can write to)",
        errno.EPERM: " (no permission: choose a folder you can write to)",
    }.get(err.errno or 0, "")
    return f"{what}{where}{hint}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        apply_threads(args)
        return int(args.fn(args) or 0)
    except (FileNotFoundError, KeyError, ValueError, ImportError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        if isinstance(err, FileNotFoundError) and err.filename:
            msg = os_error_message(err)
        print(f"wsss {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as err:  # read-only or full disk, permissions: one line, no traceback
        print(f"wsss {args.command}: error: {os_error_message(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
