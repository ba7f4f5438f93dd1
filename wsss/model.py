"""The segmentation network: backbone + CAM head (+ token head, seg head) + the heads of a method.

``WSSSNet`` composes the pieces by constructor injection; ``build_model(cfg.model, num_classes,
heads)`` builds it from a config section, ``heads`` being a method's head builder
(:func:`wsss.methods.build_network` passes the configured method's). Two entry points:

- ``forward(x, attn_layers, ...)``: the training forward (classification logits, CAM, segmentation
  logits, method heads, captured attention);
- ``forward_cam(x, attn_layers, attn_reduce, heads)``: the CAM-only forward used by the no-grad CAM
  passes. It never runs the segmentation decoder (the official code runs it there for nothing).

The network owns its preprocessing: both take [0, 1] RGB images and normalise them with the
backbone's statistics (the one place that happens); :meth:`WSSSNet.pad` pads an image to the sizes
the backbone and the evaluation protocol need (with the mean colour), and the caller crops back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from wsss.backbones.base import AttnReduce, Backbone, BackboneOutput
from wsss.core.registry import BACKBONES
from wsss.heads.base import MethodHead
from wsss.heads.classifier import CAMHead, TokenHead

HeadBuilder = Callable[[Backbone], Mapping[str, MethodHead]]


@dataclass
class NetOutput:
    """logits: classification logits, each (B, K) (one per head; losses are summed).
    cam: raw CAM (B, K, h, w). seg: segmentation logits (B, K+1, H/4, W/4) or None.
    heads: method head name -> its output (the heads that ran).
    attn/grids/prefix/blocks/block_grids: as in BackboneOutput."""

    logits: list[Tensor]
    cam: Tensor
    seg: Tensor | None = None
    heads: dict[str, Tensor] = field(default_factory=dict)
    attn: dict[int, Tensor] = field(default_factory=dict)
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    prefix: Tensor | None = None
    blocks: dict[int, Tensor] = field(default_factory=dict)
    block_grids: dict[int, tuple[int, int]] = field(default_factory=dict)


class WSSSNet(nn.Module):
    """Backbone + CAM head (+ token head, seg head) + method heads (registered as submodules under
    their names, so that their parameters are ``<name>.*`` in the state dict)."""

    def __init__(
        self,
        backbone: Backbone,
        cam_head: CAMHead,
        num_classes: int,
        token_head: TokenHead | None = None,
        seg_head: nn.Module | None = None,
        heads: Mapping[str, MethodHead] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.cam_head = cam_head
        self.token_head = token_head
        self.seg_head = seg_head
        self.num_classes = num_classes  # foreground classes K
        self.head_names: list[str] = []
        for name, head in (heads or {}).items():
            if hasattr(self, name):
                raise ValueError(f"method head name '{name}' is taken by the network")
            head.attn_layers = tuple(sorted(backbone.check_layers(head.attn_layers)))
            head.feature_layers = tuple(sorted(backbone.check_layers(head.feature_layers)))
            self.add_module(name, head)
            self.head_names.append(name)

    @property
    def heads(self) -> dict[str, MethodHead]:
        """The method heads by name."""
        return {n: getattr(self, n) for n in self.head_names}

    # Inputs are padded to a multiple of 16 (the evaluation protocol) and of the backbone's multiple.
    PAD_MULTIPLE = 16

    @property
    def pad_multiple(self) -> int:
        return math.lcm(self.PAD_MULTIPLE, int(self.backbone.input_multiple))

    def pad(self, image01: Tensor, min_size: int = 0) -> tuple[Tensor, tuple[int, int]]:
        """Pad [0, 1] images (B, 3, H, W) at the bottom/right to :attr:`pad_multiple` (and to at least
        ``min_size``) with the backbone's mean colour (normalised: 0); returns them and the original
        (H, W) to crop back to."""
        h, w = image01.shape[-2:]
        m = self.pad_multiple
        th, tw = max(h, min_size), max(w, min_size)
        ph, pw = th + (-th) % m - h, tw + (-tw) % m - w
        if not (ph or pw):
            return image01, (h, w)
        out = image01.new_empty(*image01.shape[:-2], h + ph, w + pw)
        out.copy_(out.new_tensor(self.backbone.input_mean).view(3, 1, 1).expand_as(out))
        out[..., :h, :w] = image01
        return out, (h, w)

    def layers(self, layers: Sequence[int]) -> list[int]:
        """Normalised (non-negative, sorted) layer indices."""
        return sorted(self.backbone.check_layers(layers))

    def _run_backbone(
        self, x: Tensor, attn_layers: Sequence[int], attn_reduce: AttnReduce | None,
        heads: Sequence[str], feature_layers: Sequence[int],
    ) -> BackboneOutput:
        """The backbone on the normalised images x (B, 3, H, W) in [0, 1], with the attention and
        features the named heads read (their attention layers unreduced) on top of the requested ones."""
        mods = [getattr(self, n) for n in heads]
        keep = {i for m in mods for i in m.attn_layers}
        feats = {i for m in mods for i in m.feature_layers} | set(self.layers(feature_layers))
        reduce = attn_reduce
        if attn_reduce is not None and keep:

            def reduce(layer: int, logits: Tensor) -> Tensor:
                return logits if layer in keep else attn_reduce(layer, logits)

        layers = sorted(set(self.layers(attn_layers)) | keep)
        return self.backbone(self.backbone.normalize(x), layers, reduce, sorted(feats))

    def _head_list(self, heads: bool | Collection[str]) -> list[str]:
        if isinstance(heads, bool):
            return list(self.head_names) if heads else []
        unknown = [h for h in heads if h not in self.head_names]
        if unknown:
            raise ValueError(f"unknown method head(s) {unknown}; the network has {self.head_names}")
        return [h for h in self.head_names if h in heads]

    def forward(
        self,
        x: Tensor,
        attn_layers: Sequence[int] = (),
        attn_reduce: AttnReduce | None = None,
        with_seg: bool = True,
        heads: bool | Collection[str] = True,
        feature_layers: Sequence[int] = (),
    ) -> NetOutput:
        """x: (B, 3, H, W) RGB in [0, 1]. ``heads``: the method heads to run (True: all). Heads whose
        output a loss does not use must be switched off: under DDP every output must reach the loss."""
        names = self._head_list(heads)
        out = self._run_backbone(x, attn_layers, attn_reduce, names, feature_layers)
        logits, cam = self.cam_head(out.features[-1])
        all_logits = [logits]
        if self.token_head is not None and out.prefix is not None:
            all_logits.append(self.token_head(out.prefix))
        seg = self.seg_head(out.features) if (with_seg and self.seg_head is not None) else None
        return self._output(all_logits, cam, seg, names, out)

    def forward_cam(
        self,
        x: Tensor,
        attn_layers: Sequence[int] = (),
        attn_reduce: AttnReduce | None = None,
        heads: Collection[str] = (),
        feature_layers: Sequence[int] = (),
    ) -> NetOutput:
        """CAM-only forward of [0, 1] images x (B, 3, H, W): backbone + CAM head (+ the named method
        heads)."""
        names = self._head_list(heads)
        out = self._run_backbone(x, attn_layers, attn_reduce, names, feature_layers)
        return self._output([], self.cam_head.cam(out.features[-1]), None, names, out)

    def _output(self, logits: list[Tensor], cam: Tensor, seg: Tensor | None, names: list[str],
                out: BackboneOutput) -> NetOutput:
        head_out = {n: getattr(self, n)(out) for n in names}
        return NetOutput(logits, cam, seg, head_out, out.attn, out.grids, out.prefix, out.blocks,
                         out.block_grids)


def build_model(model_cfg: Any, num_classes: int, heads: HeadBuilder | None = None) -> WSSSNet:
    """Build a ``WSSSNet`` from ``cfg.model``, a loaded config's section (every key set, its free-form
    ``seg_head`` too: the defaults are :class:`wsss.config.ModelConfig`'s; no fallbacks here).
    num_classes: foreground classes K; heads: builds the method heads for the backbone (after the
    other heads, so the parameter order is stable)."""
    from wsss.heads.segformer import SegFormerHead

    import_backbones()
    kwargs = dict(model_cfg["backbone_kwargs"] or {})
    name = str(model_cfg["backbone"])
    if BACKBONES.meta(name).get("class_tokens_per_class"):
        kwargs.setdefault("num_classes", num_classes)
    backbone = BACKBONES.build(name, pretrained=model_cfg["pretrained"], **kwargs)
    ch = dict(model_cfg["cam_head"] or {})
    cam_head = CAMHead(backbone.out_channels[-1], num_classes, **ch)
    token_mode = model_cfg["token_head"]
    token_head = None
    if token_mode:
        dim = int(getattr(backbone, "embed_dim", backbone.out_channels[-1]))
        token_head = TokenHead(str(token_mode), dim, num_classes)
    seg_cfg = model_cfg["seg_head"]  # null: no seg head
    seg_head = None
    if seg_cfg and seg_cfg["enabled"]:
        seg_head = SegFormerHead(
            backbone.out_channels,
            num_classes + 1,
            embed_dim=int(seg_cfg["embed_dim"]),
            dropout=float(seg_cfg["dropout"]),
        )
    method_heads = dict(heads(backbone)) if heads is not None else {}
    return WSSSNet(backbone, cam_head, num_classes, token_head, seg_head, method_heads)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def import_backbones() -> None:
    """Import every backbone family so that its builders are registered."""
    import wsss.backbones.conformer  # noqa: F401
    import wsss.backbones.dinov2  # noqa: F401
    import wsss.backbones.efficientnet  # noqa: F401
    import wsss.backbones.hybrid  # noqa: F401
    import wsss.backbones.mit  # noqa: F401
    import wsss.backbones.vit  # noqa: F401


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
