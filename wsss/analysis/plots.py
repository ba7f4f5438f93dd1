"""``wsss analyze``: the plots (matplotlib, optional extra ``viz``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.analysis.statistics import NORM_EPS
from wsss.methods.base import resize
from wsss.ops.cam_fusion import normalize_cam

# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, optional extra ``viz``)
# ---------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("wsss analyze needs matplotlib for its plots: pip install 'wsss[viz]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots_available() -> str | None:
    """None when matplotlib can draw the plots, else the reason (an install hint)."""
    try:
        _pyplot()
    except ImportError as err:
        return str(err)
    return None


def _save(fig: Any, path: Path) -> str:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path.name


def plot_layer_curves(summary: dict[str, Any], layers: list[int], out: Path) -> dict[str, str]:
    """Hellinger (median + IQR band), entropy, and refinement mIoU against the layer index."""
    plt = _pyplot()
    files = {}
    for key, title in (("hellinger", "Hellinger distance between patch rows"),
                       ("entropy", "entropy of the layer-refined CAM (bits)")):
        s = summary[key]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(layers, s["mean"], "o-", label="mean")
        ax.plot(layers, s["median"], "s--", label="median")
        ax.fill_between(layers, s["q1"], s["q3"], alpha=0.25, label="IQR")
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.set_xticks(layers)
        ax.legend()
        files[key] = _save(fig, out / f"{key}.png")
    ref = summary["refinement"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(layers, [100 * ref[f"layer_{i}"]["best_miou"] for i in layers], "o-", label="single layer")
    ax.axhline(100 * ref["fused"]["best_miou"], color="C2", ls="--", label="fused (mean of layers)")
    ax.axhline(100 * ref["cam"]["best_miou"], color="C3", ls=":", label="raw CAM")
    ax.set_xlabel("layer")
    ax.set_ylabel("mIoU (%) at best threshold")
    ax.set_title("CAM refined by each layer")
    ax.set_xticks(layers)
    ax.legend()
    files["refinement"] = _save(fig, out / "refinement_miou.png")
    return files


DISPLAY_QUANTILE = 0.98  # affinity panels saturate here: a few bright (diagonal) values set no scale


def display_normalize(maps: Tensor, q: float = DISPLAY_QUANTILE) -> Tensor:
    """Maps (..., N, N) -> [0, 1] for display, each map on its own: from its minimum to its q-quantile
    (clipped above). A softmax affinity has a bright diagonal; scaled by its maximum the rest of the map
    would be nearly white."""
    flat = maps.float().flatten(-2)
    k = max(1, min(flat.shape[-1], int(math.ceil(q * flat.shape[-1]))))
    lo = flat.amin(-1, keepdim=True)
    hi = flat.kthvalue(k, dim=-1, keepdim=True).values
    hi = torch.where(hi > lo, hi, flat.amax(-1, keepdim=True))  # a near-constant map: plain min-max
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1).reshape(maps.shape)


def plot_affinity_grid(affinity: Tensor, layers: list[int], out: Path) -> str:
    """Per-layer patch affinity (L, Np, Np), each normalised for display, "Blues", one panel per layer."""
    plt = _pyplot()
    num = len(layers)
    cols = min(num, 4)
    rows = -(-num // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    norm = display_normalize(affinity)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < num:
            ax.imshow(norm[i].numpy(), cmap="Blues", interpolation="nearest")
            ax.set_title(f"layer {layers[i]}", fontsize=9)
    return _save(fig, out / "affinity_layers.png")


def class_heat(cam: Tensor, labels: Tensor, size: Sequence[int]) -> np.ndarray:
    """(K, h, w) CAM -> (H, W) heat in [0, 1]: ReLU, per-class min-max, labelled classes, max over
    classes, bilinear to ``size``."""
    c = normalize_cam(cam.float().relu()[None], eps=NORM_EPS)[0] * labels.to(torch.float32)[:, None, None]
    heat = resize(c.amax(0)[None, None], (int(size[0]), int(size[1])))[0, 0]
    return heat.clamp(0, 1).numpy()


def plot_layer_cams(image: np.ndarray, cam: Tensor, refined: Tensor, labels: Tensor, layers: list[int],
                    out: Path) -> str:
    """The example image's CAM and the CAM refined by each layer alone (L, K, h, w), as heat overlays
    (AReAM fig. 2 / 10: where over-smoothed layers spread the activation)."""
    from wsss.analysis.viz import overlay_heatmap

    plt = _pyplot()
    panels = [("CAM", cam)] + [(f"layer {layer}", refined[i]) for i, layer in enumerate(layers)]
    cols = min(len(panels), 5)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(panels):
            title, m = panels[i]
            ax.imshow(overlay_heatmap(image, class_heat(m, labels, image.shape[:2])))
            ax.set_title(title, fontsize=9)
    return _save(fig, out / "layer_cams.png")


def plot_head_affinity_grid(affinity: Tensor, layers: list[int], out: Path) -> str:
    """Per-layer, per-head patch affinity (L, heads, Np, Np): one row per layer, one column per head,
    each panel normalised for display ("Blues")."""
    plt = _pyplot()
    num, heads = affinity.shape[:2]
    fig, axes = plt.subplots(num, heads, figsize=(1.6 * heads, 1.6 * num), squeeze=False)
    norm = display_normalize(affinity)
    for i in range(num):
        for h in range(heads):
            ax = axes[i][h]
            ax.axis("off")
            ax.imshow(norm[i, h].numpy(), cmap="Blues", interpolation="nearest")
            ax.set_title(f"layer {layers[i]} head {h}", fontsize=6)
    return _save(fig, out / "affinity_heads.png")


def plot_column_mass(col_mass: Tensor, grid: tuple[int, int], layers: list[int], out: Path) -> str:
    """Column mass sum_i A[i, j] per layer (L, Np) as (h, w) maps (sink tokens light up)."""
    plt = _pyplot()
    num = len(layers)
    cols = min(num, 4)
    rows = -(-num // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < num:
            im = ax.imshow(col_mass[i].reshape(grid).numpy(), cmap="viridis", interpolation="nearest")
            ax.set_title(f"layer {layers[i]}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, out / "column_mass.png")


def plot_affinity_query(image: np.ndarray, maps: dict[str, Any], out: Path) -> str:
    """Image, MHSA and learned affinity of the query token (star) overlaid on the image."""
    from wsss.analysis.viz import overlay_heatmap

    plt = _pyplot()
    h, w = image.shape[:2]
    gh, gw = maps["grid"]
    qy, qx = maps["query"]
    star = ((qx + 0.5) * w / gw, (qy + 0.5) * h / gh)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    panels = [("image", image)]
    for key, title in (("mhsa", "attention (MHSA)"), ("affinity", "learned affinity")):
        m = maps[key][None, None].float()
        up = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        up = (up - up.min()) / (up.max() - up.min()).clamp_min(1e-12)
        panels.append((title, overlay_heatmap(image, up.numpy())))
    for ax, (title, im) in zip(axes, panels):
        ax.imshow(im)
        ax.plot(*star, marker="*", color="white", markersize=16, markeredgecolor="black")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    return _save(fig, out / "affinity_query.png")


def plot_head_weights(weights: dict[str, Any], out: Path) -> str:
    """Bar plot of the AFA head's learned weight per attention head."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(weights["weights"])), 3))
    ax.bar(range(len(weights["weights"])), weights["weights"], color="C0")
    ax.set_xticks(range(len(weights["heads"])), weights["heads"], rotation=90, fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("1x1 conv weight")
    ax.set_title("AFA head: learned weight per head")
    return _save(fig, out / "affinity_head_weights.png")



def pad_image(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """uint8 (H, W, 3) -> zero-padded to the padded input size so the token grid lines up."""
    h, w = int(size[0]), int(size[1])
    out = np.zeros((h, w, 3), dtype=np.uint8)
    out[: img.shape[0], : img.shape[1]] = img
    return out
