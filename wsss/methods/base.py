"""What every method shares: its plugin interface, the ``pseudo`` config section, the PAR module, CAM
passes, evaluation label maps.

A method turns a batch into losses (``training_step``) and an image into label maps
(``predict``). Methods never loop over images: every piece they call is batched.

The plugin interface (see "How to add a method" in docs/ARCHITECTURE.md): a method is one module in
``wsss/methods/`` whose :class:`Method` subclass is registered with ``@register_method``. It declares

- ``name`` (the config's ``method``) and ``Config``: a :class:`MethodConfig` dataclass of its config
  section ``cfg.<section>`` (``section`` defaults to ``name``): keys, defaults and value rules, checked
  when a config is loaded and when the method is built;
- ``build_heads(opts, backbone, num_classes)``: the heads it adds to the network
  (:class:`wsss.heads.base.MethodHead`, by name);
- ``MAPS`` / ``EXTRA_MAPS``: the label maps it evaluates, ``PSEUDO_MAP``: the one that is its pseudo
  label (what a second stage learns from), ``REFINED_MAP``: its refined CAM map (reports);
- ``training_step`` and, for its own maps, ``extra_maps``; ``score_cam`` for the CAM its sweep and
  saved scores use; ``eval_capture`` / ``eval_keep`` to compute its own maps from the evaluation's
  CAM forwards instead of forwards of their own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.backbones._layers import DropPath
from wsss.backbones.base import Backbone
from wsss.core.registry import METHODS
from wsss.core.schema import MethodConfig as MethodConfig  # re-exported: the base of method sections
from wsss.core.schema import option as option
from wsss.heads.base import MethodHead
from wsss.model import NetOutput, WSSSNet
from wsss.model import unwrap as unwrap  # re-exported: methods import it from here
from wsss.ops.cam_fusion import (
    FUSE_PRESETS,
    fuse_multiscale,
    fuse_multiscale_seg,
    multiscale_cam,
    scaled_input,
)
from wsss.ops.losses import multilabel_soft_margin
from wsss.refine.labels import (
    cam_to_label,
    par_argmax_label,
    par_pseudo_label,
)
from wsss.refine.par import PAR, ImageKernel
from wsss.refine.resize import resize_bilinear


@dataclasses.dataclass
class MapInput:
    """What a method's own label maps are computed from (:meth:`Method.extra_maps`).

    x: padded [0, 1] RGB images (B, 3, H, W) (the network's input and PAR's image); labels: (B, K)
    ground-truth image labels; cam: the normalised multi-scale CAM (B, K, H, W) masked by ``labels``;
    scales: the CAM scales; kept: per scale, what :meth:`Method.eval_keep` took from that scale's CAM
    forward (empty when the maps are asked for without those forwards: compute them afresh); kernel:
    PAR's kernel of ``x``, held while the maps are made (:meth:`Method.label_maps` sets one), that
    every '*_par' map of ``x`` refines with (None: each computes its own)."""

    x: Tensor
    labels: Tensor
    cam: Tensor
    scales: list[float]
    kept: dict[float, Any] = dataclasses.field(default_factory=dict)
    kernel: ImageKernel | None = None

    def kept_all(self) -> list[Any] | None:
        """What was kept from every scale's forward, in the order of ``scales``, or None if any is
        missing."""
        kept = [self.kept.get(s) for s in self.scales]
        return None if any(k is None for k in kept) else kept

    @property
    def image01(self) -> Tensor:
        """The [0, 1] image: ``x`` itself (the network normalises its input)."""
        return self.x


@dataclasses.dataclass
class PseudoConfig(MethodConfig):
    """The ``pseudo`` section, shared by every method (:attr:`Method.pseudo`): the schedule of the
    segmentation head's CAM pseudo labels. Read by the cam baseline and AFA (defaults: the official AFA
    VOC recipe); AReAM and ToCo keep schedules of their own (``aream.warmup_iters``,
    ``toco.seg_start_iter``), with other defaults."""

    warmup_iters: int = option(2000)  # classification-only iterations: no pseudo label before
    seg_weight: float = option(0.1)  # weight of the segmentation loss on the pseudo labels


#: config sections every method reads, whatever the method (section name -> its dataclass)
SHARED_SECTIONS: dict[str, type[MethodConfig]] = {"pseudo": PseudoConfig}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a :class:`Method` subclass under its ``name``."""
    METHODS.register(cls.name)(cls)
    return cls


