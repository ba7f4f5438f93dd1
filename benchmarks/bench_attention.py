"""The attention core on the CPU: PyTorch's fused (flash) kernel against two matmuls.

``wsss.backbones._layers.attend`` picks one of them when no attention is captured. This script times
both, in fp32 and bf16, without autograd (CAM passes) and with a backward (training), on the shapes
the families meet: the hybrid demo (16x16 tokens, +1 class token, batch 8 and 16), ToCo's local crops
(4x4 tokens), ViT-B at 448 and MiT-B1's stage-1 spatially reduced keys at crop 320. The last column
says which path ``attend`` takes.

    python benchmarks/bench_attention.py            # 1 thread, median of 7
    python benchmarks/bench_attention.py --threads 2 --repeats 11
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# name: (batch, heads, queries, keys, head dim)
SHAPES = {
    "hybrid demo, batch 8": (8, 6, 257, 257, 32),
    "hybrid demo, batch 16 (flip)": (16, 6, 257, 257, 32),
    "ToCo local crops (64 x 4x4)": (64, 6, 17, 17, 32),
    "ViT-B 448, batch 2": (2, 12, 785, 785, 64),
    "MiT-B1 stage 1, crop 320, batch 2": (2, 1, 6400, 100, 64),
    "MiT-B1 stage 2, scale 1.5 + flip": (4, 2, 3600, 225, 64),
    "MiT-B1 stage 3, scale 1.5 + flip": (4, 5, 900, 225, 64),
    "MiT-B1 stage 4 (stride 1), scale 1.5 + flip": (4, 8, 900, 900, 64),
    "MiT-B1 stage 4 (stride 1), crop 320, batch 2": (2, 8, 400, 400, 64),
}


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(shape: tuple[int, int, int, int, int], dtype: torch.dtype, grad: bool,
        repeats: int) -> dict[str, float | str]:
    from wsss.backbones._layers import _cpu_bf16_matmuls

    b, h, nq, nk, d = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, nq, d, generator=g).to(dtype).requires_grad_(grad)
    k = torch.randn(b, h, nk, d, generator=g).to(dtype).requires_grad_(grad)
    v = torch.randn(b, h, nk, d, generator=g).to(dtype).requires_grad_(grad)
    scale = d**-0.5
    grad_out = torch.randn(b, h, nq, d, generator=g).to(dtype)

    def fused() -> None:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        if grad:
            out.backward(grad_out)

    def matmuls() -> None:
        out = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        if grad:
            out.backward(grad_out)

    with torch.set_grad_enabled(grad):
        times = {"fused": median_time(fused, repeats), "matmuls": median_time(matmuls, repeats)}
        times["attend uses"] = "matmuls" if _cpu_bf16_matmuls(q, k, v) else "fused"
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} (ms)\n")
    print("| shape (B, heads, Nq, Nk, d) | dtype | autograd | fused | matmuls | attend uses |")
    print("|---|---|---|---:|---:|---|")
    for name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            for grad in (False, True):
                t = run(shape, dtype, grad, args.repeats)
                dt = str(dtype).replace("torch.", "")
                print(f"| {name} {shape} | {dt} | {'fwd+bwd' if grad else 'no-grad'} | "
                      f"{1e3 * t['fused']:.1f} | {1e3 * t['matmuls']:.1f} | {t['attend uses']} |", flush=True)


if __name__ == "__main__":
    main()
