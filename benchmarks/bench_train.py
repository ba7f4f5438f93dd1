"""Training-iteration and pseudo-label-path timings of the paper configs, with a per-phase breakdown.

Each case runs in a fresh subprocess (so its peak memory is its own) on fixed random images (seed 0)
with 1-3 present classes and a partly padded image box, with fixed random weights (seed 0), after the
method's warm-up (the full AFA / AReAM path: multi-scale CAM pass, PAR, propagation, affinity labels,
all losses, backward, AdamW step).

Evaluation cases (kind ``eval``) time the model part of ``wsss evaluate`` on one batch: every label
map of the method with the config's eval protocol, plus the multi-scale segmentation map; the table
gives images/s. ``--profile N`` adds, per case, the N ops with the most self CPU time over one
timed run (``torch.profiler``; for training cases one iteration and, separately, one run of the
passes).

For training cases the same process also times the iteration's unavoidable network passes alone
("passes"): one forward + backward of the network (backbone and heads, a trivial loss) plus the
no-grad CAM forwards of every scale with its flipped copy, without attention capture, less the
un-flipped scale-1 images whose forward the training forward already is (``Method.reuses_forward``).
Iterations and passes alternate (``--iters`` of each after one warm-up of each); the table gives
their medians and the median of the per-pair ratios, so load on a shared machine hits both alike.
The iteration is split into phases by timing the method's own functions: ``cam_pass`` (multi-scale
CAM + affinity), ``labels`` (pseudo labels, PAR, propagation, affinity labels), ``forward`` (the
gradient forward), ``loss`` (the rest of ``training_step``), ``backward`` and ``step`` (AdamW).

The passes' arithmetic is counted (``FlopCounterMode``, with formulas for the CPU's fused oneDNN
kernels and flash attention; the gradient forward x3 for its backward) and set against the best rate
of a 2048^3 matmul in the same dtype and threads: "passes at GEMM peak" is the time the passes would
take if every FLOP ran at that rate, a floor no kernel tuning goes below.

    python benchmarks/bench_train.py                                  # every case, CPU
    python benchmarks/bench_train.py --only afa_320 afa_320_bf16      # the acceptance cases
    python benchmarks/bench_train.py --only afa_320 --threads 1 --iters 7
    python benchmarks/bench_train.py --device cuda                    # GPU (synchronised timing)
    python benchmarks/bench_train.py --only afa_320 --profile 25      # where the time goes, per op
    python benchmarks/bench_train.py --only afa_eval_512              # evaluation images/s
    python benchmarks/bench_train.py --only cam_dinov2_224 afa_dinov2_224 aream_dinov2_224 \
        toco_dinov2_224 supervised_dinov2_224 --threads 2              # DINOv2 ViT-S/14, crop 224, batch 8
    python benchmarks/bench_train.py --only afa_dinov2_224_fp32 ...   # the same in fp32 (train.amp=null)

``--threads`` fixes torch's intra-op threads (default: torch's choice, the physical cores); the header
prints the CPU model, whether bf16 is native there, the torch version and the thread count. As in
training (``wsss train``), glibc is told to keep freed memory (``--default-malloc`` to compare).
``--clock cpu`` times with the process CPU time instead of the wall clock: with ``--threads 1`` that
equals the wall time on a quiet machine and is far less disturbed by other processes on a shared one.

On a quiet machine, the acceptance figures (the lead's re-measurement):

    OMP_NUM_THREADS=2 python benchmarks/bench_train.py --only afa_320 afa_320_bf16 --iters 7
    OMP_NUM_THREADS=1 python benchmarks/bench_train.py --only afa_320 afa_320_bf16 --iters 7 --threads 1

Reference points from the official AFA code on this CPU (MiT-B1): 5.1 s per training iteration at
crop 320, batch 2, and 2.9 s per iteration for its pseudo-label path at crop 512.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

# name: (config, overrides, what is timed)
CASES: dict[str, tuple[str, list[str], str]] = {
    "afa_320": ("afa_mit_b1_voc", ["data.crop_size=320", "data.batch_size=2"], "train"),
    "afa_320_bf16": (
        "afa_mit_b1_voc",
        ["data.crop_size=320", "data.batch_size=2", "train.amp=bf16"],
        "train",
    ),
    # the same with torch's fused AdamW kernel (optim.fused=true; off by default)
    "afa_320_fused": ("afa_mit_b1_voc", ["data.crop_size=320", "data.batch_size=2", "optim.fused=true"],
                      "train"),
    "afa_320_bf16_fused": (
        "afa_mit_b1_voc",
        ["data.crop_size=320", "data.batch_size=2", "train.amp=bf16", "optim.fused=true"],
        "train",
    ),
    "afa_512": ("afa_mit_b1_voc", ["data.crop_size=512", "data.batch_size=2"], "train"),
    "afa_pseudo_512": ("afa_mit_b1_voc", ["data.crop_size=512", "data.batch_size=2"], "pseudo"),
    # evaluation (`wsss evaluate`'s per-batch work, eval mode): every AFA map with the eval protocol
    # (scales 1, 0.5, 1.5 + flip) and the multi-scale + flip segmentation map; reported as images/s
    "afa_eval_512": ("afa_mit_b1_voc", ["data.crop_size=512", "data.batch_size=2"], "eval"),
    # AReAM's maps (CAM, refined, its pseudo label) and ToCo's (CAM, auxiliary CAM, seg) the same way
    "aream_eval_448": ("aream_mctformer_deit_s_voc", ["data.crop_size=448", "data.batch_size=2"], "eval"),
    "toco_eval_448": ("toco_vit_b_voc", ["data.batch_size=2"], "eval"),
    "afa_pseudo_512_batched": (
        "afa_mit_b1_voc",
        ["data.crop_size=512", "data.batch_size=2", "afa.crop_to_box=false"],
        "pseudo",
    ),
    "aream_mctformer_224": ("aream_mctformer_deit_s_voc", ["data.batch_size=64"], "train"),
    "aream_conformer_384": ("aream_conformer_s_voc", ["data.batch_size=8"], "train"),
    # the demo's hybrid backbone (EfficientNet-Lite0 + 4 blocks, 16x16 tokens), batch 8 at 128 px
    # DINOv2 ViT-S/14 on real photographs (the *_dinov2_s14_msrc configs: blocks 0-6 frozen), crop 224,
    # batch 8; MSRC's 16 classes + background
    **{f"{m}_dinov2_224": (f"{m}_dinov2_s14_msrc", ["data.batch_size=8", "data.num_classes=17"], "train")
       for m in ("cam", "afa", "aream", "toco", "supervised")},
    # the same in fp32 where the configs' `train.amp: auto` picks bf16 (a CPU with native bf16)
    **{f"{m}_dinov2_224_fp32": (f"{m}_dinov2_s14_msrc", ["data.batch_size=8", "data.num_classes=17",
                                                         "train.amp=null"], "train")
       for m in ("cam", "afa", "aream", "toco", "supervised")},
    "afa_hybrid_demo": ("afa_hybrid_lite0_synthetic", ["data.num_classes=6"], "train"),
    "aream_hybrid_demo": ("aream_hybrid_lite0_synthetic", ["data.num_classes=6"], "train"),
    "toco_hybrid_demo": ("toco_hybrid_lite0_synthetic", ["data.num_classes=6"], "train"),
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


# the official AFA code on the reference CPU (MiT-B1, crop 320, batch 2)
OFFICIAL_S = {case: 5.1 for case in ("afa_320", "afa_320_bf16", "afa_320_fused", "afa_320_bf16_fused")}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set from --clock in the case subprocess
CAM_PASS = ("cam_and_affinity", "multiscale_cam", "aream_cam", "both_cams")
LABEL_FNS = ("pseudo_label", "propagate")
LABEL_GLOBALS = ("par_refine_scores_label", "affinity_labels")


class Phases:
    """Wall time per phase, accumulated by wrapping the method's functions (see the module docstring)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.times: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            self.sync()
            t0 = clock()
            out = fn(*args, **kwargs)
            self.sync()
            self.times[name] += clock() - t0
            return out

        return timed

    def instrument(self, method: Any, net: Any) -> None:
        module = sys.modules[type(method).__module__]
        for attr in CAM_PASS + LABEL_FNS:
            if hasattr(method, attr):
                phase = "cam_pass" if attr in CAM_PASS else "labels"
                setattr(method, attr, self.wrap(phase, getattr(method, attr)))
        for attr in LABEL_GLOBALS:
            if hasattr(module, attr):
                setattr(module, attr, self.wrap("labels", getattr(module, attr)))
        net.forward = self.wrap("forward", net.forward)

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        return self.wrap(name, fn)()


