"""Training-state checkpoints (atomic, resumable, weights_only) and the release format; dist helpers."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from wsss.core.weights import CheckpointError
from wsss.engine import checkpoint as ck
from wsss.engine.distributed import (
    all_reduce_sum,
    broadcast_object,
    convert_sync_bn,
    init_distributed,
    is_main,
    seed_everything,
)
from wsss.engine.optim import PolyWarmupLR


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = PolyWarmupLR(opt, max_iters=50, warmup_iters=5)
    return model, opt, sched


def _train(model, opt, sched, n=3):
    for _ in range(n):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]  # noqa: NPY002


def test_round_trip_resumes_exactly(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched)
    seed_everything(123, rank=0)
    extra = {"epoch": 1, "batch_in_epoch": 7, "config": {"lr": 1e-3, "name": "x"}}
    path = ck.save_training_state(tmp_path, model, opt, sched, iteration=3, extra=extra)
    assert path.name == "ckpt_00000003.pt"
    want = _draws()
    _train(model, opt, sched, 2)
    want_weights = [p.detach().clone() for p in model.parameters()]
    want_lr = opt.param_groups[0]["lr"]

    model2, opt2, sched2 = _setup(seed=99)
    seed_everything(7, rank=0)  # scramble every RNG
    extra = ck.load_training_state(path, model2, opt2, sched2)
    assert extra == {"iteration": 3, "epoch": 1, "batch_in_epoch": 7, "config": {"lr": 1e-3, "name": "x"}}
    assert _draws() == want  # torch, numpy and python RNGs continue identically
    _train(model2, opt2, sched2, 2)
    assert opt2.param_groups[0]["lr"] == want_lr
    for a, b in zip(model2.parameters(), want_weights):
        assert torch.equal(a, b)


def test_weights_only_readable(tmp_path):
    model, opt, sched = _setup()
    p = ck.save_training_state(tmp_path / "c.pt", model, opt, sched, iteration=0)
    torch.load(p, weights_only=True)  # must not raise: no pickled objects


def test_ddp_prefix_and_unwrap(tmp_path):
    model, opt, sched = _setup()

    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": sd, "iteration": 5}, tmp_path / "ckpt_00000005.pt")
    fresh, _, _ = _setup(seed=3)
    assert ck.load_training_state(tmp_path, fresh)["iteration"] == 5
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert ck.unwrap(model) is model


def test_atomic_interrupted_save_keeps_good_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _setup()
    good = ck.save_training_state(tmp_path / "last.pt", model, opt, sched, iteration=1)
    good_bytes = good.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial garbage")  # a half-written file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_training_state(tmp_path / "last.pt", model, opt, sched, iteration=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert good.read_bytes() == good_bytes
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # the temp file was removed
    assert ck.load_training_state(good, _setup()[0])["iteration"] == 1


def test_stray_temp_file_never_listed_and_keep_last(tmp_path):
    model, opt, sched = _setup()
    (tmp_path / ".ckpt_00000099.pt.abc.tmp").write_bytes(b"partial")
    for it in (10, 20, 30, 40):
        ck.save_training_state(tmp_path, model, opt, sched, iteration=it, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt_00000030.pt", "ckpt_00000040.pt"]
    assert ck.find_latest(tmp_path).name == "ckpt_00000040.pt"
    assert ck.find_latest(tmp_path / "none") is None


def test_corrupt_checkpoint_error(tmp_path):
    bad = tmp_path / "ckpt_00000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        ck.load_training_state(bad, _setup()[0])


def test_export_import_release(tmp_path):
    model, _, _ = _setup()
    out = ck.export_model(model, {"backbone": "mit_b1", "num_classes": 21}, tmp_path / "rel")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    sd, cfg = ck.import_model_state(out)
    assert cfg == {"backbone": "mit_b1", "num_classes": 21}
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v)
    with pytest.raises(FileNotFoundError):
        ck.import_model_state(tmp_path / "missing")


def test_distributed_single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.device.type) == (0, 1, "cpu") and info.is_main and is_main()
    t = torch.ones(2)
    assert all_reduce_sum(t) is t and broadcast_object({"a": 1}) == {"a": 1}
    m = nn.Sequential(nn.BatchNorm2d(2))
    assert isinstance(convert_sync_bn(m, "cpu")[0], nn.BatchNorm2d)  # SyncBN raises on CPU modules


def test_seed_everything_per_rank():
    assert seed_everything(5, rank=0) == 5 and seed_everything(5, rank=3) == 8
    seed_everything(5, rank=1)
    a = torch.rand(2)
    seed_everything(5, rank=2)
    b = torch.rand(2)
    assert not torch.equal(a, b)
