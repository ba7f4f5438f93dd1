"""``wsss report``: one self-contained HTML page for a run directory.

Sections: config (YAML), metrics (mIoU per map, per-class IoU, protocol), loss curves (inline SVG drawn
here, no matplotlib), an image grid for a few validation images (image, ground truth, CAM heat map,
the method's refined map, pseudo label, prediction) and, when the run has an analysis (``analysis/``
or the folder ``wsss analyze`` recorded), its plots. Images are base64 PNG data URIs; CSS is inline;
nothing is fetched from elsewhere.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from wsss.analysis.viz import colorize, legend, overlay_heatmap, to_png_bytes

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")

_CSS = """
body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.6em;margin-bottom:4px}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 8px;font-size:0.9em}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:420px;font-size:0.85em}
table.grid td{text-align:center;vertical-align:top}table.grid img{width:128px;image-rendering:pixelated}
figure{display:inline-block;margin:6px}figure img{max-width:560px}figcaption{font-size:0.85em;color:#555}
.note{color:#666;font-size:0.9em}svg{background:#fff;border:1px solid #ddd}
"""


def data_uri(image: np.ndarray | bytes) -> str:
    """A base64 PNG data URI of a uint8 image (or of PNG bytes)."""
    raw = image if isinstance(image, bytes) else to_png_bytes(image)
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


def _img(src: str, alt: str) -> str:
    return f'<img src="{src}" alt="{html.escape(alt)}">'


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append(f'<td class="num">{"-" if math.isnan(v) else f"{v:.2f}"}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _pct(v: Any) -> float:
    return float("nan") if v is None else 100.0 * float(v)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def metrics_section(metrics: dict[str, Any], class_names: list[str] | None) -> str:
    """mIoU per map, per-class IoU (rows = classes, columns = maps) and the protocol."""
    ev = metrics.get("eval", {})
    maps = [k for k, v in ev.items() if not k.startswith("_") and isinstance(v, dict) and "miou" in v]
    rows = [[m, _pct(ev[m]["miou"]), _pct(ev[m].get("pixel_acc")), _pct(ev[m].get("mean_acc")),
             _pct(ev[m].get("coverage"))] for m in maps]
    parts = [f'<p class="note">iterations: {metrics.get("iterations", "?")}, '
             f's/iter: {float(metrics.get("s_per_iter", float("nan"))):.3f}</p>',
             _table(["map", "mIoU (%)", "pixel acc (%)", "mean acc (%)", "coverage (%)"], rows, "miou")]
    if maps:
        num = max(len(ev[m]["iou"]) for m in maps)
        names = list(class_names or [])[:num] + [f"class {i}" for i in range(len(class_names or []), num)]
        per = [[names[c]] + [_pct(ev[m]["iou"][c]) if c < len(ev[m]["iou"]) else float("nan") for m in maps]
               for c in range(num)]
        parts += ["<h3>IoU per class (%)</h3>", _table(["class", *maps], per, "per-class")]
    proto = ev.get("_protocol", {})
    if proto:
        rows = [[k, json.dumps(v)] for k, v in proto.items()]
        parts += ["<h3>Protocol</h3>", _table(["key", "value"], rows, "protocol")]
    return "\n".join(parts)


def loss_svg(history: list[dict[str, Any]], keys: list[str], title: str, width: int = 560,
             height: int = 260) -> str:
    """An inline SVG line chart of ``keys`` of the history records against ``iter``."""
    pad_l, pad_r, pad_t, pad_b = 56, 110, 24, 34
    series = {k: [(float(r["iter"]), float(r[k])) for r in history
                  if k in r and "iter" in r and math.isfinite(float(r[k]))] for k in keys}
    points = [p for s in series.values() for p in s]
    if not points:
        return '<p class="note">no data</p>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.1 - 1e-3, y1 + abs(y1) * 0.1 + 1e-3
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(v: float) -> float:
        return pad_l + (v - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return pad_t + (1 - (v - y0) / (y1 - y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img"><title>{html.escape(title)}</title>',
           f'<text x="{pad_l}" y="16" font-size="13">{html.escape(title)}</text>',
           f'<rect x="{pad_l}" y="{pad_t}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for i in range(5):
        fy, fx = y0 + (y1 - y0) * i / 4, x0 + (x1 - x0) * i / 4
        out.append(f'<line x1="{pad_l}" x2="{pad_l + pw}" y1="{sy(fy):.1f}" y2="{sy(fy):.1f}" '
                   'stroke="#eee"/>')
        out.append(f'<text x="{pad_l - 4}" y="{sy(fy) + 4:.1f}" font-size="10" '
                   f'text-anchor="end">{fy:.3g}</text>')
        out.append(f'<text x="{sx(fx):.1f}" y="{height - pad_b + 14}" font-size="10" '
                   f'text-anchor="middle">{fx:.4g}</text>')
    out.append(f'<text x="{pad_l + pw / 2}" y="{height - 4}" font-size="11" '
               'text-anchor="middle">iteration</text>')
    for i, (k, s) in enumerate(series.items()):
        if not s:
            continue
        color = _COLORS[i % len(_COLORS)]
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{pts}"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="{color}"/>' for x, y in s]
        ly = pad_t + 12 + 16 * i
        out.append(f'<line x1="{pad_l + pw + 8}" x2="{pad_l + pw + 24}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{pad_l + pw + 28}" y="{ly}" font-size="11">{html.escape(k)}</text>')
    out.append("</svg>")
    return "".join(out)


def read_history(path: Path) -> list[dict[str, Any]]:
    """history.jsonl records in iteration order, the last record of each iteration only: a resumed run
    logs again the iterations after its checkpoint, and the curve must not draw a line back to them
    (bad lines are skipped)."""
    if not path.is_file():
        return []
    records: dict[Any, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.pop(rec.get("iter"), None)  # re-inserted: the last one wins
            records[rec.get("iter")] = rec
    return sorted(records.values(), key=lambda r: r.get("iter") if isinstance(r.get("iter"), (int, float))
                  else float("inf"))


def curves_section(history: list[dict[str, Any]]) -> str:
    if not history:
        return '<p class="note">no history.jsonl</p>'
    keys = sorted({k for r in history for k, v in r.items()
                   if isinstance(v, (int, float)) and k not in ("iter", "lr", "s_per_iter")})
    parts = [loss_svg(history, keys, "training losses")]
    if any("lr" in r for r in history):
        parts.append(loss_svg(history, ["lr"], "learning rate"))
    return "\n".join(parts)


def _uint8_image(x: Any) -> np.ndarray:
    from wsss.data.transforms import image01_to_uint8

    return image01_to_uint8(x).cpu().numpy()


def image_rows(run_dir: Path, images: int) -> tuple[list[str], list[list[np.ndarray]], list[str], list[str]]:
    """Columns, rows of uint8 images, row names and class names for the first validation images."""
    import torch

    from wsss.analysis.loading import load_model
    from wsss.data.build import build_dataset
    from wsss.engine.evaluate import predict_maps
    from wsss.methods import build_method

    net, cfg, names = load_model(run_dir / "model" if (run_dir / "model").is_dir() else run_dir)
    dataset = build_dataset(cfg.data, split=str(cfg.eval.get("split") or cfg.data.val_split), train=False)
    class_names = list(names or getattr(dataset, "class_names", []) or [])
    method = build_method(cfg, net)
    scales, flip = [float(s) for s in cfg.eval.scales], bool(cfg.eval.flip)
    rows, row_names, cols = [], [], []
    for idx in range(min(images, len(dataset))):
        sample = dataset[idx]
        x, labels, gt = sample["image"][None], sample["labels"][None].float(), sample["mask"]
        with torch.no_grad():
            maps = predict_maps(method, net, x, labels, scales, flip)
            xp, (h, w) = net.pad(x)
            cam = (method.multiscale_cam(net, xp, scales) * labels[..., None, None])[0, :, :h, :w]
        img = _uint8_image(x[0])
        heat = cam.amax(0) if cam.shape[0] else torch.zeros(h, w)
        refined = method.REFINED_MAP if method.REFINED_MAP in maps else None
        entries = [("image", img), ("ground truth", colorize(gt)), ("CAM", overlay_heatmap(img, heat))]
        if refined is not None:
            entries.append((f"refined CAM ({refined})", colorize(maps[refined][0])))
        if "pseudo" in maps:
            entries.append(("pseudo label", colorize(maps["pseudo"][0])))
        if "seg" in maps:
            entries.append(("prediction (seg)", colorize(maps["seg"][0])))
        cols = [e[0] for e in entries] if len(entries) > len(cols) else cols
        rows.append([e[1] for e in entries])
        row_names.append(str(sample.get("name", idx)))
    return cols, rows, row_names, class_names


def images_section(run_dir: Path, images: int) -> str:
    if images <= 0:
        return '<p class="note">no images requested</p>'
    try:
        cols, rows, names, class_names = image_rows(run_dir, images)
    except (FileNotFoundError, ValueError, KeyError, OSError, RuntimeError) as err:
        return f'<p class="note">image grid unavailable: {html.escape(f"{type(err).__name__}: {err}")}</p>'
    head = "<tr><th>image id</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
    body = []
    for name, row in zip(names, rows):
        cells = "".join(f"<td>{_img(data_uri(im), c)}</td>" for c, im in zip(cols, row))
        body.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    parts = [f'<table class="grid"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>']
    if class_names:
        parts.append(f'<figure>{_img(data_uri(legend(class_names)), "legend")}<figcaption>classes (the light '
                     "colour in pseudo labels is 255 = uncertain / ignored)</figcaption></figure>")
    return "\n".join(parts)


def analysis_section(run_dir: Path) -> str | None:
    """Plots and key numbers of the run's ``analysis.json`` (``<run>/analysis``, or wherever ``wsss
    analyze`` recorded that it wrote), or None when there is none."""
    from wsss.analysis.analyze import find_analysis

    folder = find_analysis(run_dir)
    if folder is None:
        return None
    data = json.loads((folder / "analysis.json").read_text())
    proto = data.get("protocol", {})
    parts = [f'<p class="note">{html.escape(str(data.get("layers_note", "")))}; '
             f'{proto.get("images", "?")} images; read from {html.escape(str(folder))}</p>']
    if "refinement_iou" in proto:
        parts.append(f'<p class="note">refinement mIoU: {html.escape(proto["refinement_iou"])}; '
                     f'oracle mIoU: {html.escape(proto["oracle_iou"])}</p>')
    ref = data.get("refinement", {})
    layers = data.get("layers", [])
    hell = data.get("hellinger", {}).get("mean", [])
    ent = data.get("entropy", {}).get("mean", [])
    rows = []
    for i, layer in enumerate(layers):
        r = ref.get(f"layer_{layer}", {})
        rows.append([f"layer {layer}", float(hell[i]) if i < len(hell) else float("nan"),
                     float(ent[i]) if i < len(ent) else float("nan"), _pct(r.get("best_miou")),
                     float(r.get("best_threshold", float("nan")))])
    for key in ("fused", "cam"):
        if key in ref:
            rows.append([key, float("nan"), float("nan"), _pct(ref[key]["best_miou"]),
                         float(ref[key]["best_threshold"])])
    parts.append(_table(["variant", "Hellinger", "entropy (bits)", "best mIoU (%)", "best threshold"], rows,
                        "analysis"))
    oracle = data.get("oracle")
    if oracle:
        parts.append('<p class="note">Refinement with the model\'s own affinity against the same refinement '
                     "with a perfect affinity from the ground truth:</p>")
        parts.append(_table(["map", "mIoU (%)"], [[k, _pct(v)] for k, v in oracle.get("miou", {}).items()],
                            "oracle"))
    for name, fname in data.get("plots", {}).items():
        png = folder / fname
        if png.is_file():
            caption = PLOT_CAPTIONS.get(name, name.replace("_", " ").capitalize())
            parts.append(f"<figure>{_img(data_uri(png.read_bytes()), caption)}<figcaption>"
                         f"{html.escape(caption)}</figcaption></figure>")
    return "\n".join(parts)


# Captions of the analysis plots (keys of analysis.json "plots"), in words.
PLOT_CAPTIONS = {
    "hellinger": "Over-smoothing: how different the attention rows of each layer are (Hellinger distance)",
    "entropy": "Entropy of the CAM refined by each layer",
    "refinement": "mIoU of the CAM refined by each layer",
    "affinity": "Patch affinity of one example image, per layer",
    "affinity_heads": "Patch affinity of one example image, per layer and attention head",
    "column_mass": "Attention each patch receives (column mass), per layer",
    "layer_cams": "The example image's CAM, and the CAM refined by each layer",
    "affinity_query": "learned affinity of a few query points of the example image",
    "affinity_head_weights": "weight of each attention head in the affinity head",
}
RUN_MARKERS = ("config.yaml", "history.jsonl", "metrics.json", "model/config.json", "checkpoints")


def _config_yaml(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    if path.is_file():
        return path.read_text()
    cfg_json = run_dir / "model" / "config.json"
    if cfg_json.is_file():
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.create(json.loads(cfg_json.read_text()).get("config", {})))
    return "(no config.yaml)"


def _class_names(run_dir: Path) -> list[str] | None:
    cfg_json = run_dir / "model" / "config.json"
    if cfg_json.is_file():
        names = json.loads(cfg_json.read_text()).get("class_names")
        return list(names) if names else None
    return None


def build_html(run_dir: str | Path, images: int = 6) -> str:
    """The report page of ``run_dir`` as a string."""
    run = Path(run_dir)
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    sections = [
        ("config", "Config", f"<pre>{html.escape(_config_yaml(run))}</pre>"),
        ("metrics", "Metrics", metrics_section(metrics, _class_names(run)) if metrics
         else '<p class="note">no metrics.json</p>'),
        ("curves", "Loss curves", curves_section(read_history(run / "history.jsonl"))),
        ("images", "Validation images", images_section(run, images)),
    ]
    analysis = analysis_section(run)
    if analysis is not None:
        sections.append(("analysis", "Layer-wise analysis", analysis))
    body = "\n".join(f'<section id="{sid}"><h2>{title}</h2>\n{content}\n</section>'
                     for sid, title, content in sections)
    title = html.escape(f"wsss report: {run.resolve().name}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}</style></head><body><h1>{title}</h1>\n{body}\n</body></html>\n")


def write_report(run_dir: str | Path, images: int = 6, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (or ``out``) for a run directory and return its path. A folder that is not
    a run (none of config.yaml, history.jsonl, metrics.json, model/, checkpoints/) is a ValueError."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory not found: {run}")
    if not any((run / m).exists() for m in RUN_MARKERS):
        raise ValueError(f"{run} is not a wsss run folder (it holds none of {', '.join(RUN_MARKERS)}); "
                         f"give the out_dir of a `wsss train` run")
    path = Path(out) if out is not None else run / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_html(run_dir, images), encoding="utf-8")
    return path