def _label_pass_inputs(method: Any, net: Any, x: Any) -> list:
    """The images the no-grad CAM pass of the labels must still forward: every scale (+ flipped copy),
    less the un-flipped scale-1 rows that the training forward stands in for (``Method.reuses_forward``,
    the rule of ``Method.label_forward``)."""
    reuse, b, inputs = method.reuses_forward(net), x.shape[0], []
    for s in method.scales:
        xs = method.scale_inputs(x, s)
        if reuse and xs.shape[-2:] == x.shape[-2:]:
            xs = xs[b:]
        if xs.shape[0]:
            inputs.append(xs)
    return inputs


def _passes(net: Any, method: Any, batch: dict, cfg: Any, amp: bool) -> None:
    """The unavoidable network work of one iteration: fwd + bwd of the batch and of the method's
    :meth:`grad_views`, and the no-grad multi-scale CAM forwards it cannot take from the first
    (:func:`_label_pass_inputs`)."""
    import torch

    from wsss.methods.base import pass_mode

    x = batch["image"]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = net(x, with_seg=net.seg_head is not None, heads=True)
        loss = sum(lg.float().mean() for lg in out.logits)
        loss = loss + sum(t.float().mean() for t in (out.seg, *out.heads.values()) if t is not None)
        for v in method.grad_views(x):  # e.g. ToCo's extra views: no segmentation head
            loss = loss + sum(lg.float().mean() for lg in net(v, with_seg=False, heads=True).logits)
    loss.backward()
    cast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)
    inputs = _label_pass_inputs(method, net, x)
    with torch.no_grad(), pass_mode(net, method.mode), cast:
        for xs in inputs:
            net.forward_cam(xs)
    net.zero_grad(set_to_none=True)


