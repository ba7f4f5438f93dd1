"""AFA (Ru et al., CVPR 2022): affinity from attention.

Per iteration, after a classification-only warm-up:
1. a no-grad multi-scale + flip CAM pass also returns the AFA affinity predicted at the largest
   scale (only that pass computes attention);
2. PAR-refined pseudo label from the CAM with the high/low background scores;
3. random-walk propagation of the CAM with the learned affinity (both background scores), PAR
   inside the image box -> the propagated label;
4. affinity labels (radius window) from the PAR label supervise the AFA head;
5. the segmentation head learns from the PAR label, then (after ``switch_iter``) from the
   propagated label.
Loss: L_cls + 0.1 L_seg + 0.1 L_aff (+ lambda_reg L_reg).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor, nn

from wsss.data.transforms import denormalize
from wsss.methods.base import Method, pass_mode, present_mask, resize, unwrap
from wsss.model import WSSSNet
from wsss.ops.losses import affinity_loss, energy_loss, seg_loss_bg_fg
from wsss.refine.labels import affinity_labels, box_mask, channel_argmax, par_refine_scores_label
from wsss.refine.propagation import propagate_affinity, window_mask


class AFAMethod(Method):
    name = "afa"
    EXTRA_MAPS = ("aff", "aff_par")

    def __init__(self, cfg: Any, net: WSSSNet) -> None:
        super().__init__(cfg, net)
        if net.aff_head is None:
            raise ValueError("method 'afa' needs a model with an AFA head (build_model(..., method='afa'))")
        self.a = cfg.afa

    def window(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        return window_mask(grid[0], grid[1], int(self.a.radius), device=device, shape=str(self.a.window))

    def propagate(
        self, cam: Tensor, aff: Tensor, grid: tuple[int, int], labels: Tensor, bkg: float
    ) -> Tensor:
        """Propagate a foreground CAM (B, K, H, W) with an affinity (B, N, N) on ``grid``.

        Returns scores (B, K+1, h, w) on the token grid (background channel first)."""
        cam_g = resize(cam, grid)
        return propagate_affinity(
            cam_g,
            aff,
            labels,
            bkg_score=bkg,
            window=self.window(grid, cam.device),
            power=float(self.a.power),
            eps=float(self.a.norm_eps),
        )

    @torch.no_grad()
    def cam_and_affinity(self, net: WSSSNet, x: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Multi-scale CAM (B, K, H, W) and the affinity (B, N, N) of the largest scale on its grid.

        At the largest scale the un-flipped images (the only ones the propagation uses) run with
        attention capture and the flipped copies without: explicit attention (the (B, heads, N, N)
        logits, their softmax and product) is computed for those B images only.
        """
        top = max(range(len(self.scales)), key=lambda i: self.scales[i])
        b = x.shape[0]
        cams, aff, grid = [], None, (0, 0)
        for i, s in enumerate(self.scales):
            xs = self.scale_inputs(x, s)
            if i != top:
                cams.append(net.forward_cam(xs).cam)
                continue
            out = net.forward_cam(xs[:b], net.aff_layers)
            aff, grid = out.aff, out.grids[net.aff_layers[-1]]
            cams.append(out.cam if xs.shape[0] == b else torch.cat([out.cam, net.forward_cam(xs[b:]).cam]))
        return self.fuse_cams(cams, tuple(x.shape[-2:]), b), aff, grid  # type: ignore[return-value]

    def training_step(
        self, net: nn.Module, batch: dict[str, Tensor], it: int
    ) -> tuple[Tensor, dict[str, float]]:
        x, labels, box = batch["image"], batch["labels"], batch["img_box"]
        m = unwrap(net)
        warm = it <= int(self.a.warmup_iters)  # classification only; the rest is not computed at all
        out = net(x, with_seg=not warm, with_aff=not warm)
        l_cls = self.cls_loss(out, labels)
        logs = {"cls": l_cls.item()}
        if warm:
            return l_cls, logs
        image01 = denormalize(x)
        with torch.no_grad(), pass_mode(m, self.mode):
            cam, aff_top, grid_top = self.cam_and_affinity(m, x)
            cam = cam * labels[..., None, None]
            par_label = self.pseudo_label(image01, cam, labels, box)
            size = tuple(x.shape[-2:])
            high = resize(self.propagate(cam, aff_top, grid_top, labels, self.high), size)
            low = resize(self.propagate(cam, aff_top, grid_top, labels, self.low), size)
            aff_label = par_refine_scores_label(
                image01, high, low, labels, self.par, box, crop_to_box=bool(self.a.crop_to_box)
            )
        grid = out.grids[m.aff_layers[-1]]
        switch_aff = self.a.aff_target_switch_iter is not None and it > int(self.a.aff_target_switch_iter)
        target_aff = affinity_labels(
            aff_label if switch_aff else par_label,
            grid,
            self.window(grid, x.device),
            sampling=str(self.a.sampling),
        )
        l_aff = affinity_loss(out.aff, target_aff)
        seg_target = par_label if it <= int(self.a.switch_iter) else aff_label
        l_seg = seg_loss_bg_fg(out.seg, seg_target)
        loss = l_cls + float(self.a.seg_weight) * l_seg + float(self.a.aff_weight) * l_aff
        logs.update(seg=l_seg.item(), aff=l_aff.item())
        if float(self.a.reg_weight) > 0:
            probs = resize(out.seg, size).softmax(1)
            l_reg = energy_loss(probs, image01, box_mask(box, size), seg_target)
            loss = loss + float(self.a.reg_weight) * l_reg
            logs["reg"] = l_reg.item()
        return loss, logs

    @torch.no_grad()
    def extra_maps(
        self, net: WSSSNet, x: Tensor, image01: Tensor, labels: Tensor, cam: Tensor, scales: list[float],
        want: Collection[str],
    ) -> dict[str, Tensor]:
        """'aff': the CAM propagated with the single-scale affinity of the full image (official
        validation); 'aff_par': the same after PAR."""
        maps: dict[str, Tensor] = {}
        if not {"aff", "aff_par"} & set(want):
            return maps
        out = net.forward_cam(x, net.aff_layers)
        grid = out.grids[net.aff_layers[-1]]
        scores = resize(
            self.propagate(cam, out.aff, grid, labels, float(self.cfg.eval.aff_bkg_score)),
            tuple(x.shape[-2:]),
        )
        present = present_mask(labels)[..., None, None]
        if "aff" in want:
            maps["aff"] = channel_argmax(scores.masked_fill(~present, float("-inf")))
        if "aff_par" in want:
            maps["aff_par"] = self.par_argmax(image01, scores, labels)
        return maps
