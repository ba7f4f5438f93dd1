"""``wsss analyze``: layer-wise attention analyses of a trained model (``aream.md`` 15, AFA project page).

One dataset pass (eval mode, single scale, original size padded to 16) gives, per analysed layer l:

- the Hellinger distance between patch query rows of the head-mean softmax attention (AReAM eq. 6,
  fig. 4b): the mean over pairs per image, then mean / median / IQR over images (and per head);
- the entropy e_l of the CAM refined by that layer alone (``aream.md`` 6.2 construction, base 2), mean
  over images: the vector ``aream.weighting=entropy_offline`` needs;
- the mIoU (best background threshold of a vectorised sweep) of the raw CAM, of the CAM refined by each
  single layer and by the mean of all analysed layers (AReAM fig. 2b / 10);
- the column mass sum_i A[i, j] (sink tokens, fig. 8) and, for one image, every layer's patch affinity;
- AFA and AReAM models: the refinement with the model's affinity against the same refinement with a
  perfect affinity from the ground truth (:mod:`wsss.analysis.affinity`), under ``"oracle"``.

Memory stays O(B N^2) per layer: a first forward gives the CAM (and MCTformer class attention, only its
class rows), a second forward reduces each layer's logits to its statistics inside ``attn_reduce`` as
soon as the block produces them, so no (L, B, heads, N, N) stack ever exists.

MiT: early stages have pooled, differently sized token grids; only the layers whose grid equals the last
layer's grid are analysed (the JSON says which).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.analysis.hellinger import layer_hellinger
from wsss.data.transforms import image01_to_uint8, to_image01
from wsss.engine.distributed import resolve_device
from wsss.engine.evaluate import num_images
from wsss.engine.metrics import AREAM_THRESHOLDS, SweepAccumulator
from wsss.methods import build_method
from wsss.methods.base import Method
from wsss.model import WSSSNet
from wsss.ops.attention import attention_probs, layer_entropy, refine_by_affinity, slice_patches
from wsss.ops.cam import normalize_cam

NORM_EPS = 1e-6  # AReAM inference min-max epsilon (aream.md 5.2)
# The mIoU rules (wsss.engine.metrics protocols), as the printed output names them.
IOU_RULES = {
    "aream": "AReAM rule: mean over all classes, a class absent from the ground truth counts as 0",
    "voc": "evaluate's rule: mean over the classes present in the ground truth",
}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_model(source: str | Path, cfg: Any | None = None, device: str | torch.device = "cpu",
               ) -> tuple[WSSSNet, Any, list[str]]:
    """A trained model from a release dir (``model/``), a run dir or a checkpoint (:func:`wsss.hub.load_run`).

    cfg: a config to use for everything but the weights (data, method); by default the stored one.
    Returns ``(net in eval mode on device, cfg, class names with background first)``.
    """
    from wsss.engine.runs import load_run

    net, run_cfg, names = load_run(source)
    return net.to(device).eval(), (run_cfg if cfg is None else cfg), list(names)


# ---------------------------------------------------------------------------------------------
# Per-batch statistics
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def analysis_layers(net: WSSSNet, x: Tensor) -> tuple[list[int], dict[int, tuple[int, int]], str]:
    """Layers to analyse for inputs shaped like x: those whose token grid equals the last layer's.

    Returns ``(layers, grids of all layers, note)``; one probe forward on ``x[:1]`` (each layer's logits
    are dropped at once).
    """
    num = net.backbone.num_layers
    out = net.forward_cam(x[:1], list(range(num)), lambda layer, z: z.new_zeros(()))
    grids = {int(k): tuple(v) for k, v in out.grids.items()}
    last = grids[num - 1]
    layers = [i for i in range(num) if grids[i] == last]
    note = "all layers" if len(layers) == num else (
        f"layers {layers} (token grid {last[0]}x{last[1]} as the last layer); layers "
        f"{[i for i in range(num) if i not in layers]} have pooled, differently sized grids and are skipped"
    )
    return layers, grids, note


@dataclass
class LayerStats:
    """Statistics of one batch (L = analysed layers, B images, K classes, grid h x w, Np = h*w).

    cam: (B, K, h, w) CAM that is refined (MCTformer: ReLU CAM x class attention when used);
    refined: (L, B, K, h, w) CAM refined by each layer alone; hellinger: (L, B); hellinger_heads:
    (L, B, heads); entropy: (L, B) base-2 entropy (``aream.md`` 6.2); col_mass: (L, B, Np) column sums
    of the patch affinity over patch queries; example: (L, Np, Np) patch affinities of image 0 or None;
    example_heads: (L, heads, Np, Np) the same per head (their mean is ``example``) or None.
    """

    cam: Tensor
    refined: Tensor
    hellinger: Tensor
    hellinger_heads: Tensor
    entropy: Tensor
    col_mass: Tensor
    grid: tuple[int, int]
    example: Tensor | None = None
    example_heads: Tensor | None = None


def uses_class_attention(net: WSSSNet, cfg: Any | None) -> bool:
    """MCTformer CAM x class-to-patch attention, as the config's method does (without a config:
    whenever the backbone has one class token per class)."""
    t = net.backbone.num_prefix_tokens
    wanted = True if cfg is None else build_method(cfg, net).class_attention
    return wanted and t > 1 and t == net.num_classes


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def layer_statistics(net: WSSSNet, x: Tensor, labels: Tensor, layers: Sequence[int],
                     class_attention: bool = False, keep_example: bool = False) -> LayerStats:
    """All per-layer statistics of a padded, normalised batch x (B, 3, H, W); labels (B, K).

    Two forwards: the CAM (and the class rows of every layer if ``class_attention``), then the analysed
    layers, each reduced inside ``attn_reduce`` to its statistics.
    """
    t = net.backbone.num_prefix_tokens
    num = net.backbone.num_layers
    eps = entropy_eps(net)
    first = net.forward_cam(
        x, list(range(num)) if class_attention else [],
        (lambda layer, z: attention_probs(z)[:, :t, t:]) if class_attention else None,
    )
    raw = first.cam.float()
    lab = labels.to(raw)
    # Entropy CAM (aream.md 6.2): ReLU CAM for MCTformer (class tokens), the raw CAM otherwise.
    ent_cam = raw.relu() if t > 1 else raw
    cam = raw
    if class_attention:
        cls = torch.stack([first.attn[i] for i in range(num)]).mean(0)  # (B, T, Np)
        cam = raw.relu() * cls.reshape(raw.shape[0], t, *first.grids[num - 1])
    stats: dict[int, dict[str, Tensor]] = {}

    def reduce(layer: int, logits: Tensor) -> Tensor:
        probs = attention_probs(logits)  # (B, N, N)
        aff = slice_patches(probs, t)  # (B, Np, Np)
        grid = _grid_of(aff.shape[-1], cam.shape[-2:])
        c = _resize(cam, grid)
        s = {
            "refined": refine_by_affinity(c, aff),
            "hellinger": layer_hellinger(probs, t),
            "hellinger_heads": layer_hellinger(_upcast(logits).softmax(-1), t),
            "entropy": layer_entropy(_resize(ent_cam, grid), aff.unsqueeze(0), lab, eps=eps)[0],
            "col_mass": aff.sum(1),
        }
        if keep_example:
            s["example"] = aff[0]
            s["example_heads"] = slice_patches(_upcast(logits[:1]).softmax(-1)[0], t)
        stats[layer] = s
        return logits.new_zeros(())

    out = net.forward_cam(x, list(layers), reduce)
    grid = tuple(out.grids[layers[-1]])
    per = [stats[i] for i in layers]

    def stack(key: str) -> Tensor:
        return torch.stack([p[key] for p in per])

    return LayerStats(
        cam=_resize(cam, grid), refined=stack("refined"), hellinger=stack("hellinger"),
        hellinger_heads=stack("hellinger_heads"), entropy=stack("entropy"), col_mass=stack("col_mass"),
        grid=grid, example=stack("example") if keep_example else None,
        example_heads=stack("example_heads") if keep_example else None,
    )


def entropy_eps(net: WSSSNet) -> float:
    """The epsilon inside log2(p + eps) of the official offline entropy script of the net's family
    (``aream.md`` 6.2): 1e-6 for Conformer (``ent_voc_conformer.py``), none for MCTformer / the others."""
    from wsss.backbones.conformer import Conformer

    return 1e-6 if isinstance(net.backbone, Conformer) else 0.0


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _grid_of(num_patches: int, cam_grid: Sequence[int]) -> tuple[int, int]:
    """The (h, w) token grid with h*w = num_patches, taking the CAM's aspect ratio."""
    h, w = int(cam_grid[0]), int(cam_grid[1])
    if h * w == num_patches:
        return h, w
    scale = math.sqrt(num_patches / (h * w))
    gh = max(1, round(h * scale))
    if num_patches % gh:
        raise ValueError(f"cannot place {num_patches} tokens on a grid shaped like {h}x{w}")
    return gh, num_patches // gh


