"""Peak memory and time of ``Segmenter.predict`` on ordinary photo sizes.

Each case runs in a fresh subprocess (so its peak memory is its own): the AFA demo model
(``afa_mit_tiny_synthetic``, built from the config; memory does not depend on the weights, so no
training is needed) predicts one random photo of 0.5, 2 or 12 MP at full resolution, or with
``--max-size`` (long side of the copy that is predicted; the results are mapped back).

    python benchmarks/bench_predict.py                       # 0.5, 2 and 12 MP, CPU
    python benchmarks/bench_predict.py --only 2mp --device cuda
    python benchmarks/bench_predict.py --max-size 2048       # what `wsss predict` does by default
    python benchmarks/bench_predict.py --config afa_hybrid_lite0_synthetic   # the hybrid demo backbone

Peak memory is the process's peak resident set (CPU) or ``torch.cuda.max_memory_allocated``
(CUDA); "model" is the resident set after building the model, before predicting.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

# name: (height, width)
CASES = {"0.5mp": (540, 960), "2mp": (1080, 1920), "12mp": (3000, 4000)}
CONFIG = "afa_mit_tiny_synthetic"  # the scratch demo's AFA model (MiT, full attention in its last stage)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(name: str, device: str, max_size: int | None, config: str = CONFIG) -> dict:
    import numpy as np
    import torch

    from wsss.api.predictor import Segmenter
    from wsss.config import load_config
    from wsss.data.synthetic import class_names_for
    from wsss.methods import build_network

    torch.manual_seed(0)
    cfg = load_config(config)
    c = int(cfg.data.num_classes or 6)  # null (from the dataset): the synthetic 5 classes + background
    seg = Segmenter(build_network(cfg, c - 1), cfg, class_names_for(c), device=device)
    seg.net.cam_head.classifier.weight.data.fill_(0.05)  # every class scored present: the worst case
    h, w = CASES[name]
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    model_mb = _rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pred = seg.predict(image, max_size=max_size)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert pred.mask.shape == (h, w)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"case": name, "config": config, "pixels_mp": h * w / 1e6, "max_size": max_size, "device": device,
            "model_mb": round(model_mb), "peak_mb": round(peak), "seconds": round(seconds, 2),
            "present": pred.present()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(CASES), default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-size", type=int, default=None)
    ap.add_argument("--config", default=CONFIG, help="an AFA config (the model is built, not trained)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.device, args.max_size, args.config)))
        return
    print(f"config: {args.config}")
    print("| case | MP | max-size | device | model MB | peak MB | MB per MP | seconds |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for name in args.only or list(CASES):
        cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--config", args.config]
        if args.max_size:
            cmd += ["--max-size", str(args.max_size)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"| {name} | failed: {res.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        per_mp = (r["peak_mb"] - r["model_mb"]) / r["pixels_mp"]
        print(f"| {name} | {r['pixels_mp']:.2f} | {r['max_size'] or '-'} | {r['device']} | {r['model_mb']} | "
              f"{r['peak_mb']} | {per_mp:.0f} | {r['seconds']} |", flush=True)


if __name__ == "__main__":
    main()
