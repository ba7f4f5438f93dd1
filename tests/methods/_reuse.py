"""Shared set-up of the label-pass reuse tests (``Method.forward_rows``): a 5-class network in train
mode, two random 64 px images with their labels, and the training forward standing in for the
un-flipped scale-1 rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from wsss.config import load_config
from wsss.methods import build_method, build_network

LABELS = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 0]])


#: (cam.scales, cam.flip) of the cases: scale 1 alone without flip is the label pass the training
#: forward replaces entirely (the DINOv2 configs)
CASES = (("[1.0]", False), ("[1.0]", True), ("[1.0,0.5]", True), ("[0.5,1.0,1.5]", True))


def label_pass_case(config: str, scales: str, flip: bool, extra: Sequence[str] = (),
                    forward: Callable[[Any], dict[str, Any]] = lambda method: {"with_seg": True}
                    ) -> tuple[Any, Any, Any, Any]:
    """(method, net, x, first) for ``config`` with ``cam.scales=scales`` and ``cam.flip=flip``;
    ``forward(method)`` gives the training forward's keyword arguments."""
    cfg = load_config(config, [f"cam.scales={scales}", f"cam.flip={str(flip).lower()}", *extra])
    net = build_network(cfg, 5).train()
    method = build_method(cfg, net)
    x = torch.rand(2, 3, 64, 64)
    first = method.forward_rows(net, net(x, **forward(method)))
    assert first is not None
    return method, net, x, first
