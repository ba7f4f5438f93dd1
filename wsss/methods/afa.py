"""AFA (Ru et al., CVPR 2022): affinity from attention.

Per iteration, after a classification-only warm-up (``pseudo.warmup_iters``, the section every method
shares):
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

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from wsss.backbones.base import Backbone, BackboneOutput
from wsss.core.schema import MethodConfig, Rule, option
from wsss.heads.affinity import AffinityHead
from wsss.heads.base import MethodHead
from wsss.methods.base import MapInput, Method, pass_mode, register_method, resize, with_background
from wsss.model import NetOutput, WSSSNet, unwrap
from wsss.ops.cam_fusion import resize_kept
from wsss.ops.losses import affinity_loss, energy_loss, seg_loss_bg_fg
from wsss.refine.labels import (
    SAMPLING,
    affinity_labels,
    box_mask,
    channel_argmax,
    downscaled,
    oracle_affinity,
    pair_agreement,
    par_refine_scores_label,
    present_mask,
    token_labels,
)
from wsss.refine.par import ImageKernel
from wsss.refine.propagation import AFF_NORM_EPS, AFF_POWER, propagate_affinity_scores, window_mask


@dataclass
class AFAConfig(MethodConfig):
    """The ``afa`` section (defaults: the official VOC recipe). The warm-up and the segmentation loss's
    weight are the shared ``pseudo`` section's (``pseudo.warmup_iters``, ``pseudo.seg_weight``)."""

    aff_layers: list[int] = option([-2, -1], Rule("list", item="int"))  # blocks feeding the AFA head
    switch_iter: int = option(6000)  # seg target: PAR label until here, then the propagated label
    aff_target_switch_iter: int | None = option(None, Rule("int", 0, null=True))  # COCO: 15000
    aff_weight: float = option(0.1)
    reg_weight: float = option(0.0)  # released code: off; the paper's lambda3 = 0.01
    radius: int = option(8, Rule("int", 1))
    power: float = option(AFF_POWER, Rule("float", 0.0))
    norm_eps: float = option(AFF_NORM_EPS)
    window: str = option("square", Rule("str", choices=("square", "circle")))
    sampling: str = option("topleft", Rule("str", choices=SAMPLING))
    crop_to_box: bool = option(True)
    # "pooled" (official): one mean over all positive pairs, mostly background-background;
    # "balanced": background and foreground positives averaged apart (affinity_loss(background=...))
    aff_positives: str = option("pooled", Rule("str", choices=("pooled", "balanced")))
    # the affinity head (docs/methods/afa.md 2): the official random init and raw logits, or a zero
    # init (A = 0.5, no saturated sigmoid) and query-centred logits for pretrained ViTs
    head_init: str = option("kaiming", Rule("str", choices=("kaiming", "zero")))
    head_center: bool = option(False)


class AFAHead(AffinityHead, MethodHead):
    """The AFA affinity head on the attention of ``layers``: (B, N, N) in (0, 1) over the N patch
    tokens. A backbone's class tokens (ViT, DINOv2) are left out of the pairs: the head is elementwise
    per token pair, so this equals cutting the patch block out of its output."""

    def __init__(self, layers: list[int], backbone: Backbone, init: str = "kaiming", center: bool = False
                 ) -> None:
        layers = sorted(backbone.check_layers(layers))
        super().__init__(in_channels=sum(backbone.num_heads[i] for i in layers),
                         head_dims=[backbone.head_dims[i] for i in layers], init=init, center=center)
        self.attn_layers = tuple(layers)
        self.num_prefix = int(backbone.num_prefix_tokens)

    def forward(self, out: BackboneOutput) -> Tensor:  # type: ignore[override]
        t = self.num_prefix
        return super().forward([out.attn[i][..., t:, t:] if t else out.attn[i] for i in self.attn_layers])


