"""``Segmenter``: a trained model as a one-call image -> mask predictor.

    seg = Segmenter.from_pretrained("runs/afa/model")
    pred = seg.predict(Image.open("cat.jpg"))          # or uint8 (H, W, 3) / float (3, H, W) in [0, 1]
    pred.mask, pred.present(), pred.overlay()

The mask comes from the segmentation head when the model has one, else from the CAM thresholded with
the eval background score, over the classes the classifier predicts (sigmoid(logit) > 0.5) or the
``labels`` given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wsss.data.transforms import denormalize, normalize
from wsss.engine.evaluate import crf_seg, multiscale_seg, pad_batch
from wsss.methods import build_method
from wsss.model import WSSSNet
from wsss.refine.labels import cam_to_label


@dataclass
class Prediction:
    """mask (H, W) int64 class ids; scores (K,) foreground class probabilities; cams (K, H, W) in [0, 1];
    class_names (K + 1, background first); image uint8 (H, W, 3)."""

    mask: np.ndarray
    scores: np.ndarray
    cams: np.ndarray
    class_names: list[str]
    image: np.ndarray

    def present(self) -> list[str]:
        """Names of the classes in the mask (background included when present), in class order."""
        ids = np.unique(self.mask)
        return [self.class_names[i] for i in ids.tolist() if 0 <= i < len(self.class_names)]

    def overlay(self, alpha: float = 0.5) -> np.ndarray:
        """uint8 (H, W, 3): the VOC-coloured mask blended over the image (background left as is)."""
        from wsss.analysis.viz import overlay_label

        return overlay_label(self.image, self.mask, alpha=alpha, skip=(0, 255))

    def to_json(self) -> dict[str, Any]:
        """Present classes and per-class scores (plain Python types)."""
        return {"present": self.present(),
                "scores": {n: float(s) for n, s in zip(self.class_names[1:], self.scores.tolist())}}


def to_uint8_image(image: Any) -> np.ndarray:
    """PIL image, uint8 numpy (H, W, 3) or tensor (3, H, W) (float in [0, 1] or uint8) -> uint8 (H, W, 3)."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"a tensor image must be (3, H, W), got {tuple(t.shape)}")
        if t.dtype != torch.uint8:
            t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return t.permute(1, 2, 0).contiguous().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"a numpy image must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


class Segmenter:
    """A trained ``WSSSNet`` with its config and class names, ready to predict."""

    def __init__(self, net: WSSSNet, cfg: Any, class_names: Sequence[str],
                 device: str | torch.device | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
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
        """From a release dir, run dir, training checkpoint or hub id (see :mod:`wsss.hub`)."""
        from wsss.hub import hub_download, load_run

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
                crf: bool = False) -> Prediction:
        """Predict one image (PIL, uint8 (H, W, 3) numpy, or (3, H, W) tensor). Defaults: the config's
        eval scales / flip."""
        return self.predict_batch([image], labels, scales, flip, crf)[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence[Any], labels: Sequence[str] | str | None = None,
                      scales: Sequence[float] | None = None, flip: bool | None = None,
                      crf: bool = False) -> list[Prediction]:
        """Predict a list of same-size images in one batch (``labels`` apply to every image)."""
        arrs = [to_uint8_image(im) for im in images]
        if len({a.shape for a in arrs}) != 1:
            raise ValueError(f"predict_batch needs images of one size, got {sorted({a.shape for a in arrs})}")
        scales = [float(s) for s in (scales if scales is not None else self.cfg.eval.scales)]
        flip = bool(self.cfg.eval.flip) if flip is None else bool(flip)
        x = torch.from_numpy(np.stack([normalize(a) for a in arrs])).to(self.device)
        h, w = x.shape[-2:]
        xp, _ = pad_batch(x)
        net = self.net
        logits = net(xp, with_seg=False).logits[0]  # (B, K)
        scores = logits.sigmoid()
        given = labels is not None
        lab = (self.label_vector(labels).to(self.device).expand_as(scores) if given  # type: ignore[arg-type]
               else (scores > 0.5).float())
        saved, self.method.flip = self.method.flip, flip
        try:
            cams = self.method.multiscale_cam(net, xp, scales)[..., :h, :w]  # (B, K, H, W) in [0, 1]
        finally:
            self.method.flip = saved
        seg = multiscale_seg(self.method, net, xp, scales, flip)
        if seg is not None:
            seg = seg[..., :h, :w]
            if given:  # restrict the head to background + the named classes
                keep = torch.cat([lab.new_ones(lab.shape[0], 1), lab], 1) > 0
                seg = seg.masked_fill(~keep[..., None, None], float("-inf"))
            mask = crf_seg(seg, denormalize(x)) if crf else seg.argmax(1)
        else:
            bkg = float(self.cfg.eval.bkg_score)
            masked = cams * lab[..., None, None]
            if crf:
                from wsss.methods.base import with_background

                probs = with_background(masked, bkg)  # scores normalised over the channels, as probabilities
                probs = probs / probs.sum(1, keepdim=True)
                mask = crf_seg(probs.clamp_min(1e-8).log(), denormalize(x))  # softmax(log p) = p
            else:
                mask = cam_to_label(masked, lab, bkg_score=bkg)
        return [
            Prediction(mask[i].cpu().numpy().astype(np.int64), scores[i].cpu().numpy(),
                       cams[i].float().cpu().numpy(), self.class_names, arrs[i])
            for i in range(len(arrs))
        ]
