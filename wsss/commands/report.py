"""``wsss report``: one self-contained HTML page for a run directory (:mod:`wsss.analysis.report`)."""

from __future__ import annotations

import argparse
from typing import Any

from wsss.analysis.report import write_report


def cmd_report(args: argparse.Namespace) -> int:
    print(f"wrote {write_report(args.run_dir, args.images, args.out)}")
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``wsss report``."""
    p = sub.add_parser("report", help="self-contained HTML report of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output file (default RUN_DIR/report.html)")
    p.add_argument("--images", type=int, default=6, help="validation images in the grid")
    p.set_defaults(fn=cmd_report)
    return p