def normalize_variants(cams: Tensor, padded: tuple[int, int], size: tuple[int, int],
                       labels: Tensor) -> Tensor:
    """AReAM inference post-processing of V CAM variants (V, B, K, h, w) -> (V, B, K, H, W) in [0, 1].

    Bilinear to the padded size, crop to ``size``, ReLU, per-class min-max (eps 1e-6), keep the
    labelled classes (``aream.md`` 5.2).
    """
    v, b, k, h, w = cams.shape
    up = _resize(cams.reshape(v * b, k, h, w).float(), padded)[..., : size[0], : size[1]]
    out = normalize_cam(up.relu(), eps=NORM_EPS).reshape(v, b, k, *size)
    return out * labels.to(out)[None, :, :, None, None]


# ---------------------------------------------------------------------------------------------
# Dataset pass
# ---------------------------------------------------------------------------------------------


def iter_batches(dataset: Any, max_images: int | None, batch_size: int) -> Iterator[list[dict]]:
    """Consecutive samples grouped into batches of equal image size (VOC images differ in size)."""
    n = num_images(dataset, max_images)
    group: list[dict] = []
    for idx in range(n):
        sample = dataset[idx]
        if group and (len(group) == batch_size or group[0]["image"].shape != sample["image"].shape):
            yield group
            group = []
        group.append(sample)
    if group:
        yield group


