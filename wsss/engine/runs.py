"""Trained wsss runs: load a release dir (``model/``), a run dir or a training checkpoint.

The engine's commands and the user-facing predictor and hub all load runs through here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from wsss.config import DataConfig, defaults, upgrade_config
from wsss.core.weights import CheckpointError, load_into
from wsss.methods import build_network
from wsss.model import WSSSNet


def config_from_dict(d: Mapping[str, Any]) -> DictConfig:
    """A full config from a stored config dict (merged over the defaults; ``model.pretrained`` cleared,
    since the stored weights replace the ImageNet ones and that file need not exist here)."""
    cfg = OmegaConf.merge(defaults(), upgrade_config(OmegaConf.create(dict(d)), "a stored config"))
    cfg.model.pretrained = None
    return cfg  # type: ignore[return-value]


def default_class_names(cfg: Any, num_classes: int) -> list[str]:
    """Class names (background first) of a config without stored names."""
    data = DataConfig.of(cfg.data)
    names = data.class_names
    if names:
        names = list(names)
        return names if len(names) == num_classes else ["background", *names]
    kind = str(data.type)
    if kind == "synthetic":
        from wsss.data.synthetic import class_names_for

        return class_names_for(num_classes)
    from wsss.data.coco import COCO_CLASSES
    from wsss.data.voc import VOC_CLASSES

    for known in (VOC_CLASSES, COCO_CLASSES):
        if len(known) == num_classes:
            return list(known)
    return ["background"] + [f"class{i}" for i in range(1, num_classes)]


def is_release_dir(path: Path) -> bool:
    """A wsss release directory: model.safetensors + a config.json written by ``export_model``."""
    if not (path.is_dir() and (path / "model.safetensors").is_file() and (path / "config.json").is_file()):
        return False
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "config" in meta and "num_classes" in meta


def _build_and_load(cfg: DictConfig, num_classes: int, sd: Mapping[str, Tensor], source: str) -> WSSSNet:
    model_cfg = OmegaConf.merge(cfg.model, {"pretrained": None})  # the trained weights replace them
    net = build_network(cfg, num_classes - 1, model_cfg)
    load_into(net, sd, source=source)  # strict: another architecture names its keys
    return net.eval()


def _training_state(path: Path) -> Mapping[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"could not read checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(f"{path} is not a wsss training checkpoint (no 'model' state)")
    return state


def _load_checkpoint_file(path: Path, cfg_file: Path | None = None) -> tuple[WSSSNet, DictConfig, list[str]]:
    from wsss.core.weights import strip_prefix

    state = _training_state(path)
    stored = (state.get("extra") or {}).get("config")
    if stored is not None:
        cfg = config_from_dict(stored)
    else:
        cand = cfg_file or path.parent.parent / "config.yaml"
        if not cand.is_file():
            raise CheckpointError(
                f"{path} holds no config (extra['config']) and no config.yaml was found at {cand}"
            )
        cfg = config_from_dict(OmegaConf.to_container(OmegaConf.load(cand), resolve=True))  # type: ignore[arg-type]
    c = int(cfg.data.num_classes)
    net = _build_and_load(cfg, c, strip_prefix(state["model"], "module."), str(path))
    return net, cfg, default_class_names(cfg, c)


CALIBRATION_FILE = "calibration.json"  # `wsss calibrate`'s record, in the run directory


def read_calibration(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``calibration.json`` of the run of ``path`` (see :func:`run_dir_of`), or None."""
    f = run_dir_of(path) / CALIBRATION_FILE
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the calibration {f}: {err}") from err
    if not isinstance(rec, dict) or not isinstance(rec.get("values"), dict):
        raise CheckpointError(f"{f} is not a wsss calibration (no 'values')")
    return {**rec, "file": str(f)}


def load_run(path: str | os.PathLike) -> tuple[WSSSNet, DictConfig, list[str]]:
    """Load a trained model: a release dir, a run dir or a training checkpoint file, with the values
    that ``wsss calibrate`` chose for its run (:func:`read_calibration`) set in its config.

    Returns ``(net in eval mode on the CPU, full config, class names with background first)``.
    Raises :class:`CheckpointError` when the weights do not fit the architecture of the config.
    """
    net, cfg, names = _load_run(path)
    rec = read_calibration(path)
    for key, value in (rec or {}).get("values", {}).items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return net, cfg, names


