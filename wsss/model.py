"""The segmentation network: backbone + CAM head (+ token head, seg head, AFA head).

``WSSSNet`` composes the pieces by constructor injection; ``build_model(cfg.model, num_classes)``
builds it from a config section. Two entry points:

- ``forward(x, attn_layers)``: the training forward (classification logits, CAM, segmentation
  logits, AFA affinity, captured attention);
- ``forward_cam(x, attn_layers, attn_reduce)``: the CAM-only forward used by the no-grad CAM passes.
  It never runs the segmentation decoder (the official code runs it there for nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from wsss.backbones.base import AttnReduce, Backbone
from wsss.heads.cam import CAMHead, TokenHead
from wsss.registry import BACKBONES


@dataclass
class NetOutput:
    """logits: classification logits, each (B, K) (one per head; losses are summed).
    cam: raw CAM (B, K, h, w). seg: segmentation logits (B, K+1, H/4, W/4) or None.
    aff: AFA affinity (B, N, N) in (0, 1) or None. attn/grids/prefix: as in BackboneOutput."""

    logits: list[Tensor]
    cam: Tensor
    seg: Tensor | None = None
    aff: Tensor | None = None
    attn: dict[int, Tensor] = field(default_factory=dict)
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    prefix: Tensor | None = None


class WSSSNet(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        cam_head: CAMHead,
        num_classes: int,
        token_head: TokenHead | None = None,
        seg_head: nn.Module | None = None,
        aff_head: nn.Module | None = None,
        aff_layers: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.cam_head = cam_head
        self.token_head = token_head
        self.seg_head = seg_head
        self.aff_head = aff_head
        self.num_classes = num_classes  # foreground classes K
        self.aff_layers = sorted(backbone.check_layers(aff_layers)) if aff_head is not None else []

    def layers(self, layers: Sequence[int]) -> list[int]:
        """Normalised (non-negative, sorted) layer indices."""
        return sorted(self.backbone.check_layers(layers))

    def forward(
        self,
        x: Tensor,
        attn_layers: Sequence[int] = (),
        attn_reduce: AttnReduce | None = None,
        with_seg: bool = True,
        with_aff: bool = True,
    ) -> NetOutput:
        """x: (B, 3, H, W) normalised. With ``with_aff`` the AFA head's layers are captured too
        (unreduced). Heads whose output a loss does not use must be switched off: under DDP every
        output must reach the loss."""
        with_aff = with_aff and self.aff_head is not None
        want = set(self.layers(attn_layers)) | (set(self.aff_layers) if with_aff else set())
        reduce = attn_reduce
        if attn_reduce is not None and with_aff:
            keep = set(self.aff_layers)

            def reduce(layer: int, logits: Tensor) -> Tensor:
                return logits if layer in keep else attn_reduce(layer, logits)

        out = self.backbone.forward_features(x, sorted(want), reduce)
        logits, cam = self.cam_head(out.features[-1])
        all_logits = [logits]
        if self.token_head is not None and out.prefix is not None:
            all_logits.append(self.token_head(out.prefix))
        seg = self.seg_head(out.features) if (with_seg and self.seg_head is not None) else None
        aff = self._affinity(out.attn) if with_aff else None
        return NetOutput(all_logits, cam, seg, aff, out.attn, out.grids, out.prefix)

    def forward_cam(
        self,
        x: Tensor,
        attn_layers: Sequence[int] = (),
        attn_reduce: AttnReduce | None = None,
        aff_rows: int | None = None,
    ) -> NetOutput:
        """CAM-only forward: backbone + CAM head (+ AFA head when its layers are requested).

        aff_rows: compute the AFA affinity for the first ``aff_rows`` images only (the un-flipped
        half of a [x, flip(x)] batch is all the propagation uses)."""
        layers = self.layers(attn_layers)
        out = self.backbone.forward_features(x, layers, attn_reduce)
        cam = self.cam_head.cam(out.features[-1])
        aff = None
        if self.aff_head is not None and attn_reduce is None and set(self.aff_layers) <= set(layers):
            aff = self._affinity({i: a[:aff_rows] for i, a in out.attn.items()})
        return NetOutput([], cam, None, aff, out.attn, out.grids, out.prefix)

    def _affinity(self, attn: dict[int, Tensor]) -> Tensor:
        maps = [attn[i] for i in self.aff_layers]
        dims = [self.backbone.head_dims[i] for i in self.aff_layers]
        return self.aff_head(maps, dims)  # type: ignore[misc]


def build_model(model_cfg: Any, num_classes: int, method: str = "afa") -> WSSSNet:
    """Build a ``WSSSNet`` from ``cfg.model``. num_classes: foreground classes K."""
    from wsss.heads.affinity import AffinityHead
    from wsss.heads.segformer import SegFormerHead

    import_backbones()
    kwargs = dict(model_cfg.get("backbone_kwargs") or {})
    name = str(model_cfg.backbone)
    if name.startswith("mctformer"):
        kwargs.setdefault("num_classes", num_classes)
    backbone = BACKBONES.build(name, pretrained=model_cfg.get("pretrained"), **kwargs)
    ch = dict(model_cfg.get("cam_head") or {})
    cam_head = CAMHead(backbone.out_channels[-1], num_classes, **ch)
    token_mode = model_cfg.get("token_head")
    token_head = None
    if token_mode:
        dim = int(getattr(backbone, "embed_dim", backbone.out_channels[-1]))
        token_head = TokenHead(str(token_mode), dim, num_classes)
    seg_cfg = model_cfg.get("seg_head") or {}
    seg_head = None
    if seg_cfg.get("enabled", False):
        seg_head = SegFormerHead(
            backbone.out_channels,
            num_classes + 1,
            embed_dim=int(seg_cfg.get("embed_dim", 256)),
            dropout=float(seg_cfg.get("dropout", 0.1)),
        )
    aff_head = None
    aff_layers: list[int] = []
    if method == "afa":
        aff_layers = sorted(backbone.check_layers(list(model_cfg.get("aff_layers") or [])))
        aff_head = AffinityHead(in_channels=sum(backbone.num_heads[i] for i in aff_layers))
    return WSSSNet(backbone, cam_head, num_classes, token_head, seg_head, aff_head, aff_layers)


def import_backbones() -> None:
    """Import every backbone family so that its builders are registered."""
    import wsss.backbones.conformer  # noqa: F401
    import wsss.backbones.efficientnet  # noqa: F401
    import wsss.backbones.hybrid  # noqa: F401
    import wsss.backbones.mit  # noqa: F401
    import wsss.backbones.vit  # noqa: F401


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
