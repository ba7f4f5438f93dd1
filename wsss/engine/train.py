"""The training loop: any method on any backbone, one process or many (torchrun + DDP).

Resumable: a checkpoint holds model, optimiser, scheduler, RNG states, the data position and the
iteration, written atomically; ``resume=True`` continues from the newest one so the final weights
equal those of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from wsss.config import to_dict
from wsss.data.build import build_dataset, build_loader
from wsss.engine.checkpoint import (
    check_writable,
    export_model,
    find_latest,
    load_training_state,
    save_training_state,
)  # fmt: skip
from wsss.engine.distributed import (
    DistInfo,
    cleanup,
    convert_sync_bn,
    init_distributed,
    seed_everything,
    set_threads,
)
from wsss.engine.evaluate import evaluate, miou_table
from wsss.engine.hardware import keep_freed_memory, resolve_amp
from wsss.engine.optim import build_optimizer, build_scheduler
from wsss.methods import build_method, build_network
from wsss.model import count_parameters

log = logging.getLogger("wsss")


def _setup_logging(out_dir: Path, main: bool) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    if main:
        fh = logging.FileHandler(out_dir / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)


class _Batches:
    """Infinite batches with an (epoch, position) cursor that a checkpoint can restore."""

    def __init__(self, loader: Any, epoch: int = 0, pos: int = 0) -> None:
        self.loader, self.epoch, self.pos = loader, epoch, pos
        self._it: Iterator | None = None

    def _start(self) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        self._it = iter(self.loader)
        for _ in range(self.pos):  # resume inside an epoch
            next(self._it)

    def next(self) -> dict[str, Any]:
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)  # type: ignore[arg-type]
        except StopIteration:
            self.epoch, self.pos = self.epoch + 1, 0
            self._start()
            batch = next(self._it)  # type: ignore[arg-type]
        self.pos += 1
        return batch


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _writer(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional extra [log]
        return None
    return SummaryWriter(str(out_dir / "tb"))


RUN_FILES = ("checkpoints", "model", "history.jsonl", "metrics.json", "train.log", "tb", "config.yaml",
             "split.json")


def prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: an ``out_dir`` holding a run is continued (``resume``),
    started again (``overwrite``: its run files are removed) or an error, before anything is written.
    ``resume`` without a checkpoint says so (and starts from iteration 0)."""
    found = [n for n in RUN_FILES if (out_dir / n).exists()]
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is an existing file, not a folder")
    check_writable(out_dir)
    if resume:
        if find_latest(out_dir / "checkpoints") is None:
            print(f"wsss train: --resume: no checkpoint in {out_dir / 'checkpoints'}; starting from "
                  f"iteration 0", file=sys.stderr)
        return
    if found and not overwrite:
        raise ValueError(f"out_dir {out_dir} already holds a run ({', '.join(found)}): pass --resume to "
                         f"continue it, --overwrite to start it again, or choose another out_dir")
    for name in found:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def train(cfg: Any, resume: bool = False, stop_after: int | None = None, overwrite: bool = False
          ) -> dict[str, Any]:
    """Train ``cfg`` and return the final metrics. ``stop_after`` ends the run early after that
    many iterations of this call (used to test kill-and-resume). An ``out_dir`` that holds a run
    needs ``resume`` or ``overwrite`` (see :func:`prepare_out_dir`). The data (every evaluation mask
    included) is checked before anything is written; a fresh start that fails before its first
    checkpoint leaves no run behind (:func:`remove_failed_start`), so the same command can run again."""
    set_threads(cfg.get("threads"))
    dist = init_distributed()
    main = dist.rank == 0
    cfg, train_set, val_set = _datasets(cfg)  # before the run folder is written
    out_dir = Path(cfg.out_dir)
    existed = out_dir.exists()
    if main:
        prepare_out_dir(out_dir, resume, overwrite)
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out_dir / "config.yaml")
        _record_split(out_dir, train_set, val_set)
    try:
        return _run(cfg, train_set, val_set, dist, resume, stop_after)
    except BaseException:
        if main and not resume:
            remove_failed_start(out_dir, existed)
        raise


def _record_split(out_dir: Path, train_set: Any, val_set: Any) -> None:
    """``split.json``: the images of each split of a held-out folder split (data.val_fraction)."""
    holdout = getattr(val_set, "holdout", None)
    if holdout is None:
        return
    rec = {"val_fraction": holdout[1], "split_seed": holdout[2], "train": list(train_set.names),
           "val": list(val_set.names)}
    (out_dir / "split.json").write_text(json.dumps(rec, indent=1))


