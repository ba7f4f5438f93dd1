"""Fully supervised upper bound: the segmentation head learns from ground-truth masks.

The classification loss is kept so the CAM head is trained too (its CAMs can then be compared).
"""

from __future__ import annotations

from collections.abc import Collection

import torch.nn.functional as F
from torch import Tensor, nn

from wsss.methods.base import Method, register_method, resize
from wsss.model import WSSSNet


@register_method
class SupervisedMethod(Method):
    name = "supervised"
    PSEUDO_MAP = None  # learns from masks: no pseudo labels of its own

    def training_step(
        self, net: nn.Module, batch: dict[str, Tensor], it: int
    ) -> tuple[Tensor, dict[str, float]]:
        x, labels, mask = batch["image"], batch["labels"], batch["mask"]
        out = net(x)
        if out.seg is None:
            raise ValueError("method 'supervised' needs model.seg_head.enabled=true")
        l_cls = self.cls_loss(out, labels)
        logits = resize(out.seg, tuple(mask.shape[-2:]))
        valid = (mask != 255).any()
        l_seg = F.cross_entropy(logits, mask, ignore_index=255) if valid else logits.sum() * 0.0
        return l_cls + l_seg, {"cls": l_cls.item(), "seg": l_seg.item()}

    MAPS = ()  # the segmentation head only

    def predict(
        self, net: WSSSNet, x: Tensor, labels: Tensor, scales: list[float], flip: bool,
        maps: Collection[str] | None = None,
    ) -> dict[str, Tensor]:
        if maps is not None and "seg" not in maps:
            return {}
        seg = self.segment(net, x)
        return {"seg": seg.argmax(1)}  # type: ignore[union-attr]
