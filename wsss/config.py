"""YAML configs with dotted command-line overrides.

A config file may name a ``base`` file (relative to itself) that it extends. Values are merged
as: built-in defaults <- base chain <- file <- overrides (``train.max_iters=100``). Unknown keys
in an override are an error (typos must not be silently ignored).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from wsss.core.registry import PARAM_RULES
from wsss.core.schema import Rule, default_rule
from wsss.methods import DEFAULT_METHOD, DEFAULT_PARAM_RULES, config_sections, import_methods, method_names
from wsss.ops.cam_fusion import DEFAULT_FUSE, FUSE_PRESETS

# The shipped configs: package data of an installed wsss; in the repository wsss/configs links to configs/.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: train.amp values besides null: "bf16" (warns where bf16 is emulated), "auto" (bf16 where native)
AMP_CHOICES = ("bf16", "auto")

# Every generic key a config may set, with the defaults of the official AFA VOC recipe where one exists.
# Each method's own section (its keys, defaults and rules) is declared by the method
# (``wsss.methods``: ``Method.Config``) and added by :func:`defaults`.
DEFAULTS: dict[str, Any] = {
    "name": "run",
    "method": DEFAULT_METHOD,  # a registered method (wsss.methods)
    "seed": 1,
    "out_dir": "runs/${name}",
    "threads": None,  # torch CPU threads; null: torch's default (one per core). Busy machine: 1

    "model": {
        "backbone": "mit_b1",
        "backbone_kwargs": {},
        "pretrained": None,
        "cam_head": {"kernel_size": 1, "bias": False, "pooling": "gmp"},
        "token_head": None,  # null | mean | linear
        "seg_head": {"enabled": True, "embed_dim": 256, "dropout": 0.1},
    },
    "data": {  # read by wsss.data.build.build_dataset / build_transform
        "type": "voc",  # voc | coco | folder | synthetic
        "root": "data/VOC2012",
        "train_split": "train_aug",
        "val_split": "val",
        "num_classes": None,  # including background; null: from the dataset (VOC 21, COCO 81, names file)
        "class_names": None,
        "pseudo_dir": None,  # second stage: train on these pseudo-label PNGs (255 = ignore) instead of masks
        "labels_file": None,
        "train_labels_file": None,
        "val_labels_file": None,
        # folder: hold this fraction of labels_file out as the val split (seeded by split_seed)
        "val_fraction": None,
        "split_seed": 0,
        "image_dir": None,
        "train_image_dir": None,
        "val_image_dir": None,
        "mask_dir": "auto",
        "crop_size": 512,
        "scale_range": [0.5, 2.0],
        "interpolation": "bilinear",
        "flip": True,
        "color_jitter": False,
        "resized_crop": False,
        "cat_max_ratio": None,
        "rand_augment": None,  # timm spec, e.g. "rand-m9-mstd0.5-inc1" (MCTformer recipe)
        "random_erasing": 0.0,  # probability of erasing one box (MCTformer recipe: 0.25)
        "batch_size": 2,
        "num_workers": 2,
        "seed": 0,
        # synthetic set (generated into root on first use)
        "num_train": 400,
        "num_val": 100,
        "size": 128,
        "synthetic_seed": 0,
    },
    "optim": {  # read by wsss.engine.optim.build_optimizer / build_scheduler
        "param_rules": DEFAULT_PARAM_RULES,  # a preset of wsss.core.registry.PARAM_RULES (an official recipe)
        "param_rules_args": {},  # e.g. {norm: train} to train AFA's frozen encoder LayerNorms
        "lr": 6.0e-5,
        "weight_decay": 0.01,
        "betas": [0.9, 0.999],
        "eps": 1.0e-8,
        # torch's fused AdamW kernel (CPU / CUDA): the same update in one pass, ~3.5x faster per step
        # for MiT-B1 on CPU; rounding differs from the default multi-tensor path in the last bit
        "fused": False,
        "schedule": "poly",  # poly (per step) | cosine (per step) | epoch_cosine (per epoch)
        "max_iters": "${train.max_iters}",
        "warmup_iters": 1500,
        "warmup_ratio": 1.0e-6,
        "power": 1.0,
        "rebase": False,
        "epochs": None,
        "warmup_epochs": 1,
        "start_lr": 1.0e-6,
        "final_lr": 1.0e-6,
        "warmup_lr": 1.0e-6,
        "min_lr": 1.0e-5,
        "official_lag": True,
    },
    "train": {
        "max_iters": 20000,
        "grad_accum": 1,
        "log_every": 50,
        "eval_every": 2000,
        "ckpt_every": 2000,
        "keep_ckpts": 2,
        "amp": None,  # null | bf16 | auto (bf16 where native, else fp32: wsss.engine.hardware)
        "cam_pass_mode": "train",  # train (official) | eval
    },
    "cam": {
        "scales": [1.0, 0.5, 1.5],
        "flip": True,
        "fuse": DEFAULT_FUSE,  # a rule of wsss.ops.cam_fusion.FUSE_PRESETS
        "high": 0.55,
        "low": 0.35,
    },
    "par": {"dilations": [1, 2, 4, 8, 12, 24], "num_iter": 10, "w1": 0.3, "w2": 0.01, "downscale": 2},
    "eval": {
        "split": "val",
        "scales": [1.0],
        "flip": False,
        "bkg_score": 0.45,
        "aff_bkg_score": 0.35,
        # predict on a model without a seg head: a class is in the image when sigmoid(logit) passes
        # this (``wsss calibrate`` chooses it on the training labels, per class where that is better)
        "presence": 0.5,
        "presence_per_class": None,  # null or one threshold per foreground class
        "crf": False,
        "max_images": None,
        "sweep": False,  # kept for old runs' configs; true is an error naming `wsss calibrate`
        "batch_size": 8,  # images of one size evaluated together
        "num_workers": 0,  # DataLoader workers reading the evaluation images
    },
}


# Keys that moved (old dotted key -> new): a config file, a stored run's config or an override that
# names the old key sets the new one, so configs and runs written before the move keep their values.
MOVED_KEYS = {
    # the warm-up and seg weight of the cam baseline and AFA: the section every method shares
    "afa.warmup_iters": "pseudo.warmup_iters",
    "afa.seg_weight": "pseudo.seg_weight",
}


def upgrade_config(cfg: DictConfig, where: str) -> DictConfig:
    """Move the keys of :data:`MOVED_KEYS` that ``cfg`` (a config file, or a stored run's config) sets to
    their new place, in place; setting a key under both names is a ``ValueError``."""
    for old, new in MOVED_KEYS.items():
        section, key = old.rsplit(".", 1)
        sub = cfg.get(section)
        if not isinstance(sub, DictConfig) or key not in sub:
            continue
        if OmegaConf.select(cfg, new) is not None:
            raise ValueError(f"config keys '{old}' and '{new}' are both set ({where}): '{old}' is now "
                             f"'{new}'")
        value = sub.pop(key)
        OmegaConf.update(cfg, new, value, force_add=True)
    return cfg


def _moved_override(item: str) -> str:
    """A ``key=value`` override with a moved key renamed (:data:`MOVED_KEYS`)."""
    key, sep, value = item.partition("=")
    return f"{MOVED_KEYS.get(key, key)}{sep}{value}"


def _load_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path in seen:
        raise ValueError(f"config base cycle: {' -> '.join(map(str, seen + (path,)))}")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"config {path} must be a mapping")
    upgrade_config(cfg, str(path))
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    return OmegaConf.merge(_load_yaml_chain((path.parent / str(base)).resolve(), seen + (path,)), cfg)


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A path, or the name of a shipped config (``afa_mit_b1_voc`` -> configs/afa_mit_b1_voc.yaml)."""
    path = Path(name)
    if path.is_file():
        return path.resolve()
    for cand in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config not found: {name} (looked in the working directory and {CONFIG_DIR})")


def defaults() -> DictConfig:
    """The generic defaults with every method's section and its defaults."""
    return OmegaConf.create({**DEFAULTS, **{k: c.defaults() for k, c in config_sections().items()}})


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a config file over the defaults and apply ``key=value`` overrides."""
    cfg = defaults()
    if path is not None:
        file_cfg = _load_yaml_chain(resolve_config_path(path))
        _check_keys(cfg, file_cfg, str(path))
        cfg = OmegaConf.merge(cfg, file_cfg)
    return _apply_overrides(cfg, overrides)


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Merge dotted ``key=value`` overrides (known keys only) and resolve interpolations."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like key=value")
    over = OmegaConf.from_dotlist([_moved_override(item) for item in overrides])
    _check_keys(cfg, over, "command line")
    cfg = OmegaConf.merge(cfg, over)
    OmegaConf.resolve(cfg)
    validate_config(cfg)
    return cfg


# What a trained run fixes: the data it learned from, its architecture and its method.
RUN_SECTIONS = ("data", "model", "method")


def run_config(run_cfg: Any, path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
               ) -> DictConfig:
    """The config a command uses on a trained run (``wsss evaluate / pseudo-labels / analyze``).

    The run's own config (``run_cfg``, as stored with the checkpoint); a config file named on the
    command line (``path``) replaces its settings except the run's ``data``, ``model`` and ``method``;
    dotted ``overrides`` replace anything (e.g. ``data.root=...`` to evaluate on other data).
    """
    cfg = OmegaConf.merge(defaults(), upgrade_config(OmegaConf.create(run_cfg), "the run's config"))
    if path is not None:
        named = load_config(path)
        for key in RUN_SECTIONS:
            named[key] = cfg[key]
        cfg = named
    return _apply_overrides(cfg, overrides)


def split_config_arg(config: str | None, overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(config, overrides)`` of an optional positional config: a first word with ``=`` that is not a
    file is an override (``wsss evaluate data.root=... --checkpoint run/model``)."""
    if config is not None and "=" in config and not Path(config).is_file():
        return None, [config, *overrides]
    return config, list(overrides)


# ---------------------------------------------------------------------------------------------
# Values: the type and range of every key, checked when a config is loaded (before any run folder)
# ---------------------------------------------------------------------------------------------

def _r(kind: str, lo: float | None = None, hi: float | None = None, **kw: Any) -> Rule:
    return Rule(kind, lo, hi, **kw)


# Keys whose rule is not just "the type of the default" ("method" is checked against the registry).
RULES: dict[str, Rule] = {
    "seed": _r("int", 0),
    "model.pretrained": _r("str", null=True),
    "model.token_head": _r("str", choices=("mean", "linear"), null=True),
    "data.type": _r("str", choices=("voc", "coco", "folder", "synthetic")),
    "threads": _r("int", 1, null=True),
    "data.num_classes": _r("int", 2, null=True),  # null: from the dataset
    "data.pseudo_dir": _r("str", null=True),
    "data.class_names": _r("list", item="str", null=True, min_len=1),
    "data.labels_file": _r("str", null=True),
    "data.train_labels_file": _r("str", null=True),
    "data.val_labels_file": _r("str", null=True),
    "data.val_fraction": _r("float", 0.0, 1.0, null=True),
    "data.split_seed": _r("int", 0),
    "data.image_dir": _r("str", null=True),
    "data.train_image_dir": _r("str", null=True),
    "data.val_image_dir": _r("str", null=True),
    "data.mask_dir": _r("str", null=True),
    "data.crop_size": _r("int", 1, null=True),
    "data.scale_range": _r("list", 0.0, length=2),
    "data.interpolation": _r("str", choices=("nearest", "bilinear", "bicubic")),
    "data.cat_max_ratio": _r("float", 0.0, 1.0, null=True),
    "data.rand_augment": _r("str", null=True),
    "data.random_erasing": _r("float", 0.0, 1.0),
    "data.batch_size": _r("int", 1),
    "data.num_workers": _r("int", 0),
    "data.num_train": _r("int", 1),
    "data.num_val": _r("int", 1),
    "data.size": _r("int", 16),
    "optim.lr": _r("float", 0.0),
    "optim.betas": _r("list", 0.0, 1.0, length=2),
    "optim.schedule": _r("str", choices=("poly", "cosine", "epoch_cosine")),
    "optim.max_iters": _r("int", 1),
    "optim.epochs": _r("int", 1, null=True),
    "train.max_iters": _r("int", 1),
    "train.grad_accum": _r("int", 1),
    "train.log_every": _r("int", 1),
    "train.eval_every": _r("int", 1),
    "train.ckpt_every": _r("int", 1),
    "train.amp": _r("str", choices=AMP_CHOICES, null=True),
    "train.cam_pass_mode": _r("str", choices=("train", "eval")),
    "cam.scales": _r("list", 0.0, min_len=1),
    "cam.fuse": _r("str", choices=tuple(FUSE_PRESETS)),
    "cam.high": _r("float", 0.0, 1.0),
    "cam.low": _r("float", 0.0, 1.0),
    "par.dilations": _r("list", 1, item="int", min_len=1),
    "par.downscale": _r("int", 1),
    "eval.scales": _r("list", 0.0, min_len=1),
    "eval.bkg_score": _r("float", 0.0, 1.0),
    "eval.aff_bkg_score": _r("float", 0.0, 1.0),
    "eval.presence": _r("float", 0.0, 1.0),
    "eval.presence_per_class": _r("list", 0.0, 1.0, null=True),
    "eval.max_images": _r("int", 1, null=True),
    "eval.batch_size": _r("int", 1),
    "eval.num_workers": _r("int", 0),
}


def validate_config(cfg: DictConfig) -> None:
    """Check the type and range of every key (method options included); the first bad key is a
    ``ValueError`` naming it, its value and what it should be. Free-form sections are not checked;
    a key that defaults to another (``optim.max_iters: ${train.max_iters}``) is reported after it."""
    problems: list[tuple[bool, str]] = []

    def walk(ref: dict[str, Any], prefix: str) -> None:
        for key, default in ref.items():
            dotted = f"{prefix}{key}"
            if dotted in _OPEN:
                continue
            if isinstance(default, dict):
                sub = OmegaConf.select(cfg, dotted)
                if not isinstance(sub, DictConfig):
                    raise ValueError(f"config key '{dotted}' must be a section (mapping), got {sub!r}")
                walk(default, dotted + ".")
                continue
            value = OmegaConf.select(cfg, dotted)
            rule = RULES.get(dotted) or default_rule(default)
            problem = rule.problem(OmegaConf.to_container(value) if isinstance(value, ListConfig) else value)
            if problem:
                derived = isinstance(default, str) and default.startswith("${")
                problems.append((derived, f"config key '{dotted}' must be {problem}, got {value!r}"))

    walk(DEFAULTS, "")
    if problems:
        raise ValueError(sorted(problems, key=lambda p: p[0])[0][1])
    if str(cfg.method) not in method_names():
        known = ", ".join(method_names())
        raise ValueError(f"config key 'method' must be one of {known}, got {cfg.method!r}")
    import_methods()
    if str(cfg.optim.param_rules) not in PARAM_RULES:
        known, got = ", ".join(PARAM_RULES.names()), cfg.optim.param_rules
        raise ValueError(f"config key 'optim.param_rules' must be one of {known}, got {got!r}")
    for key, dataclass_ in config_sections().items():
        dataclass_.parse(cfg.get(key), key)
    lo, hi = cfg.data.scale_range
    if lo > hi:
        raise ValueError(f"config key 'data.scale_range' must be [low, high] with low <= high, got {lo, hi}")
    if cfg.cam.low > cfg.cam.high:
        raise ValueError(f"config keys 'cam.low' ({cfg.cam.low}) must be <= 'cam.high' ({cfg.cam.high})")


# Sections whose keys are free-form (passed through to a builder).
_OPEN = {"model.backbone_kwargs", "model.cam_head", "model.seg_head", "optim.param_rules_args"}


def _check_keys(ref: Any, new: Any, where: str, prefix: str = "") -> None:
    if not isinstance(new, DictConfig) or prefix.rstrip(".") in _OPEN:
        return
    for key in new.keys():
        dotted = f"{prefix}{key}"
        if not isinstance(ref, DictConfig) or key not in ref:
            raise KeyError(f"unknown config key '{dotted}' ({where})")
        if isinstance(ref[key], DictConfig):
            _check_keys(ref[key], new[key], where, dotted + ".")


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