def remove_failed_start(out_dir: Path, existed: bool) -> None:
    """After a fresh start failed: remove its run files when it wrote no checkpoint (nothing could
    be resumed), and ``out_dir`` itself when this start created it and it is left empty."""
    if find_latest(out_dir / "checkpoints") is not None:
        return  # a resumable run: keep it
    for h in list(log.handlers):  # train.log is open
        h.close()
        log.removeHandler(h)
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    if not existed and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()


def _run(cfg: Any, train_set: Any, val_set: Any, dist: DistInfo, resume: bool, stop_after: int | None
         ) -> dict[str, Any]:
    """The training of :func:`train` once its run folder is prepared: the loop and the final evaluation."""
    main, num_classes = dist.rank == 0, int(train_set.num_classes)
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    _setup_logging(out_dir, main)
    seed_everything(int(cfg.seed), dist.rank)
    device = dist.device
    if device.type == "cpu":
        keep_freed_memory()  # no page faults on every large temporary (see engine/hardware.py)
    loader, net, method, optimizer, scheduler = _build_training(cfg, train_set, num_classes, dist)
    max_iters = int(cfg.train.max_iters)
    iters_per_epoch = len(loader) // int(cfg.train.grad_accum)
    per_epoch = str(cfg.optim.schedule) == "epoch_cosine"
    it, epoch, pos = _resume_position(ckpt_dir if resume else None, net, optimizer, scheduler)
    if main:  # the history of this run only: up to the checkpoint resumed from, empty for a fresh start
        truncate_history(out_dir / "history.jsonl", it)
        log.info(
            f"wsss train: method={cfg.method} backbone={cfg.model.backbone} params={count_parameters(net)} "
            f"torch={torch.__version__} device={device} world={dist.world_size} "
            f"python={platform.python_version()} "
            f"batch/proc={cfg.data.batch_size} accum={cfg.train.grad_accum} iters={max_iters}"
        )
    net, model = _wrap_ddp(net, device, dist)
    batches = _Batches(loader, epoch, pos)
    amp = resolve_amp(cfg.train.amp, device) is not None  # fp32 (with a warning) where bf16 is emulated
    writer = _writer(out_dir) if main else None
    bar = tqdm(total=max_iters, initial=it, disable=not main, desc=f"{cfg.method}", dynamic_ncols=True)
    model.train()
    t0, steps = time.time(), 0
    while it < max_iters:
        logs_acc = _accumulate(model, method, batches, device, amp, int(cfg.train.grad_accum), it)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        if not per_epoch or it % iters_per_epoch == 0:
            scheduler.step()
        steps += 1
        bar.update(1)
        if main and (it % int(cfg.train.log_every) == 0 or it == max_iters):
            rec = {"iter": it, "lr": optimizer.param_groups[0]["lr"], **logs_acc,
                   "s_per_iter": (time.time() - t0) / steps}
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs_acc.items()})
            _log_record(rec, out_dir / "history.jsonl", writer)
        if it % int(cfg.train.ckpt_every) == 0 or it == max_iters:
            _checkpoint(ckpt_dir, net, optimizer, scheduler, it, batches, cfg, dist)
        if it % int(cfg.train.eval_every) == 0 and it < max_iters:
            _evaluate_during(cfg, method, net, val_set, num_classes, dist, it, bar)
        if stop_after is not None and steps >= stop_after:
            bar.close()
            return {"stopped_at": it}
    bar.close()
    return _finish(cfg, method, net, val_set, num_classes, dist, writer,
                   {"iterations": it, "s_per_iter": (time.time() - t0) / max(steps, 1),
                    "scored_on": scored_on(train_set, val_set)})


def _finish(cfg: Any, method: Any, net: Any, val_set: Any, num_classes: int, dist: DistInfo, writer: Any,
            stats: dict[str, Any]) -> dict[str, Any]:
    """The final evaluation, the release and metrics (main process), the writer closed."""
    results = _evaluate(cfg, method, net, val_set, num_classes, dist)
    if dist.rank == 0:
        _save_results(cfg, net, results, stats)
        if writer is not None:
            for name, res in results.items():
                if "miou" in res:
                    writer.add_scalar(f"val/{name}_miou", res["miou"], int(stats["iterations"]))
            writer.close()
    cleanup()
    return results


