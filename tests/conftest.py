"""Shared fixtures: a tiny synthetic dataset generated once per session."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory):
    """A 64 px synthetic VOC-layout set: 8 train and 3 val images, 5 classes + background."""
    from wsss.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, num_train=8, num_val=3, size=64, seed=0, num_classes=6)
    return root


def tiny_overrides(root, out_dir, **extra) -> list[str]:
    """Overrides that shrink a synthetic config to a few seconds of training."""
    base = {
        "data.root": root,
        "out_dir": out_dir,
        "data.crop_size": 64,
        "data.size": 64,
        "data.num_train": 8,
        "data.num_val": 3,
        "data.batch_size": 2,
        "data.num_workers": 0,
        "train.max_iters": 4,
        "train.log_every": 1,
        "train.ckpt_every": 1,
        "eval.max_images": 2,
        "pseudo.warmup_iters": 0,
        "afa.switch_iter": 2,
        "aream.warmup_iters": 0,
        "cam.scales": [1.0, 0.5],
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def ref_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_blocks(sd: dict[str, torch.Tensor], z: torch.Tensor, num_layers: int, heads: int):
    """Slow pre-norm transformer blocks (``blocks.{l}.norm1 / attn.qkv / attn.proj / norm2 / mlp``,
    LayerNorm eps 1e-6) over tokens z (B, N, D): logits by a loop over (head, i, j).
    Returns (tokens (B, N, D) before any final norm, {layer: scaled logits (B, heads, N, N)})."""
    b, n, d = z.shape
    hd = d // heads
    logits_all = {}
    for layer in range(num_layers):
        pre = f"blocks.{layer}."
        y = F.layer_norm(z, (d,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], 1e-6)
        qkv = y @ sd[pre + "attn.qkv.weight"].T + sd[pre + "attn.qkv.bias"]
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        logits = torch.zeros(b, heads, n, n)
        for m in range(heads):
            sl = slice(m * hd, (m + 1) * hd)
            for i in range(n):
                for j in range(n):
                    logits[:, m, i, j] = (q[:, i, sl] * k[:, j, sl]).sum(-1) / math.sqrt(hd)
        logits_all[layer] = logits
        att = logits.softmax(-1)
        o = torch.cat([att[:, m] @ v[..., m * hd : (m + 1) * hd] for m in range(heads)], dim=-1)
        z = z + o @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
        y = F.layer_norm(z, (d,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], 1e-6)
        y = ref_gelu(y @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
        z = z + y @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
    return z, logits_all
