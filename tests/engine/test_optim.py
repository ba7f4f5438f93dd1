"""Parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from wsss.core.param_rules import ParamRule, afa_rules, build_param_groups
from wsss.engine.optim import (
    EpochCosineLR,
    PolyWarmupLR,
    WarmupCosineLR,
    build_optimizer,
    build_scheduler,
)
from wsss.methods.aream import aream_rules, mctformer_rules


class ToyAFA(nn.Module):
    """Names like the real model: backbone (with norms), classifier, AFA head, decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleDict({
            "patch_embed1": nn.ModuleDict({"proj": nn.Conv2d(3, 4, 3), "norm": nn.LayerNorm(4)}),
            "block1": nn.ModuleDict({"norm1": nn.LayerNorm(4), "attn": nn.Linear(4, 4)}),
            "norm1": nn.LayerNorm(4),
        })
        self.classifier = nn.Conv2d(4, 20, 1, bias=False)
        self.attn_proj = nn.Conv2d(8, 1, 1)
        self.decoder = nn.ModuleDict({"linear_fuse": nn.Conv2d(4, 4, 1), "bn": nn.BatchNorm2d(4)})


def names_of(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_afa_groups_faithful():
    m = ToyAFA()
    groups = build_param_groups(m, afa_rules(), base_lr=6e-5, weight_decay=0.01)
    by = {g["name"]: g for g in groups}
    assert names_of(m, by["encoder_norm"]) == sorted(
        ["backbone.patch_embed1.norm.weight", "backbone.patch_embed1.norm.bias",
         "backbone.block1.norm1.weight", "backbone.block1.norm1.bias", "backbone.norm1.weight",
         "backbone.norm1.bias"])
    assert by["encoder_norm"]["lr"] == 0.0 and by["encoder_norm"]["weight_decay"] == 0.0
    assert names_of(m, by["encoder"]) == sorted(
        ["backbone.patch_embed1.proj.weight", "backbone.patch_embed1.proj.bias",
         "backbone.block1.attn.weight", "backbone.block1.attn.bias"])
    assert by["encoder"]["lr"] == pytest.approx(6e-5) and by["encoder"]["weight_decay"] == 0.01
    assert by["heads"]["lr"] == pytest.approx(6e-4) and by["heads"]["weight_decay"] == 0.01
    assert "classifier.weight" in names_of(m, by["heads"]) and "decoder.bn.weight" in names_of(m, by["heads"])
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(m.parameters()))


def test_afa_norm_options():
    m = ToyAFA()
    dropped = build_param_groups(m, afa_rules(norm="drop"), 6e-5, 0.01)
    assert "encoder_norm" not in {g["name"] for g in dropped}
    assert sum(len(g["params"]) for g in dropped) == len(list(m.parameters())) - 6
    trained = {g["name"]: g for g in build_param_groups(m, afa_rules(norm="train"), 6e-5, 0.01)}
    assert trained["encoder_norm"]["lr"] == pytest.approx(6e-5)
    with pytest.raises(ValueError):
        afa_rules(norm="bogus")


def test_frozen_norm_does_not_move():
    torch.manual_seed(0)
    m = ToyAFA()
    opt = build_optimizer(m, {"lr": 1e-2, "weight_decay": 0.01, "param_rules": "afa"})
    before = m.backbone["norm1"].weight.detach().clone()
    sched = PolyWarmupLR(opt, max_iters=10, warmup_iters=2)
    for _ in range(3):
        loss = sum((p ** 2).sum() for p in m.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert torch.equal(m.backbone["norm1"].weight, before)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_update_matches_reference(fused):
    """build_optimizer's AdamW (default and fused) against the update written out: m, v with bias
    correction, decoupled weight decay, per-group lr (the afa rules: x10 heads, lr 0 norms)."""
    torch.manual_seed(1)
    m = ToyAFA()
    opt = build_optimizer(m, {"lr": 1e-2, "weight_decay": 0.05, "param_rules": "afa", "fused": fused})
    assert opt.defaults["fused"] is (True if fused else None)
    params = [p for g in opt.param_groups for p in g["params"]]
    ref = {id(p): (p.detach().double().clone(), torch.zeros_like(p, dtype=torch.float64),
                   torch.zeros_like(p, dtype=torch.float64)) for p in params}
    (b1, b2), eps = opt.defaults["betas"], opt.defaults["eps"]
    for t in range(1, 4):
        for p in params:
            p.grad = torch.randn_like(p)
        for g in opt.param_groups:
            for p in g["params"]:
                w, mom, var = ref[id(p)]
                grad = p.grad.double()
                w.mul_(1 - g["lr"] * g["weight_decay"])
                mom.mul_(b1).add_(grad * (1 - b1))
                var.mul_(b2).add_(grad * grad * (1 - b2))
                m_hat, v_hat = mom / (1 - b1**t), var / (1 - b2**t)
                w.sub_(g["lr"] * m_hat / (v_hat.sqrt() + eps))
        opt.step()
        for p in params:
            torch.testing.assert_close(p.detach().double(), ref[id(p)][0], rtol=1e-5, atol=1e-6)


class ToyConformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.trans_norm = nn.LayerNorm(4)
        self.conv_cls_head = nn.Linear(4, 20)
        self.trans_cls_head = nn.Linear(4, 20)


def test_aream_conformer_groups():
    m = ToyConformer()
    by = {g["name"]: g for g in build_param_groups(m, aream_rules(), 5e-5, 0.01)}
    assert names_of(m, by["head"]) == ["conv_cls_head.weight", "trans_cls_head.weight"]
    assert names_of(m, by["head_no_decay"]) == ["conv_cls_head.bias", "trans_cls_head.bias"]
    assert names_of(m, by["no_decay"]) == ["cls_token", "conv1.bias", "trans_norm.bias", "trans_norm.weight"]
    assert names_of(m, by["decay"]) == ["conv1.weight"]
    assert by["head"]["lr"] == pytest.approx(5e-4) and by["head_no_decay"]["weight_decay"] == 0.0


def test_mctformer_groups():
    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 20, 4))
            self.pos_embed = nn.Parameter(torch.zeros(1, 30, 4))
            self.qkv = nn.Linear(4, 12)

    m = ViT()
    by = {g["name"]: g for g in build_param_groups(m, mctformer_rules(), 6.25e-5, 0.05)}
    assert names_of(m, by["no_decay"]) == ["cls_token", "pos_embed", "qkv.bias"]
    assert names_of(m, by["decay"]) == ["qkv.weight"] and by["decay"]["weight_decay"] == 0.05