def _flop_table() -> dict:
    """Flop formulas for the CPU kernels FlopCounterMode does not know: the fused oneDNN linear and
    convolution of the no-grad passes, and the CPU flash attention."""
    import torch
    from torch.utils import flop_counter as fc

    def linear(x_shape, w_shape, *args, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
        return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]

    def conv(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
        return 2 * math.prod(out_shape) * math.prod(w_shape[1:])  # per output: C_in / groups x k x k

    def sdpa(q_shape, k_shape, v_shape, *args, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
        return fc.sdpa_flop_count(q_shape, k_shape, v_shape)

    table = {}
    for namespace, op, formula in (("aten", "_scaled_dot_product_flash_attention_for_cpu", sdpa),
                                   ("mkldnn", "_linear_pointwise", linear),
                                   ("mkldnn", "_convolution_pointwise", conv)):
        try:
            table[getattr(getattr(torch.ops, namespace), op)] = formula
        except (AttributeError, RuntimeError):  # a build without oneDNN: those kernels never run
            pass
    return table


def passes_gflop(net: Any, method: Any, batch: dict, amp: bool) -> float:
    """Floating-point work of :func:`_passes` in GFLOP: the gradient forward counted x3 (forward +
    backward), plus every no-grad CAM forward (matmuls, convolutions and attention; elementwise ops
    are not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from wsss.methods.base import pass_mode

    x = batch["image"]
    table = _flop_table()
    cast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)
    # the gradient forward with autograd on: the same kernels and head paths as in training (some
    # layers fold linear maps when autograd is off); its backward is not run
    with cast, FlopCounterMode(display=False, custom_mapping=table) as grad_fwd:
        net(x, with_seg=net.seg_head is not None, heads=True)
        for v in method.grad_views(x):
            net(v, with_seg=False, heads=True)
    inputs = _label_pass_inputs(method, net, x)
    with torch.no_grad(), cast:
        with FlopCounterMode(display=False, custom_mapping=table) as cams, pass_mode(net, method.mode):
            for xs in inputs:
                net.forward_cam(xs)
    return (3 * grad_fwd.get_total_flops() + cams.get_total_flops()) / 1e9


def gemm_peak_gflops(dtype_name: str, device: Any, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matmul in the run's dtype and threads: what the passes' GEMMs
    could reach at most on this machine."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _pseudo_path(method: Any, net: Any, batch: dict, cfg: Any, cache: dict) -> float:
    """One run of AFA's no-grad pseudo-label path (CAM pass excluded, as in the official figure): seconds."""
    import torch

    from wsss.methods.base import pass_mode
    from wsss.refine.labels import affinity_labels, par_refine_scores_label

    x, labels, box = batch["image"], batch["labels"], batch["img_box"]
    with torch.no_grad(), pass_mode(net, method.mode):
        if "c" not in cache:
            cache["c"] = method.cam_and_affinity(net, x)
        cam, aff, grid = cache["c"]
        t0 = clock()
        image01 = x
        cam = cam * labels[..., None, None]
        par_label = method.pseudo_label(image01, cam, labels, box)
        size = tuple(x.shape[-2:])
        high, low = method.propagate(cam, aff, grid, labels, (method.high, method.low))  # upsampled next
        par_refine_scores_label(
            image01, high, low, labels, method.par, box, crop_to_box=bool(cfg.afa.crop_to_box)
        )
        g = (size[0] // 16, size[1] // 16)
        affinity_labels(par_label, g, method.window(g, x.device))
        return clock() - t0


def _eval_batch(method: Any, net: Any, batch: dict, cfg: Any) -> None:
    """One batch of `wsss evaluate` (model part): every label map, then the multi-scale seg map."""
    import torch

    from wsss.engine.evaluate import predict_maps

    scales, flip = [float(s) for s in cfg.eval.scales], bool(cfg.eval.flip)
    was = net.training
    net.eval()
    with torch.no_grad():  # as `wsss evaluate`: the multi-scale seg map shares the CAM's forwards
        predict_maps(method, net, batch["image"], batch["labels"], scales, flip, msc_seg=True)
    net.train(was)


def _profile(fn: Callable[[], Any], top: int) -> list[tuple[str, float, int]]:
    """(op, self CPU seconds, calls) of the ``top`` ops with the most self CPU time in one ``fn()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in events]


def _setup(name: str, device_name: str) -> tuple:
    """(cfg, net, method, optimiser, batch, bf16 on?) of a case, with fixed seeds."""
    import torch

    from wsss.config import load_config
    from wsss.engine.hardware import resolve_amp
    from wsss.engine.optim import build_optimizer
    from wsss.methods import build_method, build_network

    config, overrides, _ = CASES[name]
    cfg = load_config(config, overrides + ["model.pretrained=null"])
    device = torch.device(device_name)
    torch.manual_seed(0)
    num_classes = int(cfg.data.num_classes)
    net = build_network(cfg, num_classes - 1).to(device).train()
    method = build_method(cfg, net)
    amp = resolve_amp(cfg.train.amp, device) is not None
    return cfg, net, method, build_optimizer(net, cfg.optim), _batch(cfg, num_classes, device), amp


def run_case(name: str, device_name: str, iters: int, profile_top: int = 0) -> dict:
    import torch

    kind = CASES[name][2]
    cfg, net, method, opt, batch, amp = _setup(name, device_name)
    device = torch.device(device_name)
    it = 10**6  # past every warm-up and label switch: the full method path

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    phases = Phases(sync)
    if kind == "train":
        phases.instrument(method, net)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = phases.time("step_fn", lambda: method.training_step(net, batch, it))
        phases.time("backward", loss.backward)
        phases.time("step", opt.step)
        opt.zero_grad(set_to_none=True)

    def timed(fn: Callable[[], Any]) -> float:
        sync()
        t0 = clock()
        fn()
        sync()
        return clock() - t0

    cache: dict = {}
    works = {
        "train": step,
        "pseudo": lambda: _pseudo_path(method, net, batch, cfg, cache),
        "eval": lambda: timed(lambda: _eval_batch(method, net, batch, cfg)),
    }
    work = works[kind]
    work()  # warm-up (allocations, caches)
    if kind == "train":
        _passes(net, method, batch, cfg, amp)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, passes, per_phase = [], [], defaultdict(list)
    for _ in range(iters):
        phases.times.clear()
        phases.on = True
        times.append(timed(step) if kind == "train" else work())
        phases.on = False
        for k, v in phases.times.items():
            per_phase[k].append(v)
        if kind == "train":
            passes.append(timed(lambda: _passes(net, method, batch, cfg, amp)))
    row = _row(name, cfg, amp, times, device_name, rss0)
    if kind == "train":
        row["passes_s"] = statistics.median(passes)
        row["ratio"] = statistics.median(t / p for t, p in zip(times, passes))
        row["phases"] = _phase_medians(per_phase)
        row["passes_gflop"] = passes_gflop(net, method, batch, amp)
        row["gemm_peak_gflops"] = gemm_peak_gflops(row["amp"], device)
    if kind == "eval":
        row["images_per_s"] = int(cfg.data.batch_size) / row["median_s"]
    if profile_top:
        row["profile"] = {kind: _profile(work, profile_top)}
        if kind == "train":
            row["profile"]["passes"] = _profile(lambda: _passes(net, method, batch, cfg, amp), profile_top)
    return row


def _row(name: str, cfg: Any, amp: bool, times: list[float], device_name: str, rss0: float) -> dict:
    import torch

    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device_name.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "case": name,
        "config": CASES[name][0],
        "kind": CASES[name][2],
        "crop": int(cfg.data.crop_size),
        "batch": int(cfg.data.batch_size),
        "amp": "bf16" if amp else "fp32",
        "median_s": statistics.median(times),
        "min_s": min(times),
        "iters_per_s": 1 / statistics.median(times),
        "peak_mib": peak,
        "rss_before_mib": rss0 / 1024,
        "threads": torch.get_num_threads(),
        "device": device_name,
    }


def _phase_medians(per_phase: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds per phase; ``loss`` = training_step minus the phases timed inside it."""
    med = {k: statistics.median(v) for k, v in per_phase.items()}
    inner = sum(med.get(k, 0.0) for k in ("cam_pass", "labels", "forward"))
    out = {k: med.get(k, 0.0) for k in ("cam_pass", "labels", "forward")}
    out["loss"] = max(med.get("step_fn", 0.0) - inner, 0.0)
    out.update(backward=med.get("backward", 0.0), step=med.get("step", 0.0))
    return out


def header(device_name: str) -> str:
    import torch

    from wsss.engine.hardware import bf16_native, cpu_info

    dev = torch.device(device_name)
    what = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_info()[0]
    return (
        f"device: {device_name} ({what}); native bf16: {'yes' if bf16_native(dev) else 'no'}; "
        f"torch {torch.__version__}; threads {torch.get_num_threads()}"
    )


def _clock_line(args: argparse.Namespace) -> str:
    return f"clock: {args.clock}; malloc: {'glibc default' if args.default_malloc else 'freed memory kept'}"


def _report(rows: list[dict]) -> None:
    print(
        "| case | what | crop | batch | dtype | median s/iter | iter/s | passes s | iter / passes "
        "| official / iter | peak MiB |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        passes = f"{r['passes_s']:.3f}" if "passes_s" in r else "-"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        speed = f"{OFFICIAL_S[r['case']] / r['median_s']:.1f}x" if r["case"] in OFFICIAL_S else "-"
        print(
            f"| {r['case']} | {r['kind']} | {r['crop']} | {r['batch']} | {r['amp']} | {r['median_s']:.3f} | "
            f"{r['iters_per_s']:.2f} | {passes} | {ratio} | {speed} | {r['peak_mib']:.0f} |"
        )
    _report_flops(rows)
    phased = [r for r in rows if "phases" in r]
    if phased:
        names = list(phased[0]["phases"])
        print("\nPer-phase medians (s):\n")
        print("| case | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for r in phased:
            print(f"| {r['case']} | " + " | ".join(f"{r['phases'][n]:.3f}" for n in names) + " |")
    for r in rows:
        if "images_per_s" in r:
            what = f"{r['amp']}, {r['crop']} px, batch {r['batch']}"
            print(f"\n{r['case']}: {r['images_per_s']:.3g} images/s ({what})")
    _report_profiles(rows)


def _report_flops(rows: list[dict]) -> None:
    """The passes' arithmetic against the machine's GEMM peak: how far a faster kernel could go."""
    counted = [r for r in rows if "passes_gflop" in r]
    if not counted:
        return
    print("\nArithmetic of the passes (matmuls, convolutions, attention; x3 for the gradient forward):\n")
    print("| case | passes GFLOP | passes GFLOP/s | GEMM peak GFLOP/s | passes at GEMM peak s |")
    print("|---|---:|---:|---:|---:|")
    for r in counted:
        g, peak = r["passes_gflop"], r["gemm_peak_gflops"]
        print(f"| {r['case']} | {g:.0f} | {g / r['passes_s']:.0f} | {peak:.0f} | {g / peak:.2f} |")


def _report_profiles(rows: list[dict]) -> None:
    """Per-op tables of ``--profile`` (self CPU time of one run)."""
    for r in rows:
        for what, ops in r.get("profile", {}).items():
            total = sum(t for _, t, _ in ops)
            print(f"\nProfile of {r['case']} ({what}; the top {len(ops)} ops, {total:.3f} s of self time):\n")
            print("| op | self s | calls |")
            print("|---|---:|---:|")
            for name, t, calls in ops:
                print(f"| {name} | {t:.3f} | {calls} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, choices=sorted(CASES))
    p.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the GPU)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (and passes) per case")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc thresholds alone")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="wall time or process CPU time")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="list the N costliest ops")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        global clock
        clock = CLOCKS[args.clock]
        if not args.default_malloc and args.device == "cpu":
            from wsss.engine.hardware import keep_freed_memory

            keep_freed_memory()
        print(json.dumps(run_case(args.case, args.device, args.iters, args.profile)))
        return
    print(header(args.device))
    print(_clock_line(args))
    extra = ["--clock", args.clock] + (["--threads", str(args.threads)] if args.threads else [])
    extra += ["--default-malloc"] if args.default_malloc else []
    extra += ["--profile", str(args.profile)] if args.profile else []
    rows = []
    for name in args.only or list(CASES):
        cmd = [sys.executable, __file__, "--case", name, "--device", args.device, "--iters", str(args.iters)]
        out = subprocess.run(cmd + extra, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['median_s']:.3f} s", file=sys.stderr)
    _report(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
