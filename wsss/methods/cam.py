"""CAM baseline: classification only, plus (optionally) a segmentation head trained on the
PAR-refined CAM pseudo labels. This is AFA without the affinity module (the official
baseline model), so it isolates what learned affinity adds: it follows the same schedule, the shared
``pseudo`` section (``pseudo.warmup_iters``, ``pseudo.seg_weight``), and has no section of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from wsss.methods.base import Method, pass_mode, register_method
from wsss.model import WSSSNet, unwrap
from wsss.ops.losses import seg_loss_bg_fg


@register_method
class CAMMethod(Method):
    """AFA's recipe without the affinity: the schedule of the ``pseudo`` section, as AFA's."""

    name = "cam"

    def __init__(self, cfg: Any, net: WSSSNet) -> None:
        super().__init__(cfg, net)
        self.warmup = int(self.pseudo.warmup_iters)
        self.seg_weight = float(self.pseudo.seg_weight)

    def training_step(
        self, net: nn.Module, batch: dict[str, Tensor], it: int
    ) -> tuple[Tensor, dict[str, float]]:
        x, labels = batch["image"], batch["labels"]
        m = unwrap(net)
        use_seg = it > self.warmup and m.seg_head is not None and self.seg_weight > 0
        out, loss, logs = self.classify(net, x, labels, with_seg=use_seg)
        if not use_seg:
            return loss, logs
        first = self.forward_rows(m, out)
        with torch.no_grad(), pass_mode(m, self.mode):
            cam = self.training_cam(m, x, labels, first) * labels[..., None, None]
            target = self.pseudo_label(self.par_image(x), cam, labels, batch.get("img_box"))
        l_seg = seg_loss_bg_fg(out.seg, target)
        logs["seg"] = l_seg.item()
        return loss + self.seg_weight * l_seg, logs