class SquareResized:
    """A dataset view whose images are resized to ``size`` x ``size`` (bicubic, antialiased; masks
    nearest), aspect ratio distorted: the official offline-entropy pass (``aream.md`` 6.2: 224 for
    MCTformer, 384 for Conformer). Other attributes come from the wrapped dataset."""

    def __init__(self, dataset: Any, size: int) -> None:
        if int(size) < 16:
            raise ValueError(f"resize must be >= 16 pixels, got {size}")
        self.dataset, self.size = dataset, int(size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        sample = dict(self.dataset[idx])
        hw = (self.size, self.size)
        sample["image"] = F.interpolate(sample["image"][None], size=hw, mode="bicubic", antialias=True,
                                        align_corners=False)[0]
        if "mask" in sample:
            mask = sample["mask"][None, None].float()
            sample["mask"] = F.interpolate(mask, size=hw, mode="nearest")[0, 0].long()
        return sample

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "size"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


@dataclass
class AnalysisResult:
    layers: list[int]
    layers_note: str
    images: int
    summary: dict[str, Any]
    example: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def analyze_dataset(net: WSSSNet, dataset: Any, num_classes: int, cfg: Any | None = None,
                    max_images: int | None = None, batch_size: int = 4,
                    thresholds: Sequence[float] = AREAM_THRESHOLDS, iou: str = "aream") -> AnalysisResult:
    """One pass over ``dataset`` (samples with ``image``, ``labels``, ``mask``): every layer-wise number.

    num_classes: C (background included). iou: the rule of the refinement mIoUs (:data:`IOU_RULES`).
    The net is put in eval mode for the pass.
    """
    was = net.training
    net.eval()
    device = next(net.parameters()).device
    class_att = uses_class_attention(net, cfg)
    layers: list[int] | None = None
    note = ""
    sweeps: dict[str, SweepAccumulator] = {}
    hell, hell_heads, ent, conc = [], [], [], []
    example: dict[str, Any] = {}
    count = 0
    for group in iter_batches(dataset, max_images, batch_size):
        image = torch.stack([s["image"] for s in group]).to(device)
        labels = torch.stack([s["labels"] for s in group]).to(device).float()
        gt = torch.stack([s["mask"] for s in group]).to(device)
        x, size = net.pad(image)
        if layers is None:
            layers, _, note = analysis_layers(net, x)
        st = layer_statistics(net, x, labels, layers, class_att, keep_example=not example)
        variants = torch.cat([st.cam[None], st.refined, st.refined.mean(0, keepdim=True)])
        names = ["cam"] + [f"layer_{i}" for i in layers] + ["fused"]
        maps = normalize_variants(variants, tuple(x.shape[-2:]), size, labels)
        for name, m in zip(names, maps):
            acc = sweeps.setdefault(name, SweepAccumulator(num_classes, thresholds, protocol=iou))
            acc.update(m, labels, gt)
        hell.append(st.hellinger.cpu())
        hell_heads.append(st.hellinger_heads.cpu())
        ent.append(st.entropy.cpu())
        conc.append(column_concentration(st.col_mass).cpu())
        if not example:
            example = _example(group[0], image[0], st, labels[0])
        count += len(group)
    net.train(was)
    if layers is None:
        raise ValueError("the dataset is empty")
    summary = _summarize(layers, torch.cat(hell, 1), torch.cat(hell_heads, 1), torch.cat(ent, 1),
                         torch.cat(conc, 1), sweeps)
    return AnalysisResult(layers, note, count, summary, example)


def column_concentration(col_mass: Tensor, top: float = 0.05) -> Tensor:
    """Share of the column mass held by the top ``top`` fraction of key tokens: (L, B, Np) -> (L, B).

    Uniform attention gives ``top``; a few sink columns drive it towards 1.
    """
    k = max(1, int(round(top * col_mass.shape[-1])))
    total = col_mass.sum(-1).clamp_min(torch.finfo(col_mass.dtype).tiny)
    return col_mass.topk(k, dim=-1).values.sum(-1) / total


def _example(sample: dict, image: Tensor, st: LayerStats, labels: Tensor) -> dict[str, Any]:
    img = image01_to_uint8(image).cpu().numpy()
    return {"name": str(sample.get("name", "0")), "image": img, "affinity": st.example.cpu(),
            "col_mass": st.col_mass[:, 0].cpu(), "grid": st.grid, "labels": labels.cpu(),
            "cam": st.cam[0].cpu(), "refined": st.refined[:, 0].cpu(),
            "affinity_heads": st.example_heads.cpu()}


def _quantiles(x: Tensor) -> dict[str, list[float]]:
    """x: (L, n) float -> mean / median / q1 / q3 / iqr per layer."""
    x = x.double()
    q = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype), dim=1)
    return {"mean": x.mean(1).tolist(), "median": q[1].tolist(), "q1": q[0].tolist(),
            "q3": q[2].tolist(), "iqr": (q[2] - q[0]).tolist()}


