"""Native-bf16 detection and the train.amp fallback (hardware faked by monkeypatching)."""

from __future__ import annotations

import warnings

import pytest
import torch

from wsss.engine import hardware


def _fake_cpu(monkeypatch: pytest.MonkeyPatch, flags: set[str]) -> None:
    fake = ("Fake CPU 9000", frozenset(flags))
    monkeypatch.setattr(hardware, "cpu_info", lambda path="/proc/cpuinfo": fake)
    monkeypatch.setattr(hardware, "_warned", set())


def test_cpu_info_parses_x86_and_arm(tmp_path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\nCPU part\t: 0xd40\n")
    assert hardware.cpu_info(x86) == ("Intel Xeon", frozenset({"fpu", "avx2", "amx_bf16"}))
    assert "bf16" in hardware.cpu_info(arm)[1]
    name, flags = hardware.cpu_info(tmp_path / "missing")
    assert flags == frozenset() and isinstance(name, str)


@pytest.mark.parametrize(
    ("flags", "native"),
    [({"avx2", "avx512f"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True), (set(), False)],
)
def test_bf16_native_on_cpu_follows_the_flags(monkeypatch, flags, native) -> None:
    _fake_cpu(monkeypatch, flags)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert hardware.bf16_native("cpu") is native


def test_bf16_native_on_cuda_asks_torch(monkeypatch) -> None:
    seen = {}

    def supported(including_emulation: bool = True) -> bool:
        seen["emulation"] = including_emulation
        return False

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert hardware.bf16_native("cuda") is False and seen["emulation"] is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert hardware.bf16_native("cuda:0") is True


def test_resolve_amp_falls_back_with_one_warning(monkeypatch) -> None:
    _fake_cpu(monkeypatch, {"avx2"})
    with pytest.warns(RuntimeWarning, match=r"15x slower.*fp32") as rec:
        assert hardware.resolve_amp("bf16", "cpu") is None
    assert "Fake CPU 9000" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call stays silent
        assert hardware.resolve_amp("bf16", "cpu") is None


def test_resolve_amp_uses_native_bf16_silently(monkeypatch) -> None:
    _fake_cpu(monkeypatch, {"avx512_bf16"})
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hardware.resolve_amp("bf16", "cpu") is torch.bfloat16
        assert hardware.resolve_amp(None, "cpu") is None


def test_resolve_amp_auto_is_bf16_only_where_native(monkeypatch) -> None:
    """train.amp=auto: bf16 on a CPU with native bf16, fp32 without a warning elsewhere."""
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fake_cpu(monkeypatch, {"avx2", "amx_bf16"})
        assert hardware.resolve_amp("auto", "cpu") is torch.bfloat16
        _fake_cpu(monkeypatch, {"avx2"})
        assert hardware.resolve_amp("auto", "cpu") is None
        assert hardware.resolve_amp("auto", "cpu") is None


def test_resolve_amp_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="train.amp.*'fp16'"):
        hardware.resolve_amp("fp16", "cpu")


def test_training_falls_back_to_fp32_where_bf16_is_emulated(monkeypatch, tiny_synthetic, tmp_path) -> None:
    """``wsss train`` with train.amp=bf16 on a CPU without native bf16: one warning, no bf16 autocast."""
    from tests.conftest import tiny_overrides
    from wsss.config import load_config
    from wsss.engine import train as train_mod

    _fake_cpu(monkeypatch, {"avx2"})
    seen = []
    real = torch.autocast

    def spy(*args, **kwargs):
        seen.append(kwargs.get("enabled", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod.torch, "autocast", spy)
    ov = tiny_overrides(tiny_synthetic, tmp_path / "run", **{"train.max_iters": 1, "train.amp": "bf16"})
    cfg = load_config("cam_mit_tiny_synthetic", ov)
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        train_mod.train(cfg, stop_after=1)
    assert seen and not any(seen)
