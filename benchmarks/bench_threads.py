"""Torch CPU threads (``--threads`` / config ``threads``): seconds per AFA training iteration of the demo
config and per PAR call, for each thread count, in one process.

The thread counts alternate round by round (1, 2, 1, 2, ...) so that a change in the machine's load
touches every count alike; medians over the rounds. Run it on an idle machine and on a busy one
(e.g. next to another training run) to see what the advice in README.md and docs/performance.md rests on.

    python benchmarks/bench_threads.py                    # threads 1 and 2, 5 rounds
    python benchmarks/bench_threads.py --threads 1 2 4 --rounds 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench_train import _batch


def _cases() -> dict:
    """name -> a no-argument callable timing one step (a training iteration, a PAR call)."""
    import torch

    from wsss.config import load_config
    from wsss.engine.optim import build_optimizer
    from wsss.methods import build_method, build_network

    cfg = load_config("afa_mit_tiny_synthetic", ["data.num_classes=6"])
    torch.manual_seed(0)
    net = build_network(cfg, 5).train()
    method = build_method(cfg, net)
    opt = build_optimizer(net, cfg.optim)
    batch = _batch(cfg, 6, torch.device("cpu"))
    image01 = torch.rand(8, 3, 128, 128)
    probs = torch.rand(8, 6, 64, 64).softmax(1)

    def train_step() -> None:
        loss, _ = method.training_step(net, batch, 10**6)  # past the warm-up: the full AFA path
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def par() -> None:
        with torch.no_grad():
            method.par(image01, probs)

    return {"afa training iteration (batch 8, 128 px)": train_step, "PAR (batch 8, 128 px)": par}


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    cases = _cases()
    times: dict[tuple[str, int], list[float]] = {}
    for fn in cases.values():  # warm-up: allocations, caches
        fn()
    for _ in range(args.rounds):
        for n in args.threads:
            torch.set_num_threads(n)
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times.setdefault((name, n), []).append(time.perf_counter() - t0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, 1-minute load {load:.1f}, {args.rounds} rounds, median s (min-max)")
    print("| step | " + " | ".join(f"{n} thread{'s' * (n > 1)}" for n in args.threads) + " |")
    print("|---|" + "---:|" * len(args.threads))
    for name in cases:
        cells = []
        for n in args.threads:
            t = times[(name, n)]
            cells.append(f"{statistics.median(t):.3f} ({min(t):.2f}-{max(t):.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