def resize(x: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Maps (B, C, h, w) -> (B, C, H, W), align_corners False; ``x`` itself when the size is already
    right. Bilinear from a token grid runs as two matrix products (:func:`resize_bilinear`)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "bilinear":
        return resize_bilinear(x, size)
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


@contextmanager
def pass_mode(net: nn.Module, mode: str) -> Iterator[None]:
    """Run the no-grad CAM passes in train mode (official: DropPath and BN statistics active) or eval."""
    was = net.training
    net.train(mode == "train")
    try:
        yield
    finally:
        net.train(was)


def train_mode_is_eval_mode(net: nn.Module) -> bool:
    """Whether ``net``, in the mode of its training forward (call it there), computes what it would in
    eval mode, drawing no random numbers and updating no state: no dropout or DropPath with p > 0, no
    BatchNorm that normalises with batch statistics. Then a second, no-grad forward of the same images
    repeats the training forward's numbers, in train mode (the official label pass) or eval mode."""
    for mod in net.modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd | DropPath) and float(mod.p) > 0:
            return False
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            return False
    return True


class Method:
    """Base class. Subclasses implement ``training_step`` and add their maps in ``extra_maps``."""

    name: ClassVar[str] = "base"
    Config: ClassVar[type[MethodConfig] | None] = None  # the method's config section, if it has one
    section: ClassVar[str | None] = None  # the section's name (None: ``name``)
    MAPS: ClassVar[tuple[str, ...]] = ("cam", "cam_par", "pseudo")  # from the multi-scale CAM
    EXTRA_MAPS: ClassVar[tuple[str, ...]] = ()  # a method's own maps (:meth:`extra_maps`)
    OWN_PSEUDO: ClassVar[bool] = False  # extra_maps makes the 'pseudo' map itself
    PSEUDO_MAP: ClassVar[str | None] = "cam_par"  # its pseudo label for a second stage (None: none)
    REFINED_MAP: ClassVar[str | None] = None  # its refined-CAM label map, when it has one
    # the config key holding each map's background score (what `wsss calibrate` sweeps); a map and its
    # PAR-refined version share a key, and calibrate keeps the PAR-refined map's choice
    BKG_KEYS: ClassVar[dict[str, str]] = {"cam": "eval.bkg_score", "cam_par": "eval.bkg_score"}
    class_attention = False  # the CAM is multiplied by the class-to-patch attention (MCTformer)

    @classmethod
    def section_name(cls) -> str:
        return cls.section or cls.name

    @classmethod
    def options(cls, cfg: Any) -> MethodConfig | None:
        """The method's config section checked and typed (None without a ``Config``)."""
        if cls.Config is None:
            return None
        key = cls.section_name()
        return cls.Config.parse(cfg.get(key) if hasattr(cfg, "get") else None, key)

    @classmethod
    def build_heads(cls, opts: MethodConfig | None, backbone: Backbone, num_classes: int
                    ) -> dict[str, MethodHead]:
        """The heads the method adds to the network, by name (none by default)."""
        return {}

    def __init__(self, cfg: Any, net: WSSSNet) -> None:
        # the method keeps values, not the config: a threshold changed in the config (calibrate's
        # sweep, evaluate's overrides) reaches a method built from it
        self.opts = self.options(cfg)
        shared = cfg.get("pseudo") if hasattr(cfg, "get") else None
        self.pseudo: PseudoConfig = PseudoConfig.parse(shared, "pseudo")  # type: ignore[assignment]
        p = cfg.par
        self.par = PAR(dilations=tuple(p.dilations), num_iter=int(p.num_iter), w1=float(p.w1), w2=float(p.w2))
        self.high = float(cfg.cam.high)
        self.low = float(cfg.cam.low)
        self.scales = [float(s) for s in cfg.cam.scales]
        self.flip = bool(cfg.cam.flip)
        self.fuse = str(cfg.cam.fuse)
        self.mode = str(cfg.train.cam_pass_mode)
        self.par_downscale = int(p.downscale)
        self.bkg_score = float(cfg.eval.bkg_score)  # the CAM's background score in the label maps

    # ----------------------------------------------------------------- training
    def training_step(
        self, net: nn.Module, batch: dict[str, Tensor], it: int
    ) -> tuple[Tensor, dict[str, float]]:
        raise TypeError(f"{type(self).__name__} must define training_step")

    def grad_views(self, x: Tensor) -> list[Tensor]:
        """Images besides ``x`` (B, 3, H, W) that one training step forwards with gradient, each
        (B', 3, h, w) (ToCo's second global view and local crops): what the benchmark counts as the
        iteration's unavoidable network passes. Their content is irrelevant, only their shapes."""
        return []

    @staticmethod
    def cls_loss(out: NetOutput, labels: Tensor) -> Tensor:
        return sum(multilabel_soft_margin(lg, labels) for lg in out.logits)  # type: ignore[return-value]

    def classify(self, net: nn.Module, x: Tensor, labels: Tensor, **forward: Any
                 ) -> tuple[NetOutput, Tensor, dict[str, float]]:
        """The training forward ``net(x, **forward)``, its classification loss and the log {"cls": ...}."""
        out = net(x, **forward)
        l_cls = self.cls_loss(out, labels)
        return out, l_cls, {"cls": l_cls.item()}

    @staticmethod
    def par_image(x: Tensor) -> Tensor:
        """The [0, 1] image PAR reads: the batch's image (random erasing's noise may leave [0, 1])."""
        return x.clamp(0.0, 1.0)

    # ----------------------------------------------------------------- CAM passes
    def fuse_kwargs(self) -> dict[str, Any]:
        if self.fuse not in FUSE_PRESETS:
            raise ValueError(f"cam.fuse must be one of {', '.join(FUSE_PRESETS)}, got {self.fuse!r}")
        return FUSE_PRESETS[self.fuse]

    def scale_inputs(self, x: Tensor, s: float) -> Tensor:
        """x at scale ``s`` (+ its flipped copy when the CAM passes flip): (B or 2B, 3, h, w)."""
        return scaled_input(x, s, self.flip)

    def fuse_cams(self, cams: list[Tensor], size: tuple[int, int], batch: int, keep: Tensor | None = None
                  ) -> Tensor:
        """Raw CAMs of [x_s, flip(x_s)] (2B rows) or of x_s alone (B rows) -> normalised (B, K, H, W);
        with ``keep`` (B, K) (the labels, when the caller masks by them) absent classes are zeros."""
        return fuse_multiscale(cams, size, batch, keep=keep, **self.fuse_kwargs())

    def reuses_forward(self, net: WSSSNet) -> bool:
        """Whether the training labels' CAM pass takes its un-flipped scale-1 rows from the training
        forward instead of computing them again: when the pass has scale 1 and the network's forward
        is deterministic and mode-free (:func:`train_mode_is_eval_mode`), the two forwards are the
        same computation on the same images (one forward fewer per iteration)."""
        parts = [net.backbone, net.cam_head, *net.heads.values()]  # what the label pass runs
        return 1.0 in self.scales and all(train_mode_is_eval_mode(p) for p in parts)

    def label_forward(self, net: WSSSNet, x: Tensor, xs: Tensor, first: NetOutput | None,
                      **forward: Any) -> NetOutput:
        """The label pass's forward ``net.forward_cam(xs, **forward)`` of ``xs``, a scaled copy of ``x``
        (B, 3, H, W) (+ its flip, as :meth:`scale_inputs`). When ``xs`` is ``x`` itself (scale 1) and
        ``first`` (:meth:`forward_rows`) is given, its first B rows are ``first``'s and only the
        flipped twins run; CAM, heads and attention are then stacked over the rows for the keys that
        forward computed."""
        b = x.shape[0]
        if first is None or xs.shape[-2:] != x.shape[-2:]:
            return net.forward_cam(xs, **forward)
        if xs.shape[0] == b:
            return first
        rest = net.forward_cam(xs[b:], **forward)

        def stack(mine: dict[Any, Tensor], theirs: dict[Any, Tensor]) -> dict[Any, Tensor]:
            return {k: torch.cat([mine[k], v]) for k, v in theirs.items()}

        return NetOutput([], torch.cat([first.cam, rest.cam]), None, stack(first.heads, rest.heads),
                         stack(first.attn, rest.attn), rest.grids)

    def forward_rows(self, net: WSSSNet, out: NetOutput) -> NetOutput | None:
        """The training forward ``out``, detached, when it may stand in for the label pass's
        un-flipped scale-1 forward (:meth:`reuses_forward`; call this in the training forward's mode,
        before :func:`pass_mode`), else None."""
        if not self.reuses_forward(net):
            return None
        return NetOutput([], out.cam.detach(), None, {k: v.detach() for k, v in out.heads.items()},
                         {k: v.detach() for k, v in out.attn.items()}, dict(out.grids))

    @torch.no_grad()
    def training_cam(self, net: WSSSNet, x: Tensor, keep: Tensor, first: NetOutput | None) -> Tensor:
        """The training labels' normalised CAM (B, K, H, W) of ``x``, as :meth:`multiscale_cam`,
        with ``first`` (:meth:`forward_rows`) standing in for the un-flipped scale-1 forward."""
        return self.fused_cam(lambda xs: self.label_forward(net, x, xs, first).cam, x, None, keep)

    @torch.no_grad()
    def multiscale_cam(self, net: WSSSNet, x: Tensor, scales: list[float] | None = None,
                       keep: Tensor | None = None) -> Tensor:
        """Normalised multi-scale (+flip) CAM (B, K, H, W) in [0, 1] (only the ``keep`` classes, see
        :meth:`fuse_cams`)."""
        return self.fused_cam(lambda xs: net.forward_cam(xs).cam, x, scales, keep)

    def fused_cam(self, cam_fn: Callable[[Tensor], Tensor], x: Tensor, scales: list[float] | None = None,
                  keep: Tensor | None = None) -> Tensor:
        """:func:`wsss.ops.cam_fusion.multiscale_cam` of ``cam_fn`` with this method's scales, flip and
        fusion."""
        return multiscale_cam(cam_fn, x, scales or self.scales, self.flip, keep=keep, **self.fuse_kwargs())

    def pseudo_label(self, image01: Tensor, cam: Tensor, labels: Tensor, img_box: Tensor | None,
                     kernel: ImageKernel | None = None) -> Tensor:
        """PAR-refined label with the high/low background scores (B, H, W), 255 = uncertain. ``kernel``:
        held for the PAR-size image when another label of the batch shares it
        (:func:`~wsss.refine.labels.par_pseudo_label`)."""
        return par_pseudo_label(
            image01,
            cam,
            labels,
            self.par,
            high=self.high,
            low=self.low,
            img_box=img_box,
            downscale=self.par_downscale,
            kernel=kernel,
        )

    # ----------------------------------------------------------------- evaluation
    def par_argmax(self, image01: Tensor, scores: Tensor, labels: Tensor, kernel: ImageKernel | None = None
                   ) -> Tensor:
        """Refine a score stack (B, K+1, h, w) with PAR at full resolution and take the argmax.
        ``kernel``: PAR's kernel of ``image01`` that the caller holds for several maps (None: computed
        for this call)."""
        if kernel is not None and kernel.image01 is not image01:
            raise ValueError("par_argmax: the held PAR kernel is of another image")
        return par_argmax_label(image01, scores, labels, self.par, None if kernel is None else kernel.kernel)

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
        self, net: WSSSNet, x: Tensor, labels: Tensor, scales: list[float], flip: bool,
        maps: Collection[str] | None = None, msc_seg: bool = False,
    ) -> dict[str, Tensor]:
        """Label maps (B, H, W) for evaluation: CAM, CAM+PAR, pseudo label, segmentation head; only
        those named in ``maps`` are computed (None: all of :meth:`map_names`).

        labels are the ground-truth image labels (the standard protocol for CAM / pseudo-label
        evaluation); the segmentation head does not use them. 'seg' is single-scale, or with
        ``msc_seg`` :meth:`multiscale_segment` on ``scales`` and ``flip``: then the CAM's forwards,
        which run on the same inputs, also give the seg logits (one backbone pass per scale, not two).
        """
        want = set(self.map_names(net) if maps is None else maps)
        out: dict[str, Tensor] = {}
        # the net's seg head rides on the CAM forwards (a method's own seg head does not)
        segs: list[Tensor] | None = [] if msc_seg and "seg" in want and net.seg_head is not None else None
        if want & {*self.MAPS, *self.EXTRA_MAPS}:
            with self.flipping(flip):
                cam, kept = self._eval_forwards(net, x, labels, scales, want, segs)
                out.update(self.label_maps(net, MapInput(x, labels, cam, scales, kept), want))
        if "seg" in want:
            if msc_seg:
                seg = self.multiscale_segment(net, x, scales, flip, segs or None)
            else:
                seg = self.segment(net, x)
            if seg is not None:
                out["seg"] = seg.argmax(1)
        return out

    @torch.no_grad()
    def label_maps(self, net: WSSSNet, inp: MapInput, want: Collection[str]) -> dict[str, Tensor]:
        """The CAM-derived label maps (B, H, W) named in ``want`` from the evaluation forwards' output
        ``inp`` (the masked multi-scale CAM and what each scale kept): no network pass of its own, so
        the thresholds of the config can be swept over one set of forwards (``wsss calibrate``). Every
        '*_par' map refines on x with one PAR kernel (``inp.kernel``; one is held for the call if
        ``inp`` has none)."""
        if inp.kernel is None:
            inp = dataclasses.replace(inp, kernel=ImageKernel(self.par, inp.x))
        x, labels, cam = inp.x, inp.labels, inp.cam
        out: dict[str, Tensor] = {}
        bkg = self.bkg_score
        if "cam" in want:
            out["cam"] = cam_to_label(cam, labels, bkg_score=bkg)
        if "cam_par" in want:
            out["cam_par"] = self.par_argmax(x, with_background(cam, bkg), labels, inp.kernel)
        if "pseudo" in want and not self.OWN_PSEUDO:
            out["pseudo"] = self.pseudo_label(x, cam, labels, None)
        out.update(self.extra_maps(net, inp, want))
        return out

    @torch.no_grad()
    def eval_forwards(self, net: WSSSNet, x: Tensor, labels: Tensor, scales: list[float], flip: bool,
                      want: Collection[str]) -> MapInput:
        """The evaluation forwards of padded images x (B, 3, H, W) for the maps in ``want``, as the
        input of :meth:`label_maps`."""
        with self.flipping(flip):
            cam, kept = self._eval_forwards(net, x, labels, scales, set(want), None)
        return MapInput(x, labels, cam, scales, kept)

    @torch.no_grad()
    def _eval_forwards(self, net: WSSSNet, x: Tensor, labels: Tensor, scales: list[float], want: set[str],
                       segs: list[Tensor] | None) -> tuple[Tensor, dict[float, Any]]:
        """One forward per scale for every evaluation map: the masked multi-scale CAM (B, K, H, W),
        and per scale what :meth:`eval_keep` takes for the method's own maps; with a list ``segs`` the
        forwards run the seg head too and append each scale's logits to it."""
        cams, kept = [], {}
        forwards = self.scale_forwards(net, x, scales, seg=segs is not None,
                                       capture=lambda s: self.eval_capture(s, want))
        for s, fwd in forwards:
            if segs is not None:
                segs.append(fwd.seg)  # type: ignore[arg-type]
            cams.append(fwd.cam)
            kept[s] = self.eval_keep(fwd, s, labels, want)
        cam = self.fuse_cams(cams, tuple(x.shape[-2:]), x.shape[0], keep=labels) * labels[..., None, None]
        return cam, kept

    def scale_forwards(self, net: WSSSNet, x: Tensor, scales: list[float], seg: bool = False,
                       capture: Callable[[float], dict[str, Any]] | None = None
                       ) -> Iterator[tuple[float, NetOutput]]:
        """One forward per scale on :meth:`scale_inputs` (2B rows [x_s, flip(x_s)] with flip, else B):
        yields (scale, output) with the CAM and class logits, the seg logits when ``seg``, and what
        ``capture(scale)`` asks (``attn_layers``, ``attn_reduce``, ``heads``). One scale's output at
        a time: a caller keeps what it needs of each."""
        for s in scales:
            cap = capture(s) if capture is not None else {}
            yield s, net(self.scale_inputs(x, s), with_seg=seg, attn_layers=cap.get("attn_layers", ()),
                         attn_reduce=cap.get("attn_reduce"), heads=list(cap.get("heads", ())))

    def eval_capture(self, scale: float, want: set[str]) -> dict[str, Any]:
        """What the method's own maps in ``want`` need from the evaluation's CAM forward at ``scale``:
        keyword arguments of :meth:`WSSSNet.forward_cam` (``attn_layers``, ``attn_reduce``,
        ``heads``). Default: nothing beyond the CAM."""
        return {}

    def eval_keep(self, out: NetOutput, scale: float, labels: Tensor, want: set[str]) -> Any:
        """What the method's own maps keep from the evaluation's CAM forward ``out`` at ``scale`` (its
        rows are [x_s, flip(x_s)] with flip, else x_s): it reaches :meth:`extra_maps` as
        ``MapInput.kept[scale]``. Keep little (e.g. a per-scale refined CAM, not the attention): every
        scale's is held until the maps are made. Default: None."""
        return None

    @torch.no_grad()
    def multiscale_segment(self, net: WSSSNet, x: Tensor, scales: list[float], flip: bool,
                           segs: list[Tensor] | None = None) -> Tensor | None:
        """Multi-scale (+flip) segmentation logits (B, C, H, W) at the size of ``x``
        (:func:`~wsss.ops.cam_fusion.fuse_multiscale_seg`), or None without the net's seg head. ``segs``:
        the per-scale logits already computed on :func:`~wsss.ops.cam_fusion.scaled_input` of these
        scales."""
        if net.seg_head is None:
            return None
        if segs is None:
            segs = [net(scaled_input(x, s, flip), with_seg=True, heads=False).seg for s in scales]
        return fuse_multiscale_seg(segs, tuple(x.shape[-2:]), x.shape[0])  # type: ignore[arg-type]

    def extra_maps(self, net: WSSSNet, inp: MapInput, want: Collection[str]) -> dict[str, Tensor]:
        """A method's own evaluation maps named in ``want``, given the normalised multi-scale CAM
        (B, K, H, W)."""
        return {}

    @torch.no_grad()
    def segment(self, net: WSSSNet, x: Tensor) -> Tensor | None:
        """Segmentation logits at the input size (B, K+1, H, W), or None without a seg head."""
        if net.seg_head is None:
            return None
        out = net(x, with_seg=True, heads=False)
        return resize(out.seg, tuple(x.shape[-2:]))  # type: ignore[arg-type]

    @torch.no_grad()
    def score_cam(self, net: WSSSNet, x: Tensor, labels: Tensor, scales: list[float]) -> Tensor:
        """The CAM (B, K, H, W) in [0, 1], masked by ``labels``, that the background-threshold sweep and
        the saved pseudo-label scores use: the multi-scale CAM (a method with a refined CAM returns
        that)."""
        return self.multiscale_cam(net, x, scales, keep=labels) * labels[..., None, None]


def with_background(cam: Tensor, score: float) -> Tensor:
    """Prepend a constant background channel: (B, K, H, W) -> (B, K+1, H, W)."""
    return torch.cat([cam.new_full((cam.shape[0], 1, *cam.shape[2:]), score), cam], dim=1)
