"""``wsss analyze``: layer-wise attention analyses of a trained model (``docs/methods/aream.md`` 15, AFA
project page).

One dataset pass (eval mode, single scale, original size padded to 16) gives, per analysed layer l:

- the Hellinger distance between patch query rows of the head-mean softmax attention (AReAM eq. 6,
  fig. 4b): the mean over pairs per image, then mean / median / IQR over images (and per head);
- the entropy e_l of the CAM refined by that layer alone (``docs/methods/aream.md`` 6.2 construction,
  base 2), mean
  over images: the vector ``aream.weighting=entropy_offline`` needs;
- the mIoU (best background threshold of a vectorised sweep) of the raw CAM, of the CAM refined by each
  single layer and by the mean of all analysed layers (AReAM fig. 2b / 10);
- the column mass sum_i A[i, j] (sink tokens, fig. 8) and, for one image, every layer's patch affinity;
- methods with an affinity refinement (:class:`~wsss.analysis.hooks.OracleRefinement`): the
  refinement with the model's affinity against the same refinement with a perfect affinity from the
  ground truth (:mod:`wsss.analysis.oracle`), under ``"oracle"``.

Modules: :mod:`~wsss.analysis.loading` (model, batches, views), :mod:`~wsss.analysis.statistics`
(per-layer statistics and their summary), :mod:`~wsss.analysis.probes` (a learned affinity),
:mod:`~wsss.analysis.plots`; this module runs them (the command: :mod:`wsss.commands.analyze`).

Memory stays O(B N^2) per layer: a first forward gives the CAM (and MCTformer class attention, only its
class rows), a second forward reduces each layer's logits to its statistics inside ``attn_reduce`` as
soon as the block produces them, so no (L, B, heads, N, N) stack ever exists.

MiT: early stages have pooled, differently sized token grids; only the layers whose grid equals the last
layer's grid are analysed (the JSON says which).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from wsss.analysis.hooks import LearnedAffinity, OracleRefinement
from wsss.analysis.loading import SquareResized
from wsss.analysis.oracle import oracle_quality
from wsss.analysis.plots import pad_image as _pad_image
from wsss.analysis.plots import (
    plot_affinity_grid,
    plot_affinity_query,
    plot_column_mass,
    plot_head_affinity_grid,
    plot_head_weights,
    plot_layer_cams,
    plot_layer_curves,
)
from wsss.analysis.probes import affinity_query_maps
from wsss.analysis.statistics import (
    IOU_RULES,
    AnalysisResult,
    analyze_dataset,
    entropy_eps,
    uses_class_attention,
)
from wsss.data.transforms import to_image01
from wsss.methods import build_method
from wsss.methods.base import Method
from wsss.model import WSSSNet

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
    if isinstance(method, LearnedAffinity):
        data["learned_affinity"] = method.head_weights(net)
    has_masks = getattr(dataset, "has_masks", None)
    if isinstance(method, OracleRefinement) and (has_masks is None or has_masks()):
        data["oracle"] = oracle_quality(method, net, dataset, num_classes, max_images)
    if entropy:
        if len(res.layers) != bb.num_layers:
            raise ValueError(f"--entropy needs all {bb.num_layers} layers analysed ({res.layers_note})")
        vec = [float(v) for v in data["entropy"]["mean"]]
        (out / "aream_entropy.yaml").write_text(
            "# wsss analyze --entropy: offline mean layer entropies (docs/methods/aream.md 6.2)\n"
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


def oracle_summary(q: dict[str, Any]) -> str:
    """One or two lines on :mod:`wsss.analysis.oracle`'s numbers."""
    m = {k: f"{100 * v:.2f}" for k, v in q["miou"].items()}
    if "pairs" in q:  # a learned affinity, propagated
        p = q["pairs"]
        fg = p.get("mean_same_class_foreground")
        fg = "" if fg is None else f" ({fg:.3f} on those of object tokens)"
        diff = p["mean_different_class"]
        diff = "no different-class pairs" if diff is None else f"{diff:.3f} on different-class pairs"
        return (f"learned affinity: mean {p['mean_same_class']:.3f} on same-class pairs{fg}, {diff}, "
                f"accuracy {100 * p['accuracy']:.1f}%\nmIoU with PAR: CAM {m['cam_par']}, "
                f"propagated with the learned affinity {m['learned_par']}, "
                f"with the ground-truth affinity {m['oracle_par']}")
    return (f"mIoU (with PAR): CAM {m['cam']} ({m['cam_par']}), refined by the attention {m['refined']} "
            f"({m['refined_par']}), refined by the ground-truth affinity {m['oracle']} ({m['oracle_par']})")


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
