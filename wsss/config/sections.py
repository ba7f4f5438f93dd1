"""The generic config sections: every key a config may set besides the methods' own sections, each
with its default (the official AFA VOC recipe's where one exists) and the rule its values follow,
declared once as a field of its section's dataclass (:func:`wsss.core.schema.option`). A field without
a rule takes the type of its default (numbers non-negative); a dict field is a free-form sub-section
(passed through to a builder, its contents not checked).

A default that a lower layer's function also uses (a PAR weight, a background score, an augmentation
setting) is that layer's named constant (``wsss.refine``, ``wsss.ops``, ``wsss.heads``, ``wsss.data``),
imported here: the number lives in one place.

Each method's own section (its keys, defaults and rules) is declared by the method
(``wsss.methods``: ``Method.Config``) and added by :func:`wsss.config.defaults`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wsss.core.schema import ConfigSection, Rule, option
from wsss.data import build as data_build
from wsss.data import transforms as aug
from wsss.heads.classifier import CAM_BIAS, CAM_KERNEL_SIZE, CAM_POOLING
from wsss.heads.segformer import SEG_DROPOUT, SEG_EMBED_DIM
from wsss.methods import DEFAULT_METHOD, DEFAULT_PARAM_RULES
from wsss.ops.cam_fusion import CAM_FLIP, CAM_SCALES, DEFAULT_FUSE, FUSE_PRESETS
from wsss.refine.labels import BKG_SCORE, CAM_HIGH, CAM_LOW
from wsss.refine.par import PAR_DILATIONS, PAR_DOWNSCALE, PAR_NUM_ITER, PAR_W1, PAR_W2
from wsss.refine.propagation import AFF_BKG_SCORE

#: train.amp values besides null: "bf16" (warns where bf16 is emulated), "auto" (bf16 where native)
AMP_CHOICES = ("bf16", "auto")


@dataclass
class TopConfig(ConfigSection):
    """The keys at the top of a config, outside any section ("method" is checked against the method
    registry as well)."""

    name: str = option("run")
    method: str = option(DEFAULT_METHOD)  # a registered method (wsss.methods)
    seed: int = option(1, Rule("int", 0))
    out_dir: str = option("runs/${name}")
    # torch CPU threads; null: torch's default (one per core). Busy machine: 1
    threads: int | None = option(None, Rule("int", 1, null=True))


@dataclass
class ModelConfig(ConfigSection):
    """The ``model`` section: the network (wsss.model.build_model)."""

    backbone: str = option("mit_b1")
    backbone_kwargs: dict[str, Any] = option({})  # free-form: passed to the backbone's builder
    pretrained: str | None = option(None, Rule("str", null=True))
    cam_head: dict[str, Any] = option({"kernel_size": CAM_KERNEL_SIZE, "bias": CAM_BIAS,
                                       "pooling": CAM_POOLING})  # free-form
    # null | mean | linear
    token_head: str | None = option(None, Rule("str", choices=("mean", "linear"), null=True))
    seg_head: dict[str, Any] = option({"enabled": True, "embed_dim": SEG_EMBED_DIM,
                                       "dropout": SEG_DROPOUT})  # free-form


@dataclass
class DataConfig(ConfigSection):
    """The ``data`` section, read by wsss.data.build.build_dataset / build_transform."""

    # voc | coco | folder | synthetic
    type: str = option(data_build.DATA_TYPE, Rule("str", choices=("voc", "coco", "folder", "synthetic")))
    root: str = option("data/VOC2012")
    train_split: str = option(data_build.TRAIN_SPLIT)
    val_split: str = option(data_build.VAL_SPLIT)
    # including background; null: from the dataset (VOC 21, COCO 81, names file)
    num_classes: int | None = option(None, Rule("int", 2, null=True))
    class_names: list[str] | None = option(None, Rule("list", item="str", null=True, min_len=1))
    # second stage: train on these pseudo-label PNGs (255 = ignore) instead of masks
    pseudo_dir: str | None = option(None, Rule("str", null=True))
    labels_file: str | None = option(None, Rule("str", null=True))
    train_labels_file: str | None = option(None, Rule("str", null=True))
    val_labels_file: str | None = option(None, Rule("str", null=True))
    # folder: hold this fraction of labels_file out as the val split (seeded by split_seed)
    val_fraction: float | None = option(None, Rule("float", 0.0, 1.0, null=True))
    split_seed: int = option(data_build.SPLIT_SEED, Rule("int", 0))
    image_dir: str | None = option(None, Rule("str", null=True))
    train_image_dir: str | None = option(None, Rule("str", null=True))
    val_image_dir: str | None = option(None, Rule("str", null=True))
    # "auto": the dataset's usual mask folder where there is one (none for a folder dataset); null: no masks
    mask_dir: str | None = option(data_build.MASK_DIR, Rule("str", null=True))
    # training crop; null: the (rescaled) full image, batches padded to the largest
    crop_size: int | None = option(aug.CROP_SIZE, Rule("int", 1, null=True))
    # [low, high], low <= high
    scale_range: list[float] = option(list(aug.SCALE_RANGE), Rule("list", 0.0, length=2))
    interpolation: str = option(aug.INTERPOLATION, Rule("str", choices=("nearest", "bilinear", "bicubic")))
    flip: bool = option(aug.FLIP)
    color_jitter: bool = option(aug.COLOR_JITTER)
    resized_crop: bool = option(aug.RESIZED_CROP)
    cat_max_ratio: float | None = option(None, Rule("float", 0.0, 1.0, null=True))
    # timm spec, e.g. "rand-m9-mstd0.5-inc1" (MCTformer recipe)
    rand_augment: str | None = option(None, Rule("str", null=True))
    # probability of erasing one box (MCTformer recipe: 0.25)
    random_erasing: float = option(aug.RANDOM_ERASING, Rule("float", 0.0, 1.0))
    batch_size: int = option(2, Rule("int", 1))
    num_workers: int = option(2, Rule("int", 0))
    seed: int = option(data_build.DATA_SEED)
    # synthetic set (generated into root on first use)
    num_train: int = option(data_build.SYNTHETIC_NUM_TRAIN, Rule("int", 1))
    num_val: int = option(data_build.SYNTHETIC_NUM_VAL, Rule("int", 1))
    size: int = option(data_build.SYNTHETIC_SIZE, Rule("int", 16))
    synthetic_seed: int = option(data_build.SYNTHETIC_SEED)

    def check(self, where: str) -> None:
        lo, hi = self.scale_range
        if lo > hi:
            raise ValueError(f"config key '{where}.scale_range' must be [low, high] with low <= high, got "
                             f"{lo, hi}")


@dataclass
class OptimConfig(ConfigSection):
    """The ``optim`` section, read by wsss.engine.optim.build_optimizer / build_scheduler."""

    # a preset of wsss.core.registry.PARAM_RULES (an official recipe); checked against the registry
    param_rules: str = option(DEFAULT_PARAM_RULES)
    # free-form: e.g. {norm: train} to train AFA's frozen encoder LayerNorms
    param_rules_args: dict[str, Any] = option({})
    lr: float = option(6.0e-5, Rule("float", 0.0))
    weight_decay: float = option(0.01)
    betas: list[float] = option([0.9, 0.999], Rule("list", 0.0, 1.0, length=2))
    eps: float = option(1.0e-8)
    # torch's fused AdamW kernel (CPU / CUDA): the same update in one pass, ~3.5x faster per step
    # for MiT-B1 on CPU; rounding differs from the default multi-tensor path in the last bit
    fused: bool = option(False)
    # poly (per step) | cosine (per step) | epoch_cosine (per epoch)
    schedule: str = option("poly", Rule("str", choices=("poly", "cosine", "epoch_cosine")))
    # follows train.max_iters unless set; a bad value here is reported after the other keys' problems
    max_iters: int = option("${train.max_iters}", Rule("int", 1))
    warmup_iters: int = option(1500)
    warmup_ratio: float = option(1.0e-6)
    power: float = option(1.0)
    rebase: bool = option(False)
    epochs: int | None = option(None, Rule("int", 1, null=True))
    warmup_epochs: int = option(1)
    start_lr: float = option(1.0e-6)
    final_lr: float = option(1.0e-6)
    warmup_lr: float = option(1.0e-6)
    min_lr: float = option(1.0e-5)
    official_lag: bool = option(True)


@dataclass
class TrainConfig(ConfigSection):
    """The ``train`` section: the training loop (wsss.engine.train)."""

    max_iters: int = option(20000, Rule("int", 1))
    grad_accum: int = option(1, Rule("int", 1))
    log_every: int = option(50, Rule("int", 1))
    eval_every: int = option(2000, Rule("int", 1))
    ckpt_every: int = option(2000, Rule("int", 1))
    keep_ckpts: int = option(2)
    # null | bf16 | auto (bf16 where native, else fp32: wsss.engine.hardware)
    amp: str | None = option(None, Rule("str", choices=AMP_CHOICES, null=True))
    cam_pass_mode: str = option("train", Rule("str", choices=("train", "eval")))  # train (official) | eval


@dataclass
class CamConfig(ConfigSection):
    """The ``cam`` section: the multi-scale CAM passes and the pseudo label's background scores."""

    scales: list[float] = option(list(CAM_SCALES), Rule("list", 0.0, min_len=1))
    flip: bool = option(CAM_FLIP)
    # a rule of wsss.ops.cam_fusion.FUSE_PRESETS
    fuse: str = option(DEFAULT_FUSE, Rule("str", choices=tuple(FUSE_PRESETS)))
    high: float = option(CAM_HIGH, Rule("float", 0.0, 1.0))
    low: float = option(CAM_LOW, Rule("float", 0.0, 1.0))  # <= high

    def check(self, where: str) -> None:
        if self.low > self.high:
            raise ValueError(f"config keys '{where}.low' ({self.low}) must be <= '{where}.high' "
                             f"({self.high})")


