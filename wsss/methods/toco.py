"""ToCo (Ru et al., CVPR 2023): token contrast for end-to-end WSSS with a ViT.

Per iteration (official ``dist_train_voc_seg_neg.py``):
1. the training forward gives the classification logits of the final CAM head, those of an
   auxiliary CAM head on the patch tokens of an intermediate block (``aux_layer``, -3 on ViT-B), the
   final patch-token map, the projected class token and the segmentation logits;
2. a no-grad multi-scale + flip pass gives both CAMs, fused like AFA's;
3. PTC: token labels from the auxiliary CAM (``cam.high`` / ``cam.low``, uncertain tokens ignored)
   make same / different pairs; the final patch tokens' |cosine| is pulled to 1 / pushed to 0;
4. CTC: a second global view (random resized crop, colour jitter) and ``num_local_crops`` local
   crops centred in the auxiliary CAM's uncertain or background regions go through the backbone;
   their projected class tokens (student) are contrasted with an EMA teacher head's projections of
   the two global views, local crops that are almost all background serving as negatives;
5. after ``seg_start_iter`` the segmentation head (LargeFOV on the final map) learns from the
   PAR-refined two-threshold label of the final CAM (COCO: of the auxiliary CAM until
   ``aux_seg_until``), with the regularised (energy) loss.
Loss: L_cls + L_cls_aux + 0.2 L_ptc + 0.5 L_ctc + 0.1 L_seg + 0.05 L_reg.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from wsss.backbones.base import Backbone, BackboneOutput
from wsss.core.param_rules import ParamRule, prefix
from wsss.core.registry import PARAM_RULES
from wsss.core.schema import MethodConfig, Rule, option
from wsss.heads.base import MethodHead
from wsss.heads.classifier import CAMHead
from wsss.heads.largefov import LargeFOVHead
from wsss.heads.projection import ProjectionHead, ema_update_
from wsss.methods.base import MapInput, Method, pass_mode, register_method, resize, unwrap
from wsss.model import NetOutput, WSSSNet
from wsss.ops.contrast import (
    class_token_contrast,
    patch_token_contrast,
    sample_local_crops,
    token_grid_labels,
    token_pair_labels,
    uncertain_regions,
)
from wsss.ops.losses import energy_loss, multilabel_soft_margin, seg_loss_bg_fg
from wsss.ops.views import color_jitter, random_resized_crop, uniform
from wsss.refine.labels import box_mask, cam_to_label

SEG_HEADS = ("largefov", "model")


@dataclass
class ToCoConfig(MethodConfig):
    """The ``toco`` section (defaults: the official VOC recipe)."""

    aux_layer: int = option(-3, Rule("int"))  # block whose patch tokens give the auxiliary CAM
    aux_weight: float = option(1.0)
    seg_start_iter: int = option(2000)  # segmentation (+ energy) loss after this iteration (COCO: 8000)
    contrast_start_iter: int = option(0)  # PTC and CTC after this iteration (COCO: 12000)
    aux_seg_until: int | None = option(None, Rule("int", 0, null=True))  # COCO: aux CAM seg labels (12000)
    # the segmentation decoder: "model", the network's seg head (model.seg_head), or "largefov", the
    # official ToCo decoder as a method head, evaluated single-scale only (the engine's multi-scale,
    # flip and CRF segmentation reads the network's seg head)
    seg_head: str = option("model", Rule("str", choices=SEG_HEADS))
    seg_embed_dim: int = option(512, Rule("int", 1))  # LargeFOV width
    seg_weight: float = option(0.1)
    reg_weight: float = option(0.05)
    ptc_weight: float = option(0.2)
    ctc_weight: float = option(0.5)
    temperature: float = option(0.5, Rule("float", 1e-6))  # COCO: 1.0
    momentum: float = option(0.9, Rule("float", 0.0, 1.0))  # EMA of the teacher projection head
    num_local_crops: int = option(8, Rule("int", 1))
    local_crop_size: int = option(96, Rule("int", 1))
    negative_ratio: float = option(0.2, Rule("float", 0.0, 2.0))  # mean region value at or below: negative
    view_scale: list[float] = option([0.4, 1.0], Rule("list", 0.0, 1.0, length=2))  # second global view area
    color_jitter: bool = option(True)  # on the second global view and the local crops
    proj_dim: int = option(1024, Rule("int", 1))
    proj_hidden_dim: int = option(2048, Rule("int", 1))
    proj_bottleneck_dim: int = option(256, Rule("int", 1))
    proj_layers: int = option(3, Rule("int", 1))

    def check(self, where: str) -> None:
        lo, hi = self.view_scale
        if not 0.0 < lo <= hi:
            raise ValueError(f"config key '{where}.view_scale' must be [lo, hi] with 0 < lo <= hi <= 1, "
                             f"got {self.view_scale}")


# ------------------------------------------------------------------------------------------------
# Heads


def _token_map(tokens: Tensor, prefix: int, grid: tuple[int, int]) -> Tensor:
    """Block output (B, T + h*w, D) -> patch-token map (B, D, h, w)."""
    b, _, d = tokens.shape
    return tokens[:, prefix:].transpose(1, 2).reshape(b, d, *grid)


class AuxCAMHead(MethodHead):
    """CAM classifier (1x1, no bias, GMP) on the patch tokens of block ``layer`` (not normalised, as
    official). Output (B, K, 1 + h*w): column 0 the image logits, then the raw CAM row-major
    (:meth:`split`), so one tensor carries both."""

    def __init__(self, layer: int, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.feature_layers = (sorted(backbone.check_layers([layer]))[0],)
        self.prefix = int(backbone.num_prefix_tokens)
        self.cam_head = CAMHead(int(backbone.out_channels[-1]), num_classes)  # CAMHead defaults: as official

    def forward(self, out: BackboneOutput) -> Tensor:  # type: ignore[override]
        layer = self.feature_layers[0]
        logits, cam = self.cam_head(_token_map(out.blocks[layer], self.prefix, out.block_grids[layer]))
        return torch.cat([logits[:, :, None], cam.flatten(2)], dim=2)

    @staticmethod
    def split(packed: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(B, K, 1 + h*w) -> logits (B, K), raw CAM (B, K, h, w)."""
        return packed[:, :, 0], packed[:, :, 1:].reshape(*packed.shape[:2], *grid)


