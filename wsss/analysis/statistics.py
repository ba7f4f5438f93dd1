"""``wsss analyze``: per-layer attention statistics of a batch and their summary over a dataset
(Hellinger distance, refined-CAM entropy, column mass, refinement mIoU per layer); see
:mod:`wsss.analysis.analyze`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wsss.analysis.hellinger import layer_hellinger
from wsss.analysis.loading import iter_batches
from wsss.data.transforms import image01_to_uint8
from wsss.engine.metrics import AREAM_THRESHOLDS, SweepAccumulator
from wsss.methods import build_method
from wsss.methods.base import resize
from wsss.model import WSSSNet
from wsss.ops.attention import attention_probs, layer_entropy, refine_by_affinity, slice_patches, upcast
from wsss.ops.cam_fusion import normalize_cam

NORM_EPS = 1e-6  # AReAM inference min-max epsilon (docs/methods/aream.md 5.2)
# The mIoU rules (wsss.engine.metrics protocols), as the printed output names them.
IOU_RULES = {
    "aream": "AReAM rule: mean over all classes, a class absent from the ground truth counts as 0",
    "voc": "evaluate's rule: mean over the classes present in the ground truth",
}


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
    (L, B, heads); entropy: (L, B) base-2 entropy (``docs/methods/aream.md`` 6.2); col_mass: (L, B, Np)
    column sums
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
    # Entropy CAM (docs/methods/aream.md 6.2): ReLU CAM for MCTformer (class tokens), the raw CAM otherwise.
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
        c = resize(cam, grid)
        s = {
            "refined": refine_by_affinity(c, aff),
            "hellinger": layer_hellinger(probs, t),
            "hellinger_heads": layer_hellinger(upcast(logits).softmax(-1), t),
            "entropy": layer_entropy(resize(ent_cam, grid), aff.unsqueeze(0), lab, eps=eps)[0],
            "col_mass": aff.sum(1),
        }
        if keep_example:
            s["example"] = aff[0]
            s["example_heads"] = slice_patches(upcast(logits[:1]).softmax(-1)[0], t)
        stats[layer] = s
        return logits.new_zeros(())

    out = net.forward_cam(x, list(layers), reduce)
    grid = tuple(out.grids[layers[-1]])
    per = [stats[i] for i in layers]

    def stack(key: str) -> Tensor:
        return torch.stack([p[key] for p in per])

    return LayerStats(
        cam=resize(cam, grid), refined=stack("refined"), hellinger=stack("hellinger"),
        hellinger_heads=stack("hellinger_heads"), entropy=stack("entropy"), col_mass=stack("col_mass"),
        grid=grid, example=stack("example") if keep_example else None,
        example_heads=stack("example_heads") if keep_example else None,
    )


def entropy_eps(net: WSSSNet) -> float:
    """The epsilon inside log2(p + eps) of the official offline entropy script of the net's family
    (``docs/methods/aream.md`` 6.2): 1e-6 for Conformer (``ent_voc_conformer.py``), none for MCTformer /
    the others."""
    from wsss.backbones.conformer import Conformer

    return 1e-6 if isinstance(net.backbone, Conformer) else 0.0


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
    labelled classes (``docs/methods/aream.md`` 5.2).
    """
    v, b, k, h, w = cams.shape
    up = resize(cams.reshape(v * b, k, h, w).float(), padded)[..., : size[0], : size[1]]
    out = normalize_cam(up.relu(), eps=NORM_EPS).reshape(v, b, k, *size)
    return out * labels.to(out)[None, :, :, None, None]


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
