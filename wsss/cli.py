"""Command line: ``wsss train | evaluate | pseudo-labels | predict | analyze | report | demo``."""

from __future__ import annotations

import argparse
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
    train(cfg, resume=args.resume)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from wsss.engine.demo import run_demo

    run_demo(args.out, quick=args.quick, methods=args.methods)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a config")
    _add_config(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.set_defaults(fn=cmd_train)

    # evaluate / pseudo-labels / predict live with the inference engine, analyze / report with
    # the analysis tools: each module registers its own subcommands.
    from wsss.analysis.analyze import add_parser as add_analyze
    from wsss.analysis.report import add_parser as add_report
    from wsss.engine.infer import add_parsers as add_infer

    add_infer(sub)
    add_analyze(sub)
    add_report(sub)

    p = sub.add_parser("demo", help="synthetic data -> train cam/afa/aream/supervised and a second stage on "
                                    "AFA's pseudo labels -> evaluate -> report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a few iterations only (smoke test)")
    p.add_argument("--methods", nargs="*", default=None)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        apply_threads(args)
        return int(args.fn(args) or 0)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"wsss {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