def _build_training(cfg: Any, train_set: Any, num_classes: int, dist: Any) -> tuple[Any, Any, Any, Any, Any]:
    """(loader, net on the device, method, optimizer, scheduler) of a run."""
    loader = build_loader(
        train_set,
        batch_size=int(cfg.data.batch_size),
        train=True,
        num_workers=int(cfg.data.num_workers),
        seed=int(cfg.seed),
        distributed=dist.world_size > 1,
        drop_last=True,
    )
    net = build_network(cfg, num_classes - 1).to(dist.device)
    method = build_method(cfg, net)
    optimizer = build_optimizer(net, cfg.optim)
    iters_per_epoch = len(loader) // int(cfg.train.grad_accum)
    scheduler = build_scheduler(optimizer, cfg.optim, iters_per_epoch=iters_per_epoch)
    return loader, net, method, optimizer, scheduler


def _resume_position(ckpt_dir: Path | None, net: Any, optimizer: Any, scheduler: Any) -> tuple[int, int, int]:
    """(iteration, epoch, position in the epoch) of the newest checkpoint in ``ckpt_dir`` (its states
    loaded into net, optimizer and scheduler), or zeros without one / without ``ckpt_dir``."""
    latest = find_latest(ckpt_dir) if ckpt_dir is not None else None
    if latest is None:
        return 0, 0, 0
    state = load_training_state(latest, net, optimizer, scheduler)
    log.info(f"resumed from {latest} at iteration {int(state['iteration'])}")
    return int(state["iteration"]), int(state["epoch"]), int(state["pos"])


def _wrap_ddp(net: Any, device: torch.device, dist: Any) -> tuple[Any, torch.nn.Module]:
    """(net, the module the training step calls): DDP with SyncBN on CUDA when several processes run."""
    if dist.world_size <= 1:
        return net, net
    net = convert_sync_bn(net, device)
    # Warm-up iterations leave the seg/AFA heads out of the loss.
    model = torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
    )
    return net, model


