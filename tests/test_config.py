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