@dataclass
class ParConfig(ConfigSection):
    """The ``par`` section: PAR, the pixel-adaptive refinement (wsss.refine.par.PAR)."""

    dilations: list[int] = option(list(PAR_DILATIONS), Rule("list", 1, item="int", min_len=1))
    num_iter: int = option(PAR_NUM_ITER)
    w1: float = option(PAR_W1)
    w2: float = option(PAR_W2)
    downscale: int = option(PAR_DOWNSCALE, Rule("int", 1))


@dataclass
class EvalConfig(ConfigSection):
    """The ``eval`` section: evaluation and prediction (wsss.engine.evaluate)."""

    split: str = option("val")
    scales: list[float] = option([1.0], Rule("list", 0.0, min_len=1))
    flip: bool = option(False)
    bkg_score: float = option(BKG_SCORE, Rule("float", 0.0, 1.0))
    aff_bkg_score: float = option(AFF_BKG_SCORE, Rule("float", 0.0, 1.0))
    # predict on a model without a seg head: a class is in the image when sigmoid(logit) passes
    # this (``wsss calibrate`` chooses it on the training labels, per class where that is better)
    presence: float = option(0.5, Rule("float", 0.0, 1.0))
    # null or one threshold per foreground class
    presence_per_class: list[float] | None = option(None, Rule("list", 0.0, 1.0, null=True))
    crf: bool = option(False)
    max_images: int | None = option(None, Rule("int", 1, null=True))
    sweep: bool = option(False)  # kept for old runs' configs; true is an error naming `wsss calibrate`
    batch_size: int = option(8, Rule("int", 1))  # images of one size evaluated together
    num_workers: int = option(0, Rule("int", 0))  # DataLoader workers reading the evaluation images


#: the generic sections, in the order a config lists them (after the keys of :class:`TopConfig`)
SECTIONS: dict[str, type[ConfigSection]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "cam": CamConfig,
    "par": ParConfig,
    "eval": EvalConfig,
}

#: the generic defaults as one nested dict (derived from the dataclasses above)
DEFAULTS: dict[str, Any] = {**TopConfig.defaults(), **{key: cls.defaults() for key, cls in SECTIONS.items()}}

#: the free-form sub-sections (dotted): a section's dict fields, whose contents are not checked
OPEN_KEYS = frozenset(f"{key}.{name}" for key, cls in SECTIONS.items()
                      for name, (default, _) in cls.rules().items() if isinstance(default, dict))
