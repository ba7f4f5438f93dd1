"""Fully supervised upper bound: the segmentation head learns from ground-truth masks.

The classification loss is kept so the CAM head is trained too (its CAMs can then be compared).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from wsss.methods.base import Method, register_method, resize


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
