"""GPU checks (``pytest -m cuda``; skipped without CUDA): a training step on CUDA against the CPU
result, a bf16 autocast step, the SDPA path against explicit attention, DDP over nccl in one
process, and peak-memory reporting. ``benchmarks/gpu_check.sh`` runs them, then the GPU timings."""

from __future__ import annotations

import copy
import socket
import sys
from pathlib import Path

import pytest
import torch

from wsss.backbones._layers import attend
from wsss.config import load_config
from wsss.engine.hardware import bf16_native, resolve_amp
from wsss.methods import build_method, build_network

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]
# deterministic passes: no DropPath / Dropout draws (their RNG streams differ between devices)
DETERMINISTIC = [
    "train.cam_pass_mode=eval",
    "model.backbone_kwargs.drop_path_rate=0.0",
    "model.seg_head.dropout=0.0",
]


@pytest.fixture(autouse=True)
def _full_precision():
    """fp32 matmuls on CUDA (no TF32), so CUDA and CPU agree to float rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _setup(config: str = "afa_mit_tiny_synthetic", size: int = 64):
    cfg = load_config(config, DETERMINISTIC)
    torch.manual_seed(0)
    k = int(cfg.data.num_classes or 6) - 1  # null (from the dataset): the synthetic 5 classes + background
    net = build_network(cfg, k).train()
    g = torch.Generator().manual_seed(1)
    labels = torch.zeros(2, k)
    labels[0, 1] = labels[1, 2] = labels[1, 3] = 1
    batch = {
        "image": torch.randn(2, 3, size, size, generator=g),
        "labels": labels,
        "img_box": torch.tensor([[0, size, 0, size], [0, size * 3 // 4, 8, size]]),
    }
    return cfg, net, batch


def _step(cfg, net, batch, device: str, amp: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    net = net.to(device)
    method = build_method(cfg, net)
    b = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        loss, _ = method.training_step(net, b, 10**6)
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in net.named_parameters() if p.grad is not None}
    return loss.detach().cpu(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _assert_grads_close(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float) -> None:
    """Every parameter's gradient within ``tol`` (relative), except those whose reference gradient is
    rounding noise (e.g. biases before a BatchNorm, exactly 0 in exact arithmetic)."""
    assert set(grads) == set(ref)
    total = torch.cat([g.flatten() for g in ref.values()]).norm()
    for name, g in ref.items():
        if g.norm() > 1e-6 * total:
            assert _rel(grads[name], g) < tol, name


def test_training_step_on_cuda_matches_cpu() -> None:
    cfg, net, batch = _setup()
    loss_cpu, g_cpu = _step(cfg, copy.deepcopy(net), batch, "cpu")
    loss_gpu, g_gpu = _step(cfg, copy.deepcopy(net), batch, "cuda")
    torch.testing.assert_close(loss_gpu, loss_cpu, rtol=1e-3, atol=1e-5)
    _assert_grads_close(g_gpu, g_cpu, 5e-3)


def test_bf16_autocast_step_is_finite_and_close() -> None:
    if not bf16_native("cuda"):
        pytest.skip("this GPU has no native bf16")
    assert resolve_amp("bf16", "cuda") is torch.bfloat16
    cfg, net, batch = _setup()
    loss32, _ = _step(cfg, copy.deepcopy(net), batch, "cuda")
    loss16, grads = _step(cfg, copy.deepcopy(net), batch, "cuda", amp=True)
    assert torch.isfinite(loss16) and all(torch.isfinite(g).all() for g in grads.values())
    assert abs(float(loss16) - float(loss32)) < 0.05 * abs(float(loss32)) + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_matches_explicit_attention(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not bf16_native("cuda"):
        pytest.skip("this GPU has no native bf16")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 400, 64, device="cuda", generator=g, dtype=dtype) for _ in range(3))
    fused, none = attend(q, k, v, 64**-0.5, capture=False)
    explicit, logits = attend(q, k, v, 64**-0.5, capture=True)
    assert none is None and logits.shape == (2, 8, 400, 400)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused.float(), explicit.float(), rtol=tol, atol=tol)
    ref = (q.double() @ k.double().transpose(-2, -1) * 64**-0.5).softmax(-1) @ v.double()
    torch.testing.assert_close(fused.double(), ref, rtol=tol * 10, atol=tol * 10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_nccl_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """World size 1 through env:// with nccl: DDP gives the gradients of the plain model."""
    import torch.distributed as dist

    from wsss.engine.distributed import convert_sync_bn, init_distributed

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("nccl", init_method="env://", rank=0, world_size=1)
    try:
        info = init_distributed("cuda")  # finds the group
        assert info.world_size == 1 and info.device.type == "cuda" and dist.get_backend() == "nccl"
        cfg, net, batch = _setup()
        _, g_ref = _step(cfg, copy.deepcopy(net), batch, "cuda")
        model = convert_sync_bn(copy.deepcopy(net).cuda(), info.device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0], find_unused_parameters=True)
        method = build_method(cfg, model)
        b = {k: v.cuda() for k, v in batch.items()}
        loss, _ = method.training_step(ddp, b, 10**6)
        loss.backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
        _assert_grads_close(grads, g_ref, 1e-3)
    finally:
        dist.destroy_process_group()


def test_peak_memory_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, net, batch = _setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _step(cfg, net, batch, "cuda")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    assert peak > torch.cuda.memory_allocated() > 0
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_train
    finally:
        sys.path.pop(0)
    import wsss.methods.afa as afa_mod

    for name in bench_train.LABEL_GLOBALS:  # the benchmark wraps these for its phase timer: restore them
        monkeypatch.setattr(afa_mod, name, getattr(afa_mod, name))
    row = bench_train.run_case("afa_320", "cuda", 1)
    assert row["device"] == "cuda" and row["peak_mib"] > 100 and row["passes_s"] > 0
    assert set(row["phases"]) == {"cam_pass", "labels", "forward", "loss", "backward", "step"}
