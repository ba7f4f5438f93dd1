"""``Segmenter``: a trained model as a one-call image -> mask predictor.

    seg = Segmenter.from_pretrained("runs/afa/model")
    pred = seg.predict("cat.jpg")      # or a PIL image, uint8 (H, W, 3) / float (3, H, W) in [0, 1]
    pred.mask, pred.present(), pred.overlay()

The mask is the segmentation head's argmax over all classes when the model has one (the official
inference; ``present()`` reads the mask, the classifier's scores are reported beside it); ``gate=True``
or ``labels`` restrict it to background + the classes the classifier predicts / the labels given. A
model without a seg head thresholds its CAM with the eval background score over the classes whose
classifier score passes the presence threshold (``eval.presence``, or ``eval.presence_per_class``:
what ``wsss calibrate`` chooses on the training labels) or the ``labels`` given.
Paths and PIL images are put in display orientation (EXIF), as ``wsss predict`` does. ``max_size``
predicts on a copy whose long side is at most that many pixels and maps the scores back to the
original size; no attention map is computed (memory grows linearly with the pixels).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.config import EvalConfig
from wsss.data.io import load_image
from wsss.data.transforms import to_image01
from wsss.engine.distributed import resolve_device
from wsss.engine.evaluate import crf_seg
from wsss.methods import build_method
from wsss.methods.base import resize, with_background
from wsss.model import WSSSNet
from wsss.refine.labels import cam_to_label, present_mask

MIN_SIDE = 64  # smaller inputs are padded: every backbone's strides and spatial reductions fit 64 px


@dataclass
class Prediction:
    """mask (H, W) int64 class ids; scores (K,) foreground class probabilities; cams (K, H, W) in [0, 1];
    class_names (K + 1, background first); image uint8 (H, W, 3)."""

    mask: np.ndarray
    scores: np.ndarray
    cams: np.ndarray
    class_names: list[str]
    image: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)  # how the mask was made (the JSON's "mask")

    def present(self) -> list[str]:
        """Names of the classes in the mask (background included when present), in class order."""
        ids = np.unique(self.mask)
        return [self.class_names[i] for i in ids.tolist() if 0 <= i < len(self.class_names)]

    def overlay(self, alpha: float = 0.5) -> np.ndarray:
        """uint8 (H, W, 3): the VOC-coloured mask blended over the image (background left as is)."""
        from wsss.analysis.viz import overlay_label

        return overlay_label(self.image, self.mask, alpha=alpha, skip=(0, 255))

    def to_json(self) -> dict[str, Any]:
        """Present classes, the objects among them (empty for a photo with none of the classes),
        per-class scores and how the mask was made (plain Python types)."""
        present = self.present()
        return {"present": present, "objects": [n for n in present if n != self.class_names[0]],
                "scores": {n: float(s) for n, s in zip(self.class_names[1:], self.scores.tolist())},
                "mask": dict(self.settings)}


def _float_to_uint8(t: Tensor) -> Tensor:
    """Float (3, H, W) in [0, 1] -> uint8; non-finite or out-of-range values are errors, not clamped."""
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"the image holds {int((~torch.isfinite(t)).sum())} NaN or infinite values")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        hint = " (it looks like 0..255: divide by 255 or pass uint8)" if hi <= 255 and lo >= 0 else ""
        raise ValueError(f"a float image must lie in [0, 1], got values in [{lo:g}, {hi:g}]{hint}")
    return (t.clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8_image(image: Any) -> np.ndarray:
    """Path, PIL image, uint8 numpy (H, W, 3) or tensor (3, H, W) (float in [0, 1] or uint8) ->
    uint8 (H, W, 3). Paths and PIL images are EXIF-oriented (as ``wsss predict``)."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        from PIL import ImageOps

        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"a tensor image must be (3, H, W), got {tuple(t.shape)}")
        if t.dtype != torch.uint8:
            t = _float_to_uint8(t)
        return t.permute(1, 2, 0).contiguous().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype.kind == "f":
        return _float_to_uint8(torch.from_numpy(arr).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"an image must be a path, a PIL image, a uint8 (H, W, 3) array or a (3, H, W) "
                         f"tensor, got {type(image).__name__} {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def fit_size(size: tuple[int, int], max_size: int | None) -> tuple[int, int]:
    """(H, W) scaled so that the long side is at most ``max_size`` (unchanged when it already fits)."""
    h, w = size
    if max_size is None or max(h, w) <= int(max_size):
        return h, w
    if int(max_size) < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    r = int(max_size) / max(h, w)
    return max(1, round(h * r)), max(1, round(w * r))


class Segmenter:
    """A trained ``WSSSNet`` with its config and class names, ready to predict."""

    def __init__(self, net: WSSSNet, cfg: Any, class_names: Sequence[str],
                 device: str | torch.device | None = None) -> None:
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.cfg = cfg
        self.class_names = list(class_names)
        if len(self.class_names) != net.num_classes + 1:
            raise ValueError(f"{len(self.class_names)} class names for a model of {net.num_classes} "
                             f"foreground classes (+ background)")
        self.method = build_method(cfg, net)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, device: str | torch.device | None = None
                        ) -> Segmenter:
        """From a release dir, run dir, training checkpoint or hub id (see :mod:`wsss.api.hub`)."""
        from wsss.api.hub import hub_download, load_run

        p = str(path_or_hub_id)
        if not os.path.exists(p) and "/" in p and not p.startswith((".", "/")):
            p = str(hub_download(p))
        net, cfg, names = load_run(p)
        return cls(net, cfg, names, device)

    def label_vector(self, labels: Sequence[str] | str) -> Tensor:
        """Class names (or 'a,b') -> multi-hot (K,); unknown names raise ValueError."""
        if isinstance(labels, str):
            labels = [s.strip() for s in labels.split(",") if s.strip()]
        fg = self.class_names[1:]
        vec = torch.zeros(len(fg))
        for name in labels:
            if name not in fg:
                raise ValueError(f"unknown class name '{name}'; known: {', '.join(fg)}")
            vec[fg.index(name)] = 1.0
        return vec

    @torch.no_grad()
    def predict(self, image: Any, labels: Sequence[str] | str | None = None,
                scales: Sequence[float] | None = None, flip: bool | None = None,
                crf: bool = False, max_size: int | None = None, gate: bool = False) -> Prediction:
        """Predict one image (path, PIL, uint8 (H, W, 3) numpy, or (3, H, W) tensor). Defaults: the
        config's eval scales / flip, full resolution (``max_size``: long side of the copy predicted);
        ``gate``: a seg head's mask only over the classes the classifier predicts."""
        return self.predict_batch([image], labels, scales, flip, crf, max_size, gate)[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence[Any], labels: Sequence[str] | str | None = None,
                      scales: Sequence[float] | None = None, flip: bool | None = None,
                      crf: bool = False, max_size: int | None = None, gate: bool = False
                      ) -> list[Prediction]:
        """Predict a list of same-size images in one batch (``labels`` apply to every image)."""
        arrs = [to_uint8_image(im) for im in images]
        if len({a.shape for a in arrs}) != 1:
            raise ValueError(f"predict_batch needs images of one size, got {sorted({a.shape for a in arrs})}")
        scales = [float(s) for s in (scales if scales is not None else self.cfg.eval.scales)]
        flip = bool(self.cfg.eval.flip) if flip is None else bool(flip)
        x = torch.from_numpy(np.stack([to_image01(a) for a in arrs])).to(self.device)  # (B, 3, H, W)
        size = (x.shape[-2], x.shape[-1])
        small = fit_size(size, max_size)
        xs = F.interpolate(x, size=small, mode="bilinear", align_corners=False, antialias=True) \
            if small != size else x
        scores, lab, cams, seg = self._score_maps(xs, labels, scales, flip)
        cams = resize(cams, size)  # back to the original size: (B, K, H, W)
        if seg is not None:
            seg = resize(seg, size)
        gated = seg is None or gate or labels is not None
        mask = self._mask(cams, seg, lab if gated else None, x if crf else None)
        settings = self.mask_settings(seg is not None, gated, labels is not None)
        return [
            Prediction(mask[i].cpu().numpy().astype(np.int64), scores[i].cpu().numpy(),
                       cams[i].float().cpu().numpy(), self.class_names, arrs[i], settings)
            for i in range(len(arrs))
        ]

    def presence_thresholds(self) -> Tensor:
        """(K,) the classifier score a class needs to count as present: ``eval.presence_per_class``
        when set (``wsss calibrate``), else ``eval.presence`` for every class."""
        k = len(self.class_names) - 1
        ev = EvalConfig.of(self.cfg.eval)
        per_class = ev.presence_per_class
        if per_class is not None:
            if len(per_class) != k:
                raise ValueError(f"eval.presence_per_class has {len(per_class)} values for {k} classes")
            return torch.tensor([float(v) for v in per_class], device=self.device)
        return torch.full((k,), float(ev.presence), device=self.device)

    def mask_settings(self, seg: bool, gated: bool, given: bool) -> dict[str, Any]:
        """How :meth:`predict_batch` makes the mask, for the JSON: its source and the thresholds used."""
        out: dict[str, Any] = {"source": "seg head argmax" if seg else "CAM vs background score"}
        if not seg:
            out["bkg_score"] = float(self.cfg.eval.bkg_score)
        if gated:
            out["classes"] = "the labels given" if given else "the classifier's (score > presence)"
            if not given:
                thr = self.presence_thresholds().tolist()
                out["presence"] = thr[0] if len(set(thr)) == 1 else dict(zip(self.class_names[1:], thr))
        else:
            out["classes"] = "all"
        return out

    def _score_maps(self, x: Tensor, labels: Sequence[str] | str | None, scales: list[float], flip: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Class scores (B, K), the classes kept (B, K) multi-hot, CAMs (B, K, h, w) in [0, 1] and seg
        logits (B, K+1, h, w) (None without a seg head) of a [0, 1]
        batch (B, 3, h, w). One forward per scale gives the CAM and the seg logits, the scale-1 one
        the class scores; no pass computes attention maps."""
        h, w = x.shape[-2:]
        xp, _ = self.net.pad(x, min_size=MIN_SIDE)  # small images: every backbone's strides must fit
        net, b, with_seg = self.net, x.shape[0], self.net.seg_head is not None
        cams, segs, scores = [], [], None
        with self.method.flipping(flip):
            for s, out in self.method.scale_forwards(net, xp, scales, seg=with_seg):
                cams.append(out.cam)
                segs.append(out.seg)
                if s == 1.0:  # the un-flipped rows are the padded images themselves
                    scores = out.logits[0][:b].sigmoid()  # (B, K)
            cam = self.method.fuse_cams(cams, tuple(xp.shape[-2:]), b)[..., :h, :w]
        if scores is None:
            scores = net(xp, with_seg=False, heads=False).logits[0].sigmoid()
        lab = (self.label_vector(labels).to(self.device).expand_as(scores) if labels is not None
               else (scores > self.presence_thresholds()).float())
        seg = self.method.multiscale_segment(net, xp, scales, flip, segs) if with_seg else None
        return scores, lab, cam, (seg[..., :h, :w] if seg is not None else None)

    def _mask(self, cams: Tensor, seg: Tensor | None, lab: Tensor | None, image01: Tensor | None) -> Tensor:
        """Label map (B, H, W): the seg head's argmax (over every class, or with ``lab`` (B, K) over
        background + those), else the CAM of the ``lab`` classes against the background score;
        ``image01`` given: dense CRF on those scores."""
        if seg is not None:
            if lab is not None:
                seg = seg.masked_fill(~present_mask(lab)[..., None, None], float("-inf"))
            return crf_seg(seg, image01) if image01 is not None else seg.argmax(1)
        assert lab is not None  # a CAM-only model always predicts over its kept classes
        bkg = float(self.cfg.eval.bkg_score)
        masked = cams * lab[..., None, None]
        if image01 is None:
            return cam_to_label(masked, lab, bkg_score=bkg)
        probs = with_background(masked, bkg)  # scores normalised over the channels, as probabilities
        probs = probs / probs.sum(1, keepdim=True)
        return crf_seg(probs.clamp_min(1e-8).log(), image01)  # softmax(log p) = p