def _load_run(path: str | os.PathLike) -> tuple[WSSSNet, DictConfig, list[str]]:
    """:func:`load_run` without the calibration."""
    from wsss.engine.checkpoint import find_latest, import_model_state

    p = Path(path)
    if p.is_file() and p.name == "model.safetensors":
        p = p.parent
    if is_release_dir(p):
        sd, meta = import_model_state(p)
        cfg = config_from_dict(meta["config"])
        c = int(meta["num_classes"])
        names = list(meta.get("class_names") or default_class_names(cfg, c))
        return _build_and_load(cfg, c, sd, str(p / "model.safetensors")), cfg, names
    if p.is_dir():
        if is_release_dir(p / "model"):
            return _load_run(p / "model")
        latest = find_latest(p / "checkpoints") or find_latest(p)
        if latest is None:
            raise FileNotFoundError(
                f"{p} is neither a wsss release directory (model.safetensors + config.json) nor a run "
                f"directory with model/ or checkpoints/ckpt_*.pt"
            )
        run_cfg = p / "config.yaml"
        return _load_checkpoint_file(latest, run_cfg if run_cfg.is_file() else None)
    if p.is_file():
        return _load_checkpoint_file(p)
    raise FileNotFoundError(f"no such file or directory: {p}")


def is_wsss_artifact(path: Path) -> bool:
    """A release dir, a run dir or a wsss training checkpoint (a dict with 'model' and 'extra')."""
    if path.is_dir():
        return is_release_dir(path) or is_release_dir(path / "model") or (path / "checkpoints").is_dir()
    if path.name == "model.safetensors" and is_release_dir(path.parent):
        return True
    if path.suffix in (".pt", ".pth") and path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return False
        return isinstance(state, Mapping) and "model" in state and "extra" in state and "iteration" in state
    return False


def run_dir_of(checkpoint: str | os.PathLike) -> Path:
    """The run directory of a release dir (``<run>/model``), run dir or checkpoint file."""
    p = Path(checkpoint).resolve()
    if p.is_file():
        p = p.parent
    if p.name in ("model", "checkpoints"):
        return p.parent
    return p


def check_classes(net: Any, dataset: Any, checkpoint: str | os.PathLike, split: str) -> None:
    """One-line error when the checkpoint's class count differs from the dataset's."""
    model_c, data_c = int(net.num_classes) + 1, int(dataset.num_classes)
    if model_c != data_c:
        where = getattr(dataset, "root", None) or getattr(dataset, "image_dir", "the dataset")
        raise ValueError(
            f"checkpoint {checkpoint} predicts {model_c} classes (background included) but the dataset "
            f"{where} (split {split}) has {data_c}: use the data the model was trained on "
            f"(its run's config, without data overrides) or a model trained for {data_c} classes"
        )


def open_run(config: str | os.PathLike | None, checkpoint: str | os.PathLike, overrides: Sequence[str],
           device: str | None) -> tuple[Any, Any, Any, list[str], torch.device]:
    """(cfg, net on device, method, class names, device): the checkpoint's weights and its run's config
    (data, classes, method, model), with ``config``'s other settings and the overrides on top
    (:func:`wsss.config.run_config`)."""
    from wsss.config import run_config, split_config_arg
    from wsss.engine.distributed import resolve_device, set_threads
    from wsss.methods import build_method

    config, overrides = split_config_arg(None if config is None else str(config), overrides)
    dev = resolve_device(device)  # a bad device: before loading
    net, run_cfg, names = load_run(checkpoint)
    cfg = run_config(run_cfg, config, overrides)
    set_threads(cfg.get("threads"))
    if dev.type == "cpu":
        from wsss.engine.hardware import keep_freed_memory

        keep_freed_memory()  # large per-image temporaries: no fresh page faults for each
    net = net.to(dev).eval()
    return cfg, net, build_method(cfg, net), names, dev
