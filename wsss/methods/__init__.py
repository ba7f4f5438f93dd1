"""Methods: each builds its losses and pseudo labels from the shared pieces."""

from __future__ import annotations

from typing import Any

from wsss.methods.base import Method
from wsss.model import WSSSNet

METHOD_NAMES = ("cam", "afa", "aream", "supervised")


def build_method(cfg: Any, net: WSSSNet) -> Method:
    """The method named by ``cfg.method``."""
    name = str(cfg.method)
    if name == "cam":
        from wsss.methods.cam import CAMMethod as cls
    elif name == "afa":
        from wsss.methods.afa import AFAMethod as cls
    elif name == "aream":
        from wsss.methods.aream import AReAMMethod as cls
    elif name == "supervised":
        from wsss.methods.supervised import SupervisedMethod as cls
    else:
        raise ValueError(f"unknown method '{name}'; choose one of {', '.join(METHOD_NAMES)}")
    return cls(cfg, net)


__all__ = ["METHOD_NAMES", "Method", "build_method"]