class FinalTokens(MethodHead):
    """No parameters: the final patch-token map ``features[-1]`` (B, D, h, w) (PTC's input)."""

    def forward(self, out: BackboneOutput) -> Tensor:  # type: ignore[override]
        return out.features[-1]


class ClassTokenProjection(ProjectionHead, MethodHead):
    """The CTC projection of the first class token (B, P); ``teacher=True``: of the detached token,
    parameters frozen (updated by EMA only)."""

    def __init__(self, backbone: Backbone, opts: ToCoConfig, teacher: bool = False) -> None:
        super().__init__(int(backbone.out_channels[-1]), opts.proj_dim, opts.proj_hidden_dim,
                         opts.proj_bottleneck_dim, opts.proj_layers)
        self.teacher = teacher
        if teacher:
            self.requires_grad_(False)

    def forward(self, out: BackboneOutput) -> Tensor:  # type: ignore[override]
        token = out.prefix[:, 0]  # type: ignore[index]
        return super().forward(token.detach() if self.teacher else token)


class LargeFOVSegHead(LargeFOVHead, MethodHead):
    """ToCo's segmentation decoder on the final patch-token map: logits (B, K+1, h, w)."""

    def forward(self, out: BackboneOutput) -> Tensor:  # type: ignore[override]
        return super().forward(out.features)


# ------------------------------------------------------------------------------------------------
# Method


