"""What every method shares: the PAR module, CAM passes, and evaluation label maps.

A method turns a batch into losses (``training_step``) and an image into label maps
(``predict``). Methods never loop over images: every piece they call is batched.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.model import NetOutput, WSSSNet
from wsss.ops.cam import fuse_multiscale
from wsss.ops.losses import multilabel_soft_margin
from wsss.refine.labels import cam_to_label, par_argmax_label, par_pseudo_label
from wsss.refine.par import PAR


def unwrap(net: nn.Module) -> WSSSNet:
    """The WSSSNet inside a DDP wrapper (no-grad passes bypass DDP)."""
    return net.module if hasattr(net, "module") else net  # type: ignore[return-value]


def resize(x: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def scale_size(size: tuple[int, int], s: float) -> tuple[int, int]:
    """Official scaling: (int(s*H), int(s*W))."""
    return int(s * size[0]), int(s * size[1])


@contextmanager
def pass_mode(net: nn.Module, mode: str) -> Iterator[None]:
    """Run the no-grad CAM passes in train mode (official: DropPath and BN statistics active) or eval."""
    was = net.training
    net.train(mode == "train")
    try:
        yield
    finally:
        net.train(was)


class Method:
    """Base class. Subclasses implement ``training_step`` and add their maps in ``predict``."""

    name = "base"
    uses_seg = True
    MAPS: tuple[str, ...] = ("cam", "cam_par", "pseudo")  # from the multi-scale CAM
    EXTRA_MAPS: tuple[str, ...] = ()  # a method's own maps (:meth:`extra_maps`)
    OWN_PSEUDO = False  # extra_maps makes the 'pseudo' map itself

    def __init__(self, cfg: Any, net: WSSSNet) -> None:
        self.cfg = cfg
        p = cfg.par
        self.par = PAR(dilations=tuple(p.dilations), num_iter=int(p.num_iter), w1=float(p.w1), w2=float(p.w2))
        self.high = float(cfg.cam.high)
        self.low = float(cfg.cam.low)
        self.scales = [float(s) for s in cfg.cam.scales]
        self.flip = bool(cfg.cam.flip)
        self.fuse = str(cfg.cam.fuse)
        self.mode = str(cfg.train.cam_pass_mode)

    # ----------------------------------------------------------------- training
    def training_step(
        self, net: nn.Module, batch: dict[str, Tensor], it: int
    ) -> tuple[Tensor, dict[str, float]]:
        raise TypeError(f"{type(self).__name__} must define training_step")

    def attn_layers(self, net: WSSSNet) -> list[int]:
        """Layers the gradient forward must capture."""
        return []

    @staticmethod
    def cls_loss(out: NetOutput, labels: Tensor) -> Tensor:
        return sum(multilabel_soft_margin(lg, labels) for lg in out.logits)  # type: ignore[return-value]

    # ----------------------------------------------------------------- CAM passes
    def fuse_kwargs(self) -> dict[str, Any]:
        if self.fuse == "afa":
            return {"flip_fuse": "max", "relu": "each", "eps": 1e-5}
        if self.fuse == "aream":
            return {"flip_fuse": "sum", "relu": "after", "eps": 1e-6}
        raise ValueError(f"cam.fuse must be 'afa' or 'aream', got {self.fuse!r}")

    def scale_inputs(self, x: Tensor, s: float) -> Tensor:
        xs = resize(x, scale_size(tuple(x.shape[-2:]), s)) if s != 1.0 else x
        return torch.cat([xs, xs.flip(-1)]) if self.flip else xs

    def fuse_cams(self, cams: list[Tensor], size: tuple[int, int], batch: int) -> Tensor:
        """Raw CAMs of [x_s, flip(x_s)] (2B rows) or of x_s alone (B rows) -> normalised (B, K, H, W)."""
        return fuse_multiscale(cams, size, batch, **self.fuse_kwargs())

    @torch.no_grad()
    def multiscale_cam(self, net: WSSSNet, x: Tensor, scales: list[float] | None = None) -> Tensor:
        """Normalised multi-scale (+flip) CAM (B, K, H, W) in [0, 1]."""
        cams = []
        for s in scales or self.scales:
            cams.append(net.forward_cam(self.scale_inputs(x, s)).cam)
        return self.fuse_cams(cams, tuple(x.shape[-2:]), x.shape[0])

    def pseudo_label(self, image01: Tensor, cam: Tensor, labels: Tensor, img_box: Tensor | None) -> Tensor:
        """PAR-refined label with the high/low background scores (B, H, W), 255 = uncertain."""
        return par_pseudo_label(
            image01,
            cam,
            labels,
            self.par,
            high=self.high,
            low=self.low,
            img_box=img_box,
            downscale=int(self.cfg.par.downscale),
        )

    # ----------------------------------------------------------------- evaluation
    def par_argmax(self, image01: Tensor, scores: Tensor, labels: Tensor) -> Tensor:
        """Refine a score stack (B, K+1, h, w) with PAR at full resolution and take the argmax."""
        return par_argmax_label(image01, scores, labels, self.par)

    @torch.no_grad()
    @contextmanager
    def flipping(self, flip: bool) -> Iterator[None]:
        """CAM passes with (``True``) or without the flipped copy for the duration of the block."""
        saved, self.flip = self.flip, bool(flip)
        try:
            yield
        finally:
            self.flip = saved

    def map_names(self, net: WSSSNet) -> tuple[str, ...]:
        """The label maps :meth:`predict` produces for ``net``."""
        return (*self.MAPS, *self.EXTRA_MAPS, *(("seg",) if net.seg_head is not None else ()))

    def predict(
        self, net: WSSSNet, x: Tensor, image01: Tensor, labels: Tensor, scales: list[float], flip: bool,
        maps: Collection[str] | None = None,
    ) -> dict[str, Tensor]:
        """Label maps (B, H, W) for evaluation: CAM, CAM+PAR, pseudo label, segmentation head; only
        those named in ``maps`` are computed (None: all of :meth:`map_names`).

        labels are the ground-truth image labels (the standard protocol for CAM / pseudo-label
        evaluation); the segmentation head does not use them.
        """
        want = set(self.map_names(net) if maps is None else maps)
        out: dict[str, Tensor] = {}
        if want & {*self.MAPS, *self.EXTRA_MAPS}:
            with self.flipping(flip):
                cam = self.multiscale_cam(net, x, scales) * labels[..., None, None]
                bkg = float(self.cfg.eval.bkg_score)
                if "cam" in want:
                    out["cam"] = cam_to_label(cam, labels, bkg_score=bkg)
                if "cam_par" in want:
                    out["cam_par"] = self.par_argmax(image01, with_background(cam, bkg), labels)
                if "pseudo" in want and not self.OWN_PSEUDO:
                    out["pseudo"] = self.pseudo_label(image01, cam, labels, None)
                out.update(self.extra_maps(net, x, image01, labels, cam, scales, want))
        if "seg" in want:
            seg = self.segment(net, x)
            if seg is not None:
                out["seg"] = seg.argmax(1)
        return out

    def extra_maps(
        self, net: WSSSNet, x: Tensor, image01: Tensor, labels: Tensor, cam: Tensor, scales: list[float],
        want: Collection[str],
    ) -> dict[str, Tensor]:
        """A method's own evaluation maps named in ``want``, given the normalised multi-scale CAM
        (B, K, H, W)."""
        return {}

    @torch.no_grad()
    def segment(self, net: WSSSNet, x: Tensor) -> Tensor | None:
        """Segmentation logits at the input size (B, K+1, H, W), or None without a seg head."""
        if net.seg_head is None:
            return None
        out = net(x, with_seg=True, with_aff=False)
        return resize(out.seg, tuple(x.shape[-2:]))  # type: ignore[arg-type]


def with_background(cam: Tensor, score: float) -> Tensor:
    """Prepend a constant background channel: (B, K, H, W) -> (B, K+1, H, W)."""
    return torch.cat([cam.new_full((cam.shape[0], 1, *cam.shape[2:]), score), cam], dim=1)


def present_mask(labels: Tensor) -> Tensor:
    """(B, K+1) bool: background plus the present classes."""
    return torch.cat([labels.new_ones(labels.shape[0], 1), labels], dim=1) > 0