def test_rule_forms_and_default_group():
    m = ToyConformer()
    rules = [ParamRule(r"^conv1\.", lr_mult=2.0, name="re"), ParamRule(lambda n, p: p.ndim == 3, name="fn")]
    by = {g["name"]: g for g in build_param_groups(m, rules, 1.0, 0.1)}
    assert names_of(m, by["re"]) == ["conv1.bias", "conv1.weight"] and by["re"]["lr"] == 2.0
    assert names_of(m, by["fn"]) == ["cls_token"]
    assert len(by["default"]["params"]) == 6 and by["default"]["weight_decay"] == 0.1


def _opt(lr=6e-5, mults=(1.0,)):
    params = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr * m, "lr_mult": m} for m in mults]
    return torch.optim.AdamW(params, lr=lr)


def _lrs(opt, sched, n):
    out = []
    for _ in range(n):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_poly_warmup_check_values():
    opt = _opt()
    sched = PolyWarmupLR(opt, max_iters=20000, warmup_iters=1500, warmup_ratio=1e-6, power=1.0)
    want = {0: 6.0e-11, 199: 7.960e-6, 1499: 5.996e-5, 1500: 5.550e-5, 1599: 5.520e-5, 9999: 3.000e-5,
            19999: 3.0e-9}
    for t, v in want.items():
        assert sched.lr_at(6e-5, t) == pytest.approx(v, rel=1e-3), t
    lrs = _lrs(opt, sched, 200)
    assert lrs[199][0] == pytest.approx(7.960e-6, rel=1e-3)
    # reference formula, written out
    for t in (0, 10, 1499, 1500, 5000, 19999, 20000):
        ref = 1 - (1 - t / 1500) * (1 - 1e-6) if t < 1500 else (1 - t / 20000)
        assert sched.factor(t) == pytest.approx(ref, abs=1e-12)


def test_poly_rebase():
    sched = PolyWarmupLR(_opt(), max_iters=20000, warmup_iters=1500, rebase=True)
    assert sched.factor(1500) == pytest.approx(1.0)
    assert sched.factor(10750) == pytest.approx(0.5)
    assert sched.factor(25000) == 0.0


def test_warmup_cosine_matches_official_array():
    total, warm, base, start, final = 50, 10, 5e-5, 1e-6, 1e-6
    ref = list(np.linspace(start, base, warm))
    n = total - warm
    ref += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * s / n)) for s in range(n)]
    opt = _opt(lr=base, mults=(1.0, 10.0))
    sched = WarmupCosineLR(opt, total_iters=total, warmup_iters=warm, start_lr=start, final_lr=final)
    lrs = _lrs(opt, sched, total)
    for t in range(total):
        assert lrs[t][0] == pytest.approx(ref[t], rel=1e-9)
        assert lrs[t][1] == pytest.approx(10 * ref[t], rel=1e-9)  # official lr * lr_scale


def timm_cosine(e, base, epochs=60, warm=5, warm_lr=1e-6, min_lr=1e-5):
    if e < warm:
        return warm_lr + e * (base - warm_lr) / warm
    if e >= epochs:
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * e / epochs))


def test_epoch_cosine_with_official_lag():
    base = 6.25e-5
    opt = _opt(lr=base)
    sched = EpochCosineLR(opt, epochs=60)
    used = _lrs(opt, sched, 62)  # lr during each epoch, stepping after each epoch
    assert used[0][0] == pytest.approx(1e-6) and used[1][0] == pytest.approx(1e-6)
    for e in range(2, 62):
        assert used[e][0] == pytest.approx(timm_cosine(e - 1, base)), e
    opt2 = _opt(lr=base)
    no_lag = _lrs(opt2, EpochCosineLR(opt2, epochs=60, official_lag=False), 62)
    for e in range(62):
        assert no_lag[e][0] == pytest.approx(timm_cosine(e, base)), e


def test_build_scheduler_and_state_dict():
    opt = _opt()
    s = build_scheduler(opt, {"schedule": "poly", "max_iters": 100, "warmup_iters": 10}, iters_per_epoch=5)
    assert isinstance(s, PolyWarmupLR)
    for _ in range(7):
        opt.step()
        s.step()
    opt2 = _opt()
    s2 = build_scheduler(opt2, {"schedule": "poly", "max_iters": 100, "warmup_iters": 10}, iters_per_epoch=5)
    s2.load_state_dict(s.state_dict())
    opt2.step()
    s2.step()
    opt.step()
    s.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    c = build_scheduler(_opt(), {"schedule": "cosine", "epochs": 3, "warmup_epochs": 1}, iters_per_epoch=4)
    assert isinstance(c, WarmupCosineLR) and c.total_iters == 12 and c.warmup_iters == 4
    with pytest.raises(ValueError):
        build_scheduler(_opt(), {"schedule": "step"}, 1)
