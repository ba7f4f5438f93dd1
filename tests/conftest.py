"""Shared fixtures: a tiny synthetic dataset generated once per session."""

from __future__ import annotations

import os

import pytest
import torch

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
        "afa.warmup_iters": 0,
        "afa.switch_iter": 2,
        "aream.warmup_iters": 0,
        "cam.scales": [1.0, 0.5],
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