def _accumulate(model: torch.nn.Module, method: Any, batches: Any, device: torch.device, amp: bool,
                accum: int, it: int) -> dict[str, float]:
    """Forward and backward of ``accum`` batches (gradients summed, each loss / accum); their mean logs."""
    logs_acc: dict[str, float] = {}
    for _ in range(accum):
        batch = _to(batches.next(), device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss, logs = method.training_step(model, batch, it)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at iteration {it}: {logs}")
        (loss / accum).backward()
        for k, v in logs.items():
            logs_acc[k] = logs_acc.get(k, 0.0) + v / accum
    return logs_acc


def _log_record(rec: dict[str, float], history_path: Path, writer: Any) -> None:
    """One training record to the log, ``history.jsonl`` and TensorBoard."""
    log.info(json.dumps(rec))
    with history_path.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    if writer is not None:
        for k, v in rec.items():
            if k != "iter":
                writer.add_scalar(f"train/{k}", v, int(rec["iter"]))


def _evaluate_during(cfg: Any, method: Any, net: Any, val_set: Any, num_classes: int, dist: Any, it: int,
                     bar: Any) -> None:
    """The periodic evaluation: every rank evaluates (DDP), the main one logs and prints the mIoUs."""
    res = _evaluate(cfg, method, net, val_set, num_classes, dist)
    if dist.rank == 0:
        mious = {k: round(v["miou"], 4) for k, v in res.items() if "miou" in v}
        line = f"iter {it} eval: " + json.dumps(mious)
        log.info(line)
        bar.write(line)


def _save_results(cfg: Any, net: torch.nn.Module, results: dict[str, Any], stats: dict[str, Any]) -> None:
    """The release ``model/``, ``metrics.json``, and the final table and the model's path on stdout
    (and in train.log)."""
    out_dir = Path(cfg.out_dir)
    meta = {"config": to_dict(cfg), "num_classes": int(cfg.data.num_classes),
            "class_names": list(cfg.data.class_names)}
    export_model(net, meta, out_dir / "model")
    (out_dir / "metrics.json").write_text(json.dumps({**stats, "eval": results}, indent=2))
    table = (f"final evaluation ({cfg.data.val_split}, {results['_protocol']['images']} images: "
             f"{stats['scored_on']})\n" + miou_table(results) + per_class_line(results, cfg.data.class_names))
    log.info(table)
    print(f"{table}\nmodel saved to {out_dir / 'model'} (metrics: {out_dir / 'metrics.json'})")


def scored_on(train_set: Any, val_set: Any) -> str:
    """What the final evaluation scores, said in its table: a held-out part, separate images, or the
    training images themselves (a folder dataset with one labels file and no ``data.val_fraction``)."""
    holdout = getattr(val_set, "holdout", None)
    if holdout is not None:
        return f"held out of the labels file by data.val_fraction={holdout[1]:g}, split seed {holdout[2]}"
    shared = len(set(val_set.names) & set(train_set.names))
    if shared and shared == len(val_set.names):
        return ("the TRAINING images: nothing is held out (set data.val_fraction or data.val_labels_file "
                "to score images the model has not seen)")
    return f"{shared} of them also training images" if shared else "images not trained on"


def per_class_line(results: dict[str, Any], class_names: Any) -> str:
    """``per-class IoU (<map>): name 12.3, ...`` of the seg map (else the first map), or ''."""
    name = "seg" if "seg" in results else next((k for k in results if not k.startswith("_")), None)
    if name is None or "iou" not in results[name]:
        return ""
    ious = ", ".join(f"{n} {'-' if v != v else f'{100 * v:.1f}'}"
                     for n, v in zip(class_names, results[name]["iou"]))
    return f"\nper-class IoU ({name}): {ious}"


def warn_rare_classes(train_set: Any, fewest: int = 5) -> list[str]:
    """Name (on stderr, before training) the classes that fewer than ``fewest`` training images hold:
    too few to learn them, and their IoU will be noise. Returns those names."""
    counts = train_set.labels.sum(0)  # (K,) images per foreground class
    rare = [f"{n} ({int(c)})" for n, c in zip(train_set.class_names[1:], counts.tolist()) if c < fewest]
    if rare:
        print(f"wsss train: warning: {len(rare)} classes occur in fewer than {fewest} training images: "
              f"{', '.join(rare)}", file=sys.stderr)
    return rare


def _datasets(cfg: Any) -> tuple[Any, Any, Any]:
    """(cfg, train set, val set): both splits read (every mask value checked) and the config extended
    with the classes the dataset gave, so that commands on the run need no overrides."""
    train_set = build_dataset(cfg.data, split=str(cfg.data.train_split), train=True)
    val_set = build_dataset(cfg.data, split=str(cfg.data.val_split), train=False)
    c = int(train_set.num_classes)
    if int(val_set.num_classes) != c:
        raise ValueError(f"the train split has {c} classes but the val split {val_set.num_classes}")
    # the masks the evaluations read, checked now: a bad value must not surface after the training
    max_images = cfg.eval.max_images
    val_set.check_masks(None if max_images is None else int(max_images))
    warn_rare_classes(train_set)
    cfg = OmegaConf.merge(cfg, {"data": {"num_classes": c, "class_names": list(train_set.class_names)}})
    return cfg, train_set, val_set


def truncate_history(path: Path, iteration: int) -> None:
    """Drop the records after ``iteration`` (logged by a killed run past its last checkpoint, or by an
    earlier run in the same folder when training starts afresh at 0), so that no iteration is written
    twice. Atomic: the file is replaced, never half-written."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if isinstance(rec, dict) and int(rec.get("iter", 0)) <= iteration:
            keep.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)


def _checkpoint(
    ckpt_dir: Path,
    net: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    it: int,
    batches: _Batches,
    cfg: Any,
    dist: DistInfo,
) -> None:
    if dist.rank != 0:
        return
    save_training_state(
        ckpt_dir,
        net,
        optimizer,
        scheduler,
        it,
        extra={"epoch": batches.epoch, "pos": batches.pos, "config": to_dict(cfg)},
        keep_last=int(cfg.train.keep_ckpts),
    )


def _evaluate(
    cfg: Any, method: Any, net: Any, val_set: Any, num_classes: int, dist: DistInfo
) -> dict[str, Any]:
    return evaluate(
        method,
        net,
        val_set,
        num_classes,
        dist.device,
        scales=list(cfg.eval.scales),
        flip=bool(cfg.eval.flip),
        max_images=cfg.eval.max_images,
        rank=dist.rank,
        world_size=dist.world_size,
        batch_size=int(cfg.eval.batch_size),
        num_workers=int(cfg.eval.num_workers),
    )