@register_method
class ToCoMethod(Method):
    name = "toco"
    Config = ToCoConfig
    EXTRA_MAPS = ("cam_aux",)
    PSEUDO_MAP = "cam_par"
    AUX, TOKENS, PROJ, TEACHER, SEG = "aux_cam", "ptc_tokens", "ctc_proj", "ctc_teacher", "toco_seg"

    @classmethod
    def build_heads(cls, opts: Any, backbone: Backbone, num_classes: int) -> dict[str, MethodHead]:
        if int(getattr(backbone, "num_prefix_tokens", 0)) < 1:
            raise ValueError(
                f"method 'toco' contrasts class tokens: {type(backbone).__name__} has none "
                "(use a ViT/DeiT, or the hybrid with backbone_kwargs num_class_tokens: 1)"
            )
        multiple = int(getattr(backbone, "input_multiple", 1))
        if int(opts.local_crop_size) % multiple:
            raise ValueError(f"config key 'toco.local_crop_size' must be a multiple of the backbone's input "
                             f"multiple {multiple}, got {opts.local_crop_size}")
        heads: dict[str, MethodHead] = {
            cls.AUX: AuxCAMHead(int(opts.aux_layer), backbone, num_classes),
            cls.TOKENS: FinalTokens(),
            cls.PROJ: ClassTokenProjection(backbone, opts),
            cls.TEACHER: ClassTokenProjection(backbone, opts, teacher=True),
        }
        heads[cls.TEACHER].load_state_dict(heads[cls.PROJ].state_dict())  # teacher starts as the student
        if opts.seg_head == "largefov":
            heads[cls.SEG] = LargeFOVSegHead(int(backbone.out_channels[-1]), num_classes + 1,
                                             int(opts.seg_embed_dim))
        return heads

    def __init__(self, cfg: Any, net: WSSSNet) -> None:
        super().__init__(cfg, net)
        self.o: ToCoConfig = self.opts  # type: ignore[assignment]
        missing = {self.AUX, self.TOKENS, self.PROJ, self.TEACHER} - set(net.head_names)
        if missing:
            raise ValueError(f"method 'toco' needs a network with its heads {sorted(missing)} "
                             "(build_network(cfg, K))")
        self.seg_name = self.SEG if self.o.seg_head == "largefov" else None
        self.has_seg = self.seg_name is not None or net.seg_head is not None
        if self.seg_name is not None:
            _check_own_seg(cfg, net)
        crop = cfg.data.get("crop_size") if hasattr(cfg, "data") else None
        if crop is not None and int(self.o.local_crop_size) >= int(crop):
            raise ValueError(f"config key 'toco.local_crop_size' ({self.o.local_crop_size}) must be smaller "
                             f"than data.crop_size ({crop}): local crops are cut from the training crop")

    # ----------------------------------------------------------------- CAM passes
    @torch.no_grad()
    def both_cams(self, net: WSSSNet, x: Tensor, scales: list[float] | None = None,
                  keep: Tensor | None = None, first: NetOutput | None = None) -> tuple[Tensor, Tensor]:
        """Normalised multi-scale (+flip) final and auxiliary CAMs, each (B, K, H, W) in [0, 1] (only
        the ``keep`` classes, see :meth:`fuse_cams`). ``first``: the training forward
        (:meth:`~wsss.methods.base.Method.forward_rows`, its auxiliary head included), which stands in
        for the un-flipped forward at scale 1."""
        cams, auxs = [], []
        for s in scales or self.scales:
            out = self.label_forward(net, x, self.scale_inputs(x, s), first, heads=[self.AUX])
            cams.append(out.cam)
            auxs.append(AuxCAMHead.split(out.heads[self.AUX], tuple(out.cam.shape[-2:]))[1])
        size, b = tuple(x.shape[-2:]), x.shape[0]
        return self.fuse_cams(cams, size, b, keep), self.fuse_cams(auxs, size, b, keep)

    # ----------------------------------------------------------------- contrast
    def global_view(self, image01: Tensor) -> Tensor:
        """The second global view of [0, 1] images: random resized crop (+ flip), colour jitter."""
        view = random_resized_crop(image01, scale=tuple(self.o.view_scale))  # type: ignore[arg-type]
        return color_jitter(view) if self.o.color_jitter else view

    def local_views(self, image01: Tensor, cam_aux: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Local crops (B * n, 3, s, s) from the uncertain regions of the auxiliary CAM and their
        positive flags (B, n); each crop mirrored with probability 1/2, colour-jittered."""
        region = uncertain_regions(cam_aux, labels, self.high, self.low)
        crops, positive = sample_local_crops(image01, region, int(self.o.num_local_crops),
                                             int(self.o.local_crop_size), float(self.o.negative_ratio))
        crops = crops.flatten(0, 1)
        flip = uniform((crops.shape[0],), None, crops.device)[:, None, None, None] < 0.5
        crops = torch.where(flip, crops.flip(-1), crops)
        return (color_jitter(crops) if self.o.color_jitter else crops), positive

    def grad_views(self, x: Tensor) -> list[Tensor]:
        """The second global view (B, 3, H, W) and B * n local crops of the crop size."""
        s, n = int(self.o.local_crop_size), int(self.o.num_local_crops)
        return [self.global_view(x), x[..., :s, :s].repeat_interleave(n, 0)]

    def ctc_loss(self, m: WSSSNet, out: Any, image01: Tensor, cam_aux: Tensor, labels: Tensor) -> Tensor:
        """Class token contrast: the main forward's projections (global view 1) plus those of the
        second global view and the local crops; the teacher sees the two global views.

        The extra views run on the unwrapped network: every parameter they use is also in the main
        (DDP) forward's graph, so DDP sees one forward per backward."""
        b = image01.shape[0]
        view = m(self.global_view(image01), with_seg=False, heads=[self.PROJ, self.TEACHER])
        crops, positive = self.local_views(image01, cam_aux, labels)
        local = m(crops, with_seg=False, heads=[self.PROJ]).heads[self.PROJ]
        student = torch.cat([out.heads[self.PROJ][:, None], view.heads[self.PROJ][:, None],
                             local.view(b, -1, local.shape[-1])], dim=1)
        teacher = torch.stack([out.heads[self.TEACHER], view.heads[self.TEACHER]], dim=1)
        flags = torch.cat([positive.new_ones(b, 2), positive], dim=1)
        return class_token_contrast(student, teacher, flags, float(self.o.temperature))

    def ptc_loss(self, out: Any, cam_aux: Tensor, labels: Tensor, box: Tensor) -> Tensor:
        """Patch token contrast on the final token map with token labels from the auxiliary CAM."""
        tokens = out.heads[self.TOKENS]
        tok = token_grid_labels(cam_aux, labels, tuple(tokens.shape[-2:]), self.high, self.low,
                                self.bkg_score, box)
        return patch_token_contrast(tokens, token_pair_labels(tok))

    # ----------------------------------------------------------------- training
    def training_step(
        self, net: nn.Module, batch: dict[str, Tensor], it: int
    ) -> tuple[Tensor, dict[str, float]]:
        x, labels, box = batch["image"], batch["labels"], batch["img_box"]
        m, o = unwrap(net), self.o
        use_seg = self.has_seg and it > int(o.seg_start_iter)
        use_con = it > int(o.contrast_start_iter)
        heads = [self.AUX] + ([self.TOKENS, self.PROJ, self.TEACHER] if use_con else [])
        heads += [self.seg_name] if (use_seg and self.seg_name) else []
        if use_con:
            ema_update_(m.heads[self.TEACHER], m.heads[self.PROJ], float(o.momentum))
        out = net(x, with_seg=use_seg and self.seg_name is None, heads=heads)
        aux_logits = AuxCAMHead.split(out.heads[self.AUX], tuple(out.cam.shape[-2:]))[0]
        l_cls, l_aux = self.cls_loss(out, labels), multilabel_soft_margin(aux_logits, labels)
        loss = l_cls + float(o.aux_weight) * l_aux
        logs = {"cls": l_cls.item(), "cls_aux": l_aux.item()}
        if not (use_seg or use_con):
            return loss, logs
        image01 = x.clamp(0.0, 1.0)  # the [0, 1] image (random erasing may leave that range)
        first = self.forward_rows(m, out)
        with torch.no_grad(), pass_mode(m, self.mode):
            cam, cam_aux = self.both_cams(m, x, keep=labels, first=first)
            cam, cam_aux = cam * labels[..., None, None], cam_aux * labels[..., None, None]
        if use_con:
            l_ptc = self.ptc_loss(out, cam_aux, labels, box)
            l_ctc = self.ctc_loss(m, out, image01, cam_aux, labels)
            loss = loss + float(o.ptc_weight) * l_ptc + float(o.ctc_weight) * l_ctc
            logs.update(ptc=l_ptc.item(), ctc=l_ctc.item())
        if use_seg:
            from_aux = o.aux_seg_until is not None and it <= int(o.aux_seg_until)
            loss = loss + self.seg_losses(out, image01, cam_aux if from_aux else cam, labels, box, logs)
        return loss, logs

    def seg_losses(self, out: Any, image01: Tensor, cam: Tensor, labels: Tensor, box: Tensor,
                   logs: dict[str, float]) -> Tensor:
        """0.1 L_seg + 0.05 L_reg against the PAR-refined label of ``cam`` (B, K, H, W)."""
        with torch.no_grad():
            target = self.pseudo_label(image01, cam, labels, box)
        seg = out.heads[self.seg_name] if self.seg_name else out.seg
        l_seg = seg_loss_bg_fg(seg, target)
        logs["seg"] = l_seg.item()
        loss = float(self.o.seg_weight) * l_seg
        if float(self.o.reg_weight) > 0:
            size = tuple(image01.shape[-2:])
            l_reg = energy_loss(resize(seg, size).softmax(1), image01, box_mask(box, size), target)
            logs["reg"] = l_reg.item()
            loss = loss + float(self.o.reg_weight) * l_reg
        return loss

    # ----------------------------------------------------------------- evaluation
    def eval_capture(self, scale: float, want: set[str]) -> dict[str, Any]:
        """The auxiliary CAM head on every CAM forward, when 'cam_aux' is wanted."""
        return {"heads": [self.AUX]} if "cam_aux" in want else {}

    def eval_keep(self, out: NetOutput, scale: float, labels: Tensor, want: set[str]) -> Any:
        """This scale's raw auxiliary CAM (2B or B rows)."""
        if self.AUX not in out.heads:
            return None
        return AuxCAMHead.split(out.heads[self.AUX], tuple(out.cam.shape[-2:]))[1]

    @torch.no_grad()
    def extra_maps(self, net: WSSSNet, inp: MapInput, want: Collection[str]) -> dict[str, Tensor]:
        """'cam_aux': the multi-scale auxiliary CAM thresholded at ``eval.bkg_score`` (from the
        evaluation's CAM forwards when they ran)."""
        if "cam_aux" not in want:
            return {}
        labels, kept = inp.labels, inp.kept_all()
        if kept is None:
            _, cam_aux = self.both_cams(net, inp.x, inp.scales, keep=labels)
        else:
            cam_aux = self.fuse_cams(kept, tuple(inp.x.shape[-2:]), inp.x.shape[0], keep=labels)
        return {"cam_aux": cam_to_label(cam_aux * labels[..., None, None], labels, bkg_score=self.bkg_score)}

    def map_names(self, net: WSSSNet) -> tuple[str, ...]:
        names = super().map_names(net)
        return (*names, "seg") if self.seg_name and "seg" not in names else names

    @torch.no_grad()
    def segment(self, net: WSSSNet, x: Tensor) -> Tensor | None:
        if self.seg_name is None:
            return super().segment(net, x)
        out = net.forward_cam(x, heads=[self.seg_name])
        return resize(out.heads[self.seg_name], tuple(x.shape[-2:]))

    def multiscale_segment(self, net: WSSSNet, x: Tensor, scales: list[float], flip: bool,
                           segs: list[Tensor] | None = None) -> Tensor | None:
        """The network's multi-scale seg map; the LargeFOV head has none (single scale, no flip)."""
        if self.seg_name is None:
            return super().multiscale_segment(net, x, scales, flip, segs)
        if [float(s) for s in scales] == [1.0] and not flip:
            return self.segment(net, x)
        raise ValueError(f"toco.seg_head 'largefov' is evaluated single-scale without flip, not at scales "
                         f"{list(scales)} with flip={flip}: evaluate with --scales 1.0 and without --flip, "
                         "or train with toco.seg_head: model")


@PARAM_RULES.register("toco")
def toco_rules(encoder_prefix: str = "backbone.", head_mult: float = 10.0) -> list[ParamRule]:
    """ToCo ``network.get_param_groups``: every encoder parameter (LayerNorms and class token included)
    at lr x1 with the default weight decay; the classifiers, projection head and decoder at
    ``head_mult``. The EMA teacher head takes no gradient and is left out."""
    return [ParamRule(prefix(encoder_prefix), name="encoder"),
            ParamRule(lambda _n, _p: True, lr_mult=head_mult, name="heads")]


def _check_own_seg(cfg: Any, net: WSSSNet) -> None:
    """The LargeFOV method head replaces the network's seg head and is evaluated single-scale."""
    if net.seg_head is not None:
        raise ValueError("toco.seg_head 'largefov' brings its own segmentation head: set "
                         "model.seg_head.enabled false (or toco.seg_head: model)")
    if bool(cfg.eval.flip) or [float(s) for s in cfg.eval.scales] != [1.0]:
        raise ValueError("toco.seg_head 'largefov' is evaluated single-scale without flip (the multi-scale "
                         "segmentation reads the network's seg head): set eval.scales [1.0] and eval.flip "
                         "false, or toco.seg_head: model")