def _summarize(layers: list[int], hell: Tensor, hell_heads: Tensor, ent: Tensor, conc: Tensor,
               sweeps: dict[str, SweepAccumulator]) -> dict[str, Any]:
    refinement: dict[str, Any] = {}
    for name, acc in sweeps.items():
        r = acc.compute()
        refinement[name] = {"best_miou": r["best_miou"], "best_threshold": r["best_threshold"],
                            "miou": r["miou"], "iou": r["iou"]}
    per_layer = [refinement[f"layer_{i}"]["best_miou"] for i in layers]
    best = int(np.nanargmax(per_layer))
    refinement["_summary"] = {
        "thresholds": sweeps["cam"].thresholds.tolist(), "protocol": sweeps["cam"].protocol,
        "best_layer": layers[best], "best_layer_miou": per_layer[best],
        "fused_miou": refinement["fused"]["best_miou"], "cam_miou": refinement["cam"]["best_miou"],
    }
    return {
        "hellinger": {**_quantiles(hell), "per_head_mean": hell_heads.double().mean(1).tolist()},
        "entropy": {**_quantiles(ent), "base": 2},
        "column_mass": {"top5pct_share": _quantiles(conc)},
        "refinement": refinement,
    }


# ---------------------------------------------------------------------------------------------
# A learned affinity (a method's affinity head): MHSA vs learned affinity, head weights
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def affinity_query_maps(method: Method, net: WSSSNet, x: Tensor, query: int | None = None) -> dict[str, Any]:
    """Attention vs learned affinity of one query token, image 0 of a padded batch x (B, 3, H, W).

    MHSA: head-mean softmax attention averaged over the layers the affinity is computed from;
    affinity: the method's learned affinity (:meth:`~wsss.methods.base.Method.affinity_probe`).
    query: flat token index; by default the token with the highest CAM of the image's top class.
    Returns ``{"query": (row, col), "grid": (h, w), "mhsa": (h, w), "affinity": (h, w)}`` tensors on CPU.
    """
    probe = method.affinity_probe(net, x[:1])
    if probe is None:
        raise ValueError(f"method '{method.name}' learns no affinity")
    grid = tuple(probe["grid"])
    t = net.backbone.num_prefix_tokens
    mhsa = torch.stack([slice_patches(attention_probs(a), t)[0] for a in probe["attn"]]).mean(0)
    aff = probe["affinity"][0]
    if query is None:
        cam = _resize(probe["cam"][:1].float(), grid)[0]  # (K, h, w)
        top = cam.flatten(1).amax(1).argmax()
        query = int(cam[top].flatten().argmax())
    return {"query": (query // grid[1], query % grid[1]), "grid": grid,
            "mhsa": mhsa[query].reshape(grid).cpu(), "affinity": aff[query].reshape(grid).cpu()}


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
    heat = _resize(c.amax(0)[None, None], (int(size[0]), int(size[1])))[0, 0]
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


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def entropy_override(values: Sequence[float]) -> str:
    """The command-line override that makes AReAM use these offline entropies."""
    return "aream.weighting=entropy_offline aream.entropy=[" + ",".join(f"{v:.6g}" for v in values) + "]"


def run_analysis(net: WSSSNet, cfg: Any, dataset: Any, out_dir: str | Path, split: str = "val",
                 max_images: int | None = None, batch_size: int = 4, entropy: bool = False,
                 plots: bool = True, iou: str = "aream") -> dict[str, Any]:
    """Analyse ``net`` on ``dataset``; write ``analysis.json`` (+ PNG plots) into ``out_dir``.

    entropy: also write ``aream_entropy.yaml`` (``aream.entropy`` for ``entropy_offline``); needs every
    layer to be analysed. iou: the rule of the refinement mIoUs (``aream`` or evaluate's ``voc``); the
    oracle numbers always use evaluate's rule. Returns the JSON dict.
    """
    if iou not in IOU_RULES:
        raise ValueError(f"iou rule must be one of {sorted(IOU_RULES)}, got {iou!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_classes = int(dataset.num_classes)
    res = analyze_dataset(net, dataset, num_classes, cfg, max_images, batch_size, iou=iou)
    bb = net.backbone
    data: dict[str, Any] = {
        "model": {"backbone": str(cfg.model.backbone), "method": str(cfg.method), "num_layers": bb.num_layers,
                  "num_prefix_tokens": bb.num_prefix_tokens, "num_heads": list(bb.num_heads)},
        "protocol": {"split": split, "images": res.images, "mode": "eval", "scales": [1.0], "flip": False,
                     "pad_multiple": net.pad_multiple,
                     "attention": "head-mean softmax over all keys; patch rows",
                     "class_attention": uses_class_attention(net, cfg),
                     "cam_postprocess": "bilinear, crop, ReLU, min-max (eps 1e-6), GT classes",
                     "resize": dataset.size if isinstance(dataset, SquareResized) else None,
                     "refinement_iou": IOU_RULES[iou], "oracle_iou": IOU_RULES["voc"],
                     "entropy_log": f"log2(p + {entropy_eps(net):g})"},
        "layers": res.layers,
        "layers_note": res.layers_note,
        **res.summary,
        "example": {"name": res.example["name"], "grid": list(res.example["grid"])},
        "plots": {},
    }
    method = build_method(cfg, net)
    weights = method.head_weights(net)
    if weights is not None:
        data["learned_affinity"] = weights
    has_masks = getattr(dataset, "has_masks", None)
    if method.ORACLE_MAPS and (has_masks is None or has_masks()):
        from wsss.analysis.affinity import oracle_quality

        data["oracle"] = oracle_quality(method, net, dataset, num_classes, max_images)
    if entropy:
        if len(res.layers) != bb.num_layers:
            raise ValueError(f"--entropy needs all {bb.num_layers} layers analysed ({res.layers_note})")
        vec = [float(v) for v in data["entropy"]["mean"]]
        (out / "aream_entropy.yaml").write_text(
            "# wsss analyze --entropy: offline mean layer entropies (aream.md 6.2)\n"
            "aream:\n  weighting: entropy_offline\n  entropy: [" + ", ".join(f"{v:.6g}" for v in vec) + "]\n"
        )
        data["entropy"]["override"] = entropy_override(vec)
    if plots:
        data["plots"] = _write_plots(method, net, res, data, out)
    (out / "analysis.json").write_text(json.dumps(data, indent=2))
    return data


def _write_plots(method: Method, net: WSSSNet, res: AnalysisResult, data: dict[str, Any], out: Path
                 ) -> dict[str, str]:
    files = plot_layer_curves(data, res.layers, out)
    ex = res.example
    files["affinity"] = plot_affinity_grid(ex["affinity"], res.layers, out)
    files["affinity_heads"] = plot_head_affinity_grid(ex["affinity_heads"], res.layers, out)
    files["column_mass"] = plot_column_mass(ex["col_mass"], ex["grid"], res.layers, out)
    files["layer_cams"] = plot_layer_cams(ex["image"], ex["cam"], ex["refined"], ex["labels"], res.layers,
                                          out)
    if "learned_affinity" in data:
        device = next(net.parameters()).device
        x, _ = net.pad(torch.from_numpy(to_image01(ex["image"]))[None].to(device))
        maps = affinity_query_maps(method, net.eval(), x)
        crop = ex["image"]
        data["learned_affinity"]["query"] = list(maps["query"])
        files["affinity_query"] = plot_affinity_query(_pad_image(crop, x.shape[-2:]), maps, out)
        files["affinity_head_weights"] = plot_head_weights(data["learned_affinity"], out)
    return files


def _pad_image(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """uint8 (H, W, 3) -> zero-padded to the padded input size so the token grid lines up."""
    h, w = int(size[0]), int(size[1])
    out = np.zeros((h, w, 3), dtype=np.uint8)
    out[: img.shape[0], : img.shape[1]] = img
    return out


def oracle_summary(q: dict[str, Any]) -> str:
    """One or two lines on :mod:`wsss.analysis.affinity`'s numbers."""
    m = {k: f"{100 * v:.2f}" for k, v in q["miou"].items()}
    if "pairs" in q:  # AFA
        p = q["pairs"]
        return (f"AFA affinity: mean {p['mean_same_class']:.3f} on same-class pairs, "
                f"{p['mean_different_class']:.3f} on different-class pairs, "
                f"accuracy {100 * p['accuracy']:.1f}%\nmIoU with PAR: CAM {m['cam_par']}, "
                f"propagated with the learned affinity {m['learned_par']}, "
                f"with the ground-truth affinity {m['oracle_par']}")
    return (f"mIoU (with PAR): CAM {m['cam']} ({m['cam_par']}), refined by the attention {m['refined']} "
            f"({m['refined_par']}), refined by the ground-truth affinity {m['oracle']} ({m['oracle_par']})")


def cmd_analyze(args: argparse.Namespace) -> int:
    from wsss.config import run_config, split_config_arg
    from wsss.data.build import build_dataset
    from wsss.engine.distributed import set_threads
    from wsss.engine.infer import check_classes, run_dir_of

    config, overrides = split_config_arg(args.config, args.overrides)
    device = resolve_device(args.device)  # a bad device: before loading
    net, run_cfg, _ = load_model(args.checkpoint, None, device)
    cfg = run_config(run_cfg, config, overrides)
    set_threads(cfg.get("threads"))
    split = args.split or str(cfg.eval.get("split") or cfg.data.val_split)
    dataset = build_dataset(cfg.data, split=split, train=False)
    check_classes(net, dataset, args.checkpoint, split)
    if args.resize:
        dataset = SquareResized(dataset, args.resize)
    missing = plots_available()
    if missing:
        print(f"wsss analyze: {missing}; writing analysis.json only")
    run_dir = run_dir_of(args.checkpoint)
    out = Path(args.out) if args.out else run_dir / "analysis"
    data = run_analysis(net, cfg, dataset, out, split, args.max_images, args.batch_size, args.entropy,
                        missing is None, iou=args.iou)
    record_analysis(run_dir, out)
    print(analysis_lines(data))
    if args.entropy:
        print("paste into the AReAM training command:\n  " + data["entropy"]["override"])
    print(f"wrote {out / 'analysis.json'}")
    return 0


def analysis_lines(data: dict[str, Any]) -> str:
    """The printed summary of ``analysis.json``, each mIoU labelled with its scoring rule."""
    ref = data["refinement"]["_summary"]
    lines = [f"analysed {data['protocol']['images']} images, {data['layers_note']}",
             f"refinement mIoU at the best background threshold ({data['protocol']['refinement_iou']}): "
             f"raw CAM {100 * ref['cam_miou']:.2f}, fused {100 * ref['fused_miou']:.2f}, "
             f"best layer {ref['best_layer']} {100 * ref['best_layer_miou']:.2f}"]
    if "oracle" in data:
        lines.append(f"affinity ceiling ({data['protocol']['oracle_iou']}):")
        lines.append(oracle_summary(data["oracle"]))
    return "\n".join(lines)


ANALYSIS_RECORD = "analysis_location.txt"  # in the run folder: where `wsss analyze` last wrote


def record_analysis(run_dir: Path, out: Path) -> None:
    """Note ``out`` in the run folder so that ``wsss report`` finds an analysis written elsewhere."""
    if out.resolve() == (run_dir / "analysis").resolve():
        return
    try:
        (run_dir / ANALYSIS_RECORD).write_text(str(out.resolve()) + "\n")
    except OSError as err:  # a read-only run folder: the report then takes --analysis
        print(f"wsss analyze: could not record the analysis folder in {run_dir}: {err}")


def find_analysis(run_dir: Path) -> Path | None:
    """The run's analysis folder: ``<run>/analysis``, else the one ``wsss analyze`` recorded."""
    if (run_dir / "analysis" / "analysis.json").is_file():
        return run_dir / "analysis"
    record = run_dir / ANALYSIS_RECORD
    if record.is_file():
        folder = Path(record.read_text().strip())
        if (folder / "analysis.json").is_file():
            return folder
    return None


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``wsss analyze``."""
    p = sub.add_parser("analyze", help="layer-wise attention analyses (Hellinger, entropy, refinement mIoU)")
    p.add_argument("config", nargs="?", default=None,
                   help="optional: a config whose settings replace the run's, except its data, model and "
                        "method (default: the checkpoint's run config alone)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the run's config, e.g. data.root=...")
    p.add_argument("--checkpoint", required=True, help="model/ release dir, run dir or checkpoint file")
    p.add_argument("--out", default=None,
                   help="output directory (analysis.json + PNG plots; default: the run's analysis/)")
    p.add_argument("--iou", choices=sorted(IOU_RULES), default="aream",
                   help="rule of the refinement mIoUs: aream (AReAM's evaluate.py, absent classes count as "
                        "0; default) or voc (wsss evaluate's rule); the oracle rows always use voc")
    p.add_argument("--split", default=None, help="dataset split (default: eval.split)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4, help="images of equal size per forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--entropy", action="store_true",
                   help="also write aream_entropy.yaml (aream.entropy for aream.weighting=entropy_offline)")
    p.add_argument("--resize", type=int, default=None, metavar="N",
                   help="resize every image to N x N first, as the official entropy pass does "
                        "(224 for MCTformer, 384 for Conformer); default: the original size")
    p.set_defaults(fn=cmd_analyze)
    return p
