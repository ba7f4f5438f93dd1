"""Config files, base chains and dotted overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsss.config import CONFIG_DIR, load_config
from wsss.methods import method_names

PAPER_CONFIGS = ["afa_mit_b1_voc", "afa_mit_b1_coco", "aream_mctformer_deit_s_voc", "aream_conformer_s_voc"]


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))
)
def test_every_shipped_config_loads(name: str) -> None:
    cfg = load_config(name)
    assert cfg.method in method_names()
    assert cfg.name == name


def test_paper_hyperparameters() -> None:
    afa = load_config("afa_mit_b1_voc")
    assert afa.model.backbone == "mit_b1" and list(afa.model.backbone_kwargs.strides) == [4, 2, 2, 1]
    assert (afa.data.crop_size, afa.train.max_iters, afa.optim.lr, afa.optim.warmup_iters) == (
        512,
        20000,
        6e-5,
        1500,
    )
    assert (afa.eval.bkg_score, afa.cam.high, afa.cam.low, afa.afa.radius) == (0.45, 0.55, 0.35, 8)
    assert (afa.pseudo.warmup_iters, afa.afa.switch_iter, afa.pseudo.seg_weight, afa.afa.aff_weight) == (
        2000,
        6000,
        0.1,
        0.1,
    )
    coco = load_config("afa_mit_b1_coco")
    assert (coco.data.num_classes, coco.train.max_iters, coco.par.num_iter, coco.afa.switch_iter) == (
        81,
        80000,
        15,
        15000,
    )
    assert coco.par.dilations == afa.par.dilations  # inherited from the VOC file
    mct = load_config("aream_mctformer_deit_s_voc")
    assert (mct.aream.layer_index, mct.data.batch_size, mct.optim.lr) == (7, 64, 6.25e-5)
    conf = load_config("aream_conformer_s_voc")
    assert (conf.aream.layer_index, conf.data.crop_size, list(conf.cam.scales)) == (9, 384, [0.5, 1.0, 1.5])


def test_overrides_and_interpolation() -> None:
    cfg = load_config("afa_mit_b1_voc", ["train.max_iters=100", "data.root=/x/VOC", "cam.scales=[1.0]"])
    assert cfg.train.max_iters == 100 and cfg.optim.max_iters == 100  # optim follows train
    assert cfg.data.root == "/x/VOC" and list(cfg.cam.scales) == [1.0]


def test_unknown_keys_are_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="train.max_iter"):
        load_config("afa_mit_b1_voc", ["train.max_iter=5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: afa\nafa: {radus: 3}\n")
    with pytest.raises(KeyError, match="afa.radus"):
        load_config(bad)
    with pytest.raises(ValueError, match="key=value"):
        load_config("afa_mit_b1_voc", ["train.max_iters"])
    with pytest.raises(FileNotFoundError, match="nope"):
        load_config("nope")


def test_base_chain_and_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_moved_keys_keep_their_values(tmp_path: Path) -> None:
    """afa.warmup_iters / afa.seg_weight moved to the shared pseudo section: a config file (at any depth
    of its base chain), an override or a stored run's config naming the old key sets the new one."""
    from omegaconf import OmegaConf

    from wsss.config import run_config, to_dict
    from wsss.engine.runs import config_from_dict

    (tmp_path / "base.yaml").write_text("base: {}\nafa: {{warmup_iters: 7, seg_weight: 0.3}}\n".format(
        CONFIG_DIR / "afa_mit_tiny_synthetic.yaml"))
    (tmp_path / "child.yaml").write_text("base: base.yaml\nafa: {warmup_iters: 9}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.pseudo.warmup_iters, cfg.pseudo.seg_weight) == (9, 0.3) and "warmup_iters" not in cfg.afa
    assert load_config("afa_mit_tiny_synthetic", ["afa.warmup_iters=3"]).pseudo.warmup_iters == 3
    stored = to_dict(load_config("afa_mit_tiny_synthetic"))
    stored["afa"].update(warmup_iters=11, seg_weight=0.2)  # a run trained before the move
    del stored["pseudo"]
    for cfg in (run_config(stored), config_from_dict(stored)):
        assert (cfg.pseudo.warmup_iters, cfg.pseudo.seg_weight) == (11, 0.2) and "seg_weight" not in cfg.afa
    both = tmp_path / "both.yaml"
    both.write_text("afa: {warmup_iters: 1}\npseudo: {warmup_iters: 2}\n")
    with pytest.raises(ValueError, match="'afa.warmup_iters' and 'pseudo.warmup_iters' are both set"):
        load_config(both)
    assert OmegaConf.select(load_config(None), "afa.warmup_iters") is None


def test_generic_sections_are_dataclasses() -> None:
    """Every generic key's default and rule is a field of its section's dataclass; DEFAULTS is derived
    from them, the free-form sub-sections are the dict fields, relations are the sections' check()."""
    from wsss.config import DEFAULTS, OPEN_KEYS, SECTIONS, CamConfig, DataConfig, ModelConfig, TopConfig
    from wsss.core.schema import ConfigSection, MethodConfig

    assert MethodConfig is ConfigSection
    assert list(DEFAULTS) == [*TopConfig.defaults(), *SECTIONS]
    assert all(DEFAULTS[key] == cls.defaults() for key, cls in SECTIONS.items())
    assert OPEN_KEYS == {"model.backbone_kwargs", "model.cam_head", "model.seg_head",
                         "optim.param_rules_args"}
    assert ModelConfig.defaults()["cam_head"] == {"kernel_size": 1, "bias": False, "pooling": "gmp"}
    assert ModelConfig().seg_head is not ModelConfig().seg_head  # each instance its own dict
    assert load_config(None, ["model.cam_head.anything=1"]).model.cam_head.anything == 1  # not checked
    with pytest.raises(ValueError, match=r"'data.scale_range' must be \[low, high\] with low <= high"):
        DataConfig(scale_range=[2.0, 1.0]).check("data")
    with pytest.raises(ValueError, match=r"'cam.low' \(0.6\) must be <= 'cam.high' \(0.55\)"):
        CamConfig.of({"low": 0.6}).check("cam")


def _default_pairs() -> list[tuple[str, object, str]]:
    """(dotted config key, function, parameter): the config key's default is that parameter's default
    (both the lower layer's named constant; a sub-key of a free-form section as ``section.key.sub``)."""
    from wsss.data.transforms import TrainTransform, random_rescale
    from wsss.engine.evaluate import evaluate
    from wsss.engine.optim import EpochCosineLR, PolyWarmupLR, WarmupCosineLR
    from wsss.heads.classifier import CAMHead
    from wsss.heads.segformer import SegFormerHead
    from wsss.ops.cam_fusion import multiscale_cam
    from wsss.refine.labels import cam_to_label, par_pseudo_label, par_refine_scores_label
    from wsss.refine.par import PAR
    from wsss.refine.propagation import propagate_affinity, propagate_affinity_plain

    pairs = [
        ("eval.bkg_score", cam_to_label, "bkg_score"),
        ("cam.high", par_pseudo_label, "high"),
        ("cam.low", par_pseudo_label, "low"),
        ("par.downscale", par_pseudo_label, "downscale"),
        ("par.downscale", par_refine_scores_label, "downscale"),
        ("eval.aff_bkg_score", propagate_affinity, "bkg_score"),
        ("afa.power", propagate_affinity, "power"),
        ("afa.norm_eps", propagate_affinity, "eps"),
        ("afa.power", propagate_affinity_plain, "power"),
        ("cam.scales", multiscale_cam, "scales"),
        ("cam.flip", multiscale_cam, "flip"),
        ("model.seg_head.embed_dim", SegFormerHead, "embed_dim"),
        ("model.seg_head.dropout", SegFormerHead, "dropout"),
        ("data.scale_range", random_rescale, "scale_range"),
        ("data.interpolation", random_rescale, "interpolation"),
        ("eval.num_workers", evaluate, "num_workers"),
    ]
    pairs += [(f"par.{k}", PAR, k) for k in ("dilations", "num_iter", "w1", "w2")]
    pairs += [(f"model.cam_head.{k}", CAMHead, k) for k in ("kernel_size", "bias", "pooling")]
    augment = ("scale_range", "flip", "color_jitter", "interpolation", "resized_crop", "random_erasing")
    pairs += [(f"data.{k}", TrainTransform, k) for k in augment]
    pairs += [(f"optim.{k}", PolyWarmupLR, k) for k in ("warmup_iters", "warmup_ratio", "power", "rebase")]
    pairs += [(f"optim.{k}", WarmupCosineLR, k) for k in ("start_lr", "final_lr")]
    pairs += [(f"optim.{k}", EpochCosineLR, k) for k in ("warmup_lr", "min_lr", "official_lag")]
    return pairs


@pytest.mark.parametrize("key, fn, param", _default_pairs(),
                         ids=lambda v: v if isinstance(v, str) else getattr(v, "__qualname__", "?"))
def test_config_defaults_are_the_functions_defaults(key: str, fn: object, param: str) -> None:
    """A config default that a lower layer's function also takes is one value (the function's default
    and the section's field are the same named constant), so they cannot drift apart."""
    import inspect

    from omegaconf import ListConfig, OmegaConf

    from wsss.config import defaults

    declared = OmegaConf.select(defaults(), key)
    if isinstance(declared, ListConfig):
        declared = OmegaConf.to_container(declared)
    default = inspect.signature(fn).parameters[param].default
    assert default is not inspect.Parameter.empty, f"{key}: {param} has no default"
    value = list(default) if isinstance(default, tuple) else default
    assert value == declared and type(value) is type(declared), (key, declared, default)


def test_data_build_fallbacks_are_the_sections_defaults() -> None:
    """data/build.py reads partial data sections (tests, your own dicts): a key left out takes the named
    constant the ``data`` section's default is."""
    from wsss.config import DEFAULTS
    from wsss.data import build, transforms

    data = DEFAULTS["data"]
    assert (data["type"], data["train_split"], data["val_split"], data["mask_dir"], data["seed"],
            data["split_seed"]) == (build.DATA_TYPE, build.TRAIN_SPLIT, build.VAL_SPLIT, build.MASK_DIR,
                                    build.DATA_SEED, build.SPLIT_SEED)
    assert (data["num_train"], data["num_val"], data["size"], data["synthetic_seed"]) == (
        build.SYNTHETIC_NUM_TRAIN, build.SYNTHETIC_NUM_VAL, build.SYNTHETIC_SIZE, build.SYNTHETIC_SEED)
    assert data["crop_size"] == transforms.CROP_SIZE
    t = build.build_transform({}, train=True)
    assert (t.crop_size, list(t.scale_range), t.flip, t.color_jitter, t.interpolation, t.resized_crop,
            t.random_erasing) == (data["crop_size"], data["scale_range"], data["flip"], data["color_jitter"],
                                  data["interpolation"], data["resized_crop"], data["random_erasing"])


def test_build_model_reads_the_loaded_model_section() -> None:
    """build_model reads the model section as loaded, without fallbacks of its own: the seg head is on
    by default (``model.seg_head.enabled``: true; the builder once fell back to false), its width is
    the section's, and a section that lacks a key is an error rather than a silent other default."""
    from omegaconf import OmegaConf

    from wsss.model import build_model

    model = load_config(None, ["model.backbone=mit_tiny", "model.seg_head.embed_dim=16"]).model
    net = build_model(model, 3)
    assert net.seg_head is not None and net.seg_head.linear_pred.in_channels == 16
    assert build_model(OmegaConf.merge(model, {"seg_head": {"enabled": False}}), 3).seg_head is None
    partial = OmegaConf.to_container(model)
    del partial["seg_head"]["enabled"]
    with pytest.raises(KeyError, match="enabled"):
        build_model(partial, 3)