@register_method
class AFAMethod(Method):
    name = "afa"
    Config = AFAConfig
    EXTRA_MAPS = ("aff", "aff_par")
    BKG_KEYS = {"cam": "eval.bkg_score", "cam_par": "eval.bkg_score", "aff": "eval.aff_bkg_score",
                "aff_par": "eval.aff_bkg_score"}
    PSEUDO_MAP = "aff_par"
    REFINED_MAP = "aff_par"
    # analysis: CAM + PAR, propagated with the learned / the ground-truth affinity, then PAR
    ORACLE_MAPS = ("cam_par", "learned_par", "oracle_par")
    HEAD = "aff_head"

    @classmethod
    def build_heads(cls, opts: Any, backbone: Backbone, num_classes: int) -> dict[str, MethodHead]:
        head = AFAHead(list(opts.aff_layers), backbone, str(opts.head_init), bool(opts.head_center))
        return {cls.HEAD: head}

    def __init__(self, cfg: Any, net: WSSSNet) -> None:
        super().__init__(cfg, net)
        if self.HEAD not in net.head_names:
            raise ValueError("method 'afa' needs a network with its affinity head (build_network(cfg, K))")
        self.a: AFAConfig = self.opts  # type: ignore[assignment]
        self.aff_bkg_score = float(cfg.eval.aff_bkg_score)  # the propagated CAM's background score
        self.head: AFAHead = net.heads[self.HEAD]  # type: ignore[assignment]

    @torch.no_grad()
    def affinity(self, net: WSSSNet, x: Tensor) -> tuple[Tensor, tuple[int, int], NetOutput]:
        """The learned affinity (B, N, N) of single-scale images (B, 3, H, W), its token grid and the
        CAM forward that made it."""
        out = net.forward_cam(x, heads=[self.HEAD])
        return (*self.affinity_of(out), out)

    def affinity_of(self, out: NetOutput) -> tuple[Tensor, tuple[int, int]]:
        """The learned affinity (B, N, N) a forward with the affinity head computed, and its token grid."""
        return out.heads[self.HEAD], out.grids[self.head.attn_layers[-1]]

    def window(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        return window_mask(grid[0], grid[1], int(self.a.radius), device=device, shape=str(self.a.window))

    def propagate(
        self, cam: Tensor, aff: Tensor, grid: tuple[int, int], labels: Tensor, bkgs: Sequence[float]
    ) -> list[Tensor]:
        """Propagate a foreground CAM (B, K, H, W) with an affinity (B, N, N) on ``grid``, once per
        background score of ``bkgs`` (the CAM's resize and the transition matrix are shared).

        Returns one score map (B, K+1, h, w) per score, on the token grid (background channel first)."""
        cam_g = resize_kept(cam, grid, labels)  # absent classes are masked by the propagation anyway
        return propagate_affinity_scores(
            cam_g,
            aff,
            labels,
            bkgs,
            window=self.window(grid, cam.device),
            power=float(self.a.power),
            eps=float(self.a.norm_eps),
        )

    @torch.no_grad()
    def cam_and_affinity(self, net: WSSSNet, x: Tensor, keep: Tensor | None = None,
                         first: NetOutput | None = None) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Multi-scale CAM (B, K, H, W) and the affinity (B, N, N) of the largest scale on its grid;
        with ``keep`` (B, K) only those classes' CAMs are computed, the others are zeros.

        At the largest scale the un-flipped images (the only ones the propagation uses) run with
        attention capture and the flipped copies without: explicit attention (the (B, heads, N, N)
        logits, their softmax and product) is computed for those B images only. ``first``: the
        training forward (:meth:`forward_rows`, its affinity head included), which stands in for the
        un-flipped forward at scale 1.
        """
        top = max(range(len(self.scales)), key=lambda i: self.scales[i])
        b = x.shape[0]
        cams, aff, grid = [], None, (0, 0)
        for i, s in enumerate(self.scales):
            xs = self.scale_inputs(x, s)
            if i != top:
                cams.append(self.label_forward(net, x, xs, first).cam)
                continue
            out = self.label_forward(net, x, xs[:b], first, heads=[self.HEAD])
            aff, grid = self.affinity_of(out)
            cams.append(out.cam if xs.shape[0] == b else torch.cat([out.cam, net.forward_cam(xs[b:]).cam]))
        return self.fuse_cams(cams, tuple(x.shape[-2:]), b, keep), aff, grid  # type: ignore[return-value]

    def training_step(
        self, net: nn.Module, batch: dict[str, Tensor], it: int
    ) -> tuple[Tensor, dict[str, float]]:
        x, labels, box = batch["image"], batch["labels"], batch["img_box"]
        m = unwrap(net)
        warm = it <= int(self.pseudo.warmup_iters)  # classification only; the rest is not computed at all
        out, l_cls, logs = self.classify(net, x, labels, with_seg=not warm, heads=not warm)
        if warm:
            return l_cls, logs
        image01 = self.par_image(x)
        first = self.forward_rows(m, out)
        with torch.no_grad(), pass_mode(m, self.mode):
            # keep=labels: the absent classes' maps are already 0 (no masking pass over the crop-size CAM)
            cam, aff_top, grid_top = self.cam_and_affinity(m, x, labels, first)
            # both labels refine on the half-size image: its PAR kernel is computed once (the
            # per-box refinement of crop_to_box works on each box's own image)
            held = ImageKernel(self.par, downscaled(image01, self.par_downscale))
            crop_to_box = bool(self.a.crop_to_box)
            par_label = self.pseudo_label(image01, cam, labels, box, held)
            size = tuple(x.shape[-2:])
            # token-grid scores: par_refine_scores_label upsamples them (bilinear, as the official
            # caller) after keeping the present classes
            high, low = self.propagate(cam, aff_top, grid_top, labels, (self.high, self.low))
            aff_label = par_refine_scores_label(
                image01, high, low, labels, self.par, box, crop_to_box=crop_to_box,
                downscale=self.par_downscale, kernel=None if crop_to_box else held,
            )
        grid = self.affinity_of(out)[1]
        switch_aff = self.a.aff_target_switch_iter is not None and it > int(self.a.aff_target_switch_iter)
        aff_source = aff_label if switch_aff else par_label
        target_aff = affinity_labels(
            aff_source,
            grid,
            self.window(grid, x.device),
            sampling=str(self.a.sampling),
        )
        background = None
        if self.a.aff_positives == "balanced":
            background = token_labels(aff_source, grid, str(self.a.sampling)).flatten(1) == 0
        l_aff = affinity_loss(out.heads[self.HEAD], target_aff, background)
        seg_target = par_label if it <= int(self.a.switch_iter) else aff_label
        l_seg = seg_loss_bg_fg(out.seg, seg_target)
        loss = l_cls + float(self.pseudo.seg_weight) * l_seg + float(self.a.aff_weight) * l_aff
        logs.update(seg=l_seg.item(), aff=l_aff.item())
        if float(self.a.reg_weight) > 0:
            probs = resize(out.seg, size).softmax(1)
            l_reg = energy_loss(probs, image01, box_mask(box, size), seg_target)
            loss = loss + float(self.a.reg_weight) * l_reg
            logs["reg"] = l_reg.item()
        return loss, logs

    def eval_capture(self, scale: float, want: set[str]) -> dict[str, Any]:
        """The affinity head on the scale-1 CAM forward, when 'aff' / 'aff_par' are wanted."""
        return {"heads": [self.HEAD]} if scale == 1.0 and {"aff", "aff_par"} & want else {}

    def eval_keep(self, out: NetOutput, scale: float, labels: Tensor, want: set[str]) -> Any:
        """(affinity (B, N, N) of the un-flipped images, its grid) from the scale-1 forward."""
        if self.HEAD not in out.heads:
            return None
        aff, grid = self.affinity_of(out)
        return aff[: labels.shape[0]], grid

    @torch.no_grad()
    def extra_maps(self, net: WSSSNet, inp: MapInput, want: Collection[str]) -> dict[str, Tensor]:
        """'aff': the CAM propagated with the single-scale affinity of the full image (official
        validation; taken from the evaluation's scale-1 CAM forward when it ran one); 'aff_par': the
        same after PAR."""
        x, image01, labels, cam = inp.x, inp.image01, inp.labels, inp.cam
        maps: dict[str, Tensor] = {}
        if not {"aff", "aff_par"} & set(want):
            return maps
        kept = inp.kept.get(1.0)
        aff, grid = kept if kept is not None else self.affinity(net, x)[:2]
        scores = resize(self.propagate(cam, aff, grid, labels, (self.aff_bkg_score,))[0], tuple(x.shape[-2:]))
        present = present_mask(labels)[..., None, None]
        if "aff" in want:
            maps["aff"] = channel_argmax(scores.masked_fill(~present, float("-inf")))
        if "aff_par" in want:
            maps["aff_par"] = self.par_argmax(image01, scores, labels, inp.kernel)
        return maps

    # ------------------------------------------- analysis hooks (wsss.analysis.hooks protocols)
    @torch.no_grad()
    def oracle_batch(self, net: WSSSNet, x: Tensor, labels: Tensor, gt: Tensor
                     ) -> tuple[dict[str, Tensor], Tensor | None]:
        """The 'aff_par' map with the learned affinity and with the oracle one (:func:`oracle_affinity`
        inside the window), through the same propagation and PAR."""
        bkg, aff_bkg = self.bkg_score, self.aff_bkg_score
        cam = self.multiscale_cam(net, x, [1.0], keep=labels) * labels[..., None, None]
        aff, grid, _ = self.affinity(net, x)
        target = affinity_labels(gt, grid, self.window(grid, x.device), sampling=str(self.a.sampling))
        kernel = ImageKernel(self.par, x)  # every map refines on x
        maps = {"cam_par": self.par_argmax(x, with_background(cam, bkg), labels, kernel)}
        for name, a in (("learned_par", aff), ("oracle_par", oracle_affinity(target).to(aff.dtype))):
            scores = resize(self.propagate(cam, a, grid, labels, (aff_bkg,))[0], tuple(x.shape[-2:]))
            maps[name] = self.par_argmax(x, scores, labels, kernel)
        background = token_labels(gt, grid, str(self.a.sampling)).flatten(1) == 0
        return maps, pair_agreement(aff, target, background)

    def oracle_protocol(self) -> dict[str, Any]:
        return {"window_radius": int(self.a.radius), "aff_bkg_score": self.aff_bkg_score,
                "sampling": str(self.a.sampling)}

    @torch.no_grad()
    def affinity_probe(self, net: WSSSNet, x: Tensor) -> dict[str, Any]:
        aff, grid, out = self.affinity(net, x)
        return {"affinity": aff, "grid": grid, "attn": [out.attn[i] for i in self.head.attn_layers],
                "cam": out.cam}

    def head_weights(self, net: WSSSNet) -> dict[str, Any]:
        """The affinity head's 1x1 conv weight per attention head, its bias and its layers."""
        w = self.head.proj.weight.detach().reshape(-1).cpu()
        names = [f"L{i}h{h}" for i in self.head.attn_layers for h in range(net.backbone.num_heads[i])]
        return {"layers": list(self.head.attn_layers), "weights": w.tolist(), "heads": names,
                "bias": float(self.head.proj.bias.detach())}
