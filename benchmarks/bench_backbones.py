"""Forward and forward+backward timings of the registered backbone families.

Each (backbone, input size, attention capture) case runs in a fresh process, so the peak memory it
reports is its own: peak resident memory above the memory held after building the model (CPU), or
``torch.cuda.max_memory_allocated`` (CUDA). Times are the median of ``--repeats`` runs after one
warm-up. With capture, the backward pass also goes through the captured logits (as AFA's affinity
loss does).

    python benchmarks/bench_backbones.py            # paper sizes
    python benchmarks/bench_backbones.py --quick    # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Case:
    backbone: str
    size: int
    layers: tuple[int, ...]
    batch: int = 2


def paper_cases(quick: bool) -> list[Case]:
    """MiT-B1 at 512 and 320 (AFA, layers 6 and 7); MCTformer-V2-S at 224 and Conformer-S at 384 (AReAM);
    the hybrid (frozen EfficientNet-Lite0 + 4 blocks) at the demo's 128 px, batch 8, and at 320."""
    every = tuple(range(12))
    hybrid = (0, 1, 2, 3)
    if quick:
        return [
            Case("mit_b1", 128, (6, 7)),
            Case("mctformer_v2_small", 112, every),
            Case("conformer_s", 128, every),
            Case("hybrid_lite0_tiny", 128, hybrid),
        ]
    return [
        Case("mit_b1", 512, (6, 7)),
        Case("mit_b1", 320, (6, 7)),
        Case("mctformer_v2_small", 224, every),
        Case("conformer_s", 384, every),
        Case("hybrid_lite0_tiny", 128, hybrid, batch=8),
        Case("hybrid_lite0_tiny", 320, hybrid),
    ]


def _registry():
    """BACKBONES after importing every family that exists (others are optional)."""
    import importlib

    from wsss.core.registry import BACKBONES

    families = ("mit", "vit", "conformer", "hybrid")
    for mod in (f"wsss.backbones.{f}" for f in families):
        try:
            importlib.import_module(mod)
        except Exception as err:  # a family still being written must not stop the others
            print(f"# skipped {mod}: {type(err).__name__}: {err}", file=sys.stderr)
    return BACKBONES


def _build(name: str):
    reg = _registry()
    try:
        return reg.build(name)
    except TypeError:  # families whose builder needs the class count (MCTformer class tokens)
        return reg.build(name, num_classes=20)


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak(device: torch.device) -> float:
    """Reset the peak-memory counter; return the baseline it is measured against (MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # Linux: "5" resets VmHWM (the peak RSS) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _rss_mib("VmRSS")


def _peak(device: torch.device, base: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - base
    return _rss_mib("VmHWM") - base


def _step(model, x, layers, backward: bool) -> None:
    if backward:
        out = model(x, attn_layers=layers)
        loss = sum(f.float().mean() for f in out.features) + sum(a.float().mean() for a in out.attn.values())
        loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(x, attn_layers=layers)


def run_case(
    case: Case, capture: bool, backward: bool, device: str, repeats: int, threads: int | None = None
) -> tuple[float, float, float]:
    """Median and min milliseconds and peak memory (MiB) of one case, in the calling process."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    model = _build(case.backbone).to(dev).train(backward)
    x = torch.randn(case.batch, 3, case.size, case.size, device=dev)
    layers = case.layers if capture else ()
    base = _reset_peak(dev)  # before the warm-up: freed activations may stay mapped afterwards
    _step(model, x, layers, backward)  # warm-up
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        _step(model, x, layers, backward)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), _peak(dev, base)


def _child(args: tuple, queue) -> None:
    try:
        queue.put(("ok", run_case(*args)))
    except Exception as err:
        queue.put(("error", f"{type(err).__name__}: {err}"))


def run_isolated(case: Case, capture: bool, backward: bool, device: str, repeats: int, threads: int | None):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=((case, capture, backward, device, repeats, threads), queue))
    proc.start()
    _, value = queue.get()
    proc.join()
    return value  # (median ms, min ms, MiB) or an error message


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small input sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5, quick 3)")
    parser.add_argument(
        "--only", nargs="*", default=None, help="backbone names to run (default: all registered)"
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    registered = set(_registry().names())
    mem = "peak alloc MiB" if args.device.startswith("cuda") else "peak RSS MiB above model"
    threads = args.threads or torch.get_num_threads()
    print(
        f"device: {args.device}, torch {torch.__version__}, threads {threads}, median (min) of {repeats} runs"
    )
    print()
    print(f"| backbone | input | batch | captured layers | fwd ms | fwd {mem} | fwd+bwd ms | fwd+bwd {mem} |")
    print("|---|---|---|---|---|---|---|---|")
    for case in paper_cases(args.quick):
        if case.backbone not in registered or (args.only and case.backbone not in args.only):
            print(
                f"| {case.backbone} | {case.size} | {case.batch} | not registered or not selected | | | | |"
            )
            continue
        for capture in (False, True):
            cells = []
            for backward in (False, True):
                res = run_isolated(case, capture, backward, args.device, repeats, args.threads)
                cells += (
                    [f"{res[0]:.1f} ({res[1]:.1f})", f"{res[2]:.0f}"] if isinstance(res, tuple) else [res, ""]
                )
            layers = ",".join(map(str, case.layers)) if capture else "none (SDPA)"
            print(
                f"| {case.backbone} | {case.size} | {case.batch} | {layers} | " + " | ".join(cells) + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
