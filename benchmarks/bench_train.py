"""Training-iteration and pseudo-label-path timings of the paper configs.

Each case runs in a fresh subprocess (so its peak memory is its own) on random images with 1-3
present classes and a partly padded image box, after the method's warm-up (the full AFA / AReAM
path: multi-scale CAM pass, PAR, propagation, affinity labels, all losses, backward, AdamW step).

    python benchmarks/bench_train.py                  # every case, CPU
    python benchmarks/bench_train.py --only afa_320   # one case
    python benchmarks/bench_train.py --device cuda

Reference points from the official AFA code on this CPU (MiT-B1): 5.1 s per training iteration at
crop 320, batch 2, and 2.9 s per iteration for its pseudo-label path at crop 512.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

# name: (config, overrides, what is timed)
CASES: dict[str, tuple[str, list[str], str]] = {
    "afa_320": ("afa_mit_b1_voc", ["data.crop_size=320", "data.batch_size=2"], "train"),
    "afa_320_bf16": (
        "afa_mit_b1_voc",
        ["data.crop_size=320", "data.batch_size=2", "train.amp=bf16"],
        "train",
    ),
    "afa_512": ("afa_mit_b1_voc", ["data.crop_size=512", "data.batch_size=2"], "train"),
    "afa_pseudo_512": ("afa_mit_b1_voc", ["data.crop_size=512", "data.batch_size=2"], "pseudo"),
    "afa_pseudo_512_batched": (
        "afa_mit_b1_voc",
        ["data.crop_size=512", "data.batch_size=2", "afa.crop_to_box=false"],
        "pseudo",
    ),
    "aream_mctformer_224": ("aream_mctformer_deit_s_voc", ["data.batch_size=64"], "train"),
    "aream_conformer_384": ("aream_conformer_s_voc", ["data.batch_size=8"], "train"),
}


def _batch(cfg, num_classes: int, device):  # noqa: ANN001
    import torch

    g = torch.Generator().manual_seed(0)
    b, s, k = int(cfg.data.batch_size), int(cfg.data.crop_size), num_classes - 1
    labels = torch.zeros(b, k)
    for i in range(b):
        labels[i, torch.randperm(k, generator=g)[: 1 + i % 3]] = 1
    box = torch.tensor([[0, s, 0, s]] * b)
    box[0] = torch.tensor([0, s * 3 // 4, s // 8, s])  # a padded crop: the box is smaller
    return {
        "image": torch.randn(b, 3, s, s, generator=g).to(device),
        "labels": labels.to(device),
        "img_box": box.to(device),
        "mask": torch.full((b, s, s), 255, dtype=torch.long, device=device),
    }


def run_case(name: str, device_name: str, iters: int) -> dict:
    import torch

    from wsss.config import load_config
    from wsss.engine.optim import build_optimizer
    from wsss.methods import build_method
    from wsss.methods.base import pass_mode
    from wsss.model import build_model

    config, overrides, kind = CASES[name]
    cfg = load_config(config, overrides + ["model.pretrained=null"])
    device = torch.device(device_name)
    num_classes = int(cfg.data.num_classes)
    net = build_model(cfg.model, num_classes - 1, str(cfg.method)).to(device)
    method = build_method(cfg, net)
    opt = build_optimizer(net, cfg.optim)
    batch = _batch(cfg, num_classes, device)
    it = 10**6  # past every warm-up and label switch: the full method path
    net.train()

    def step() -> None:
        if kind == "train":
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.amp == "bf16"):
                loss, _ = method.training_step(net, batch, it)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:  # the no-grad pseudo-label path of AFA (CAM pass excluded, as in the official figure)
            from wsss.data.transforms import denormalize

            x, labels, box = batch["image"], batch["labels"], batch["img_box"]
            with torch.no_grad(), pass_mode(net, method.mode):
                cam, aff, grid = _cam_cache.setdefault("c", method.cam_and_affinity(net, x))
                t0 = time.perf_counter()
                image01 = denormalize(x)
                cam = cam * labels[..., None, None]
                par_label = method.pseudo_label(image01, cam, labels, box)
                size = tuple(x.shape[-2:])
                from wsss.methods.base import resize
                from wsss.refine.labels import affinity_labels, par_refine_scores_label

                high = resize(method.propagate(cam, aff, grid, labels, method.high), size)
                low = resize(method.propagate(cam, aff, grid, labels, method.low), size)
                par_refine_scores_label(
                    image01, high, low, labels, method.par, box, crop_to_box=bool(cfg.afa.crop_to_box)
                )
                g = (size[0] // 16, size[1] // 16)
                affinity_labels(par_label, g, method.window(g, x.device))
                _times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    _cam_cache: dict = {}
    _times: list[float] = []
    step()  # warm-up (allocations, caches)
    _times.clear()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if kind == "pseudo":
        times = _times
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "case": name,
        "config": config,
        "kind": kind,
        "crop": int(cfg.data.crop_size),
        "batch": int(cfg.data.batch_size),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "iters_per_s": 1 / statistics.median(times),
        "peak_mib": peak,
        "rss_before_mib": rss0 / 1024,
        "threads": torch.get_num_threads(),
        "device": device_name,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, choices=sorted(CASES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.device, args.iters)))
        return
    rows = []
    for name in args.only or list(CASES):
        out = subprocess.run(
            [sys.executable, __file__, "--case", name, "--device", args.device, "--iters", str(args.iters)],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{name}: {r['median_s']:.3f} s", file=sys.stderr)
    print("| case | config | what | crop | batch | median s/iter | iter/s | peak MiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['config']} | {r['kind']} | {r['crop']} | {r['batch']} | "
            f"{r['median_s']:.3f} | {r['iters_per_s']:.2f} | {r['peak_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
