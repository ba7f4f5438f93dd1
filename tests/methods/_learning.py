"""Does a method learn? A short, seeded training of one method on a tiny synthetic set: its logged
losses (``history.jsonl``, one record per iteration) and the mIoU of one of its label maps before
(the network as ``wsss.engine.train`` builds it, untrained) and after training.

Used by the ``test_<method>_learns`` tests of ``tests/methods/``; ``python -m tests.methods._learning``
prints the same measurements over several seeds (how those tests' margins were chosen), e.g.
``python -m tests.methods._learning cam_mit_tiny_synthetic cam 120 0 1 2 pseudo.warmup_iters=60 backbone=v``.
The untrained mIoU is that of the very network ``train`` starts from (same seed, same build order;
checked once by comparing state dicts), evaluated as ``train``'s final evaluation is.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsss.config import load_config
from wsss.engine.distributed import seed_everything
from wsss.engine.evaluate import evaluate
from wsss.engine.train import _datasets, train
from wsss.methods import build_network

# The set every learning test trains on (generate_synthetic's own seed: the set is fixed, the
# training seed varies): 48 px keeps an iteration of the from-scratch MiT / ViT at a few tens of ms;
# 160 images so that 120 iterations of 8 do not memorise them (32 did, without better CAMs).
LEARN_SET = {"num_train": 160, "num_val": 16, "size": 48, "seed": 0, "num_classes": 6}

# ToCo's backbone (its config's model.backbone and backbone_kwargs): 8 px patches, 6 x 6 tokens on the
# 48 px set. From scratch it learns a CAM in 120 iterations far better than the MiT of the other
# synthetic configs.
_TOCO_MODEL = load_config("toco_vit_micro_synthetic").model
VIT_MICRO = {"name": str(_TOCO_MODEL.backbone), "kwargs": dict(_TOCO_MODEL.backbone_kwargs)}


def make_learning_set(root: Path) -> Path:
    from wsss.data.synthetic import generate_synthetic

    generate_synthetic(root, **LEARN_SET)
    return root


def learning_overrides(root: Path, out_dir: Path, iters: int, seed: int, **extra: Any) -> list[str]:
    """A synthetic config shrunk to ``iters`` iterations on the learning set, one record per iteration."""
    size = LEARN_SET["size"]
    base = {
        "seed": seed,
        "data.root": root,
        "out_dir": out_dir,
        "data.size": size,
        "data.crop_size": size,
        "data.num_train": LEARN_SET["num_train"],
        "data.num_val": LEARN_SET["num_val"],
        "data.batch_size": 8,
        "data.num_workers": 0,
        "threads": 1,
        "train.max_iters": iters,
        "train.log_every": 1,
        "train.ckpt_every": 100000,  # the final checkpoint only
        "train.eval_every": 100000,
        "optim.warmup_iters": max(1, iters // 10),
        "eval.max_images": LEARN_SET["num_val"],
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@dataclass
class Learning:
    """What a short training did: per logged loss the mean of its first and of its last ``k``
    records, and the mIoU of the map before and after training."""

    map_name: str
    before: float
    after: float
    losses: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0
    maps: dict[str, float] = field(default_factory=dict)  # every map's mIoU after training

    def loss_ratio(self, name: str) -> float:
        first, last = self.losses[name]
        return last / first


def score(cfg: Any, net: Any, val_set: Any, map_name: str, pairs: bool = False) -> dict[str, float]:
    """mIoU of ``map_name`` of ``net`` on ``val_set`` as the final evaluation of ``train`` scores it (the
    config's eval scales, flip and image count), and ``best``: the mIoU of its (refined) CAM at the best
    background threshold of the sweep. ``pairs`` (a method that learns an affinity): also ``pair_gap``,
    its mean affinity on same-class token pairs minus that on different-class ones (``wsss analyze``'s
    pair agreement with the ground truth)."""
    from wsss.analysis.oracle import oracle_quality
    from wsss.methods import build_method

    method = build_method(cfg, net)
    res = evaluate(method, net, val_set, int(cfg.data.num_classes), next(net.parameters()).device,
                   scales=list(cfg.eval.scales), flip=bool(cfg.eval.flip), max_images=cfg.eval.max_images,
                   maps=[map_name], sweep=True)
    best = res.get("_sweep", {}).get("best_miou", float("nan"))
    out = {"miou": float(res[map_name]["miou"]), "best": float(best)}
    if pairs:
        agree = oracle_quality(method, net, val_set, int(cfg.data.num_classes), cfg.eval.max_images)["pairs"]
        out["pair_gap"] = agree["mean_same_class"] - agree["mean_different_class"]
    return out


def run_learning(config: str, map_name: str, root: Path, out_dir: Path, iters: int, seed: int = 0,
                 k: int | None = None, backbone: dict[str, Any] | None = None, pairs: bool = False,
                 **extra: Any) -> Learning:
    """Evaluate the untrained network, train ``iters`` iterations, compare (``k``: records averaged at
    each end of a loss's history, a quarter of its records by default; ``backbone``: ``model.backbone``
    and its ``backbone_kwargs`` replacing the config's, which a dotted override would merge; ``pairs``:
    the learned affinity's ``pair_gap`` before and after, in ``maps``)."""
    from wsss.engine.runs import load_run

    t0 = time.time()
    cfg = load_config(config, learning_overrides(root, out_dir, iters, seed, **extra))
    if backbone is not None:
        cfg.model.backbone, cfg.model.backbone_kwargs = backbone["name"], backbone["kwargs"]
    cfg, _train_set, val_set = _datasets(cfg)
    seed_everything(int(cfg.seed), 0)  # the network train(cfg) starts from (as its _run seeds and builds it)
    before = score(cfg, build_network(cfg, int(cfg.data.num_classes) - 1), val_set, map_name, pairs)
    train(cfg)
    after = score(cfg, load_run(out_dir / "model")[0], val_set, map_name, pairs)
    history = [json.loads(line) for line in (out_dir / "history.jsonl").read_text().splitlines()]
    losses = {}
    for name in history[-1]:
        if name in ("iter", "lr", "s_per_iter"):
            continue
        values = [h[name] for h in history if name in h]  # a loss that starts after a warm-up: from there
        n = k or max(1, len(values) // 4)
        if len(values) >= 2 * n:
            losses[name] = (sum(values[:n]) / n, sum(values[-n:]) / n)
    maps = {f"{name}_{when}": v for when, res in (("before", before), ("after", after))
            for name, v in res.items() if name != "miou"}
    return Learning(map_name, before["miou"], after["miou"], losses, time.time() - t0, maps)


def assert_learns(config: str, map_name: str, root: Path, out_dir: Path, iters: int, losses: dict[str, float],
                  gain: float | None, best_gain: float | None = None, pair_gain: float | None = None,
                  **extra: Any) -> Learning:
    """Train ``config`` ``iters`` iterations (seed 0) and assert that every loss named in ``losses`` fell
    (mean of its last k records at most that fraction of the mean of its first k), and that the mIoU of
    ``map_name`` rose by at least ``gain`` over the untrained network's (``best_gain``: the same for the
    mIoU of the CAM the method sweeps at its best background threshold; ``pair_gain``: the same for the
    learned affinity's ``pair_gap`` on the validation images; None: not asserted)."""
    r = run_learning(config, map_name, root, out_dir, iters, 0, pairs=pair_gain is not None, **extra)
    report = f"{config}: {r}"
    for name, ratio in losses.items():
        assert name in r.losses, f"no {name} loss logged: {report}"
        assert r.loss_ratio(name) <= ratio, f"{name} loss did not fall to {ratio:.0%}: {report}"
    if gain is not None:
        assert r.after >= r.before + gain, f"{map_name} mIoU did not rise by {gain}: {report}"
    if best_gain is not None:
        before, after = r.maps["best_before"], r.maps["best_after"]
        assert after >= before + best_gain, f"swept CAM mIoU did not rise by {best_gain}: {report}"
    if pair_gain is not None:
        before, after = r.maps["pair_gap_before"], r.maps["pair_gap_after"]
        assert after >= before + pair_gain, f"affinity pair gap did not rise by {pair_gain}: {report}"
    return r


if __name__ == "__main__":  # python -m tests.methods._learning CONFIG MAP ITERS SEEDS... [key=value ...]
    import tempfile

    config, map_name, iters = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seeds = [int(a) for a in sys.argv[4:] if "=" not in a]
    extra: dict[str, Any] = dict(a.split("=", 1) for a in sys.argv[4:] if "=" in a)
    pairs = extra.pop("pairs", "0") == "1"  # pairs=1: the learned affinity's pair gap too
    if "backbone" in extra:  # backbone=vit_micro: the ViT micro of the ToCo config
        extra["backbone"] = VIT_MICRO
    with tempfile.TemporaryDirectory() as tmp:
        root = make_learning_set(Path(tmp) / "data")
        for seed in seeds:
            r = run_learning(config, map_name, root, Path(tmp) / f"run{seed}", iters, seed, pairs=pairs,
                             **extra)
            losses = " ".join(f"{n} {a:.3f}->{b:.3f} ({b / a:.2f})" for n, (a, b) in r.losses.items())
            print(f"{config} seed {seed}: {map_name} {r.before:.3f} -> {r.after:.3f} "
                  f"({r.after - r.before:+.3f}); {losses}; {r.seconds:.1f} s", flush=True)
            print("   after:", " ".join(f"{n} {v:.3f}" for n, v in r.maps.items()), flush=True)
