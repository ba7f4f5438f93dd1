"""``wsss train``: train a model from a config (:func:`wsss.engine.train.train`)."""

from __future__ import annotations

import argparse
from typing import Any

from wsss.commands.common import add_config_args


def cmd_train(args: argparse.Namespace) -> int:
    from wsss.config import load_config
    from wsss.engine.train import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def add_parser(sub: Any) -> None:
    """Register ``train`` on the ``wsss`` CLI."""
    p = sub.add_parser("train", help="train a model from a config")
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an out_dir holding a run (its checkpoints, model, logs are removed)")
    p.set_defaults(fn=cmd_train)
