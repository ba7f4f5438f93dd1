"""YAML configs with dotted command-line overrides.

A config file may name a ``base`` file (relative to itself) that it extends. Values are merged
as: built-in defaults <- base chain <- file <- overrides (``train.max_iters=100``). Unknown keys
in an override are an error (typos must not be silently ignored).

The generic sections (``model``, ``data``, ``optim``, ``train``, ``cam``, ``par``, ``eval`` and the
top-level keys) are dataclasses in :mod:`wsss.config.sections`, each field stating its key's default
and rule; loading, overrides and validation are :mod:`wsss.config.compose`.
"""

from wsss.config.compose import (
    CONFIG_DIR,
    MOVED_KEYS,
    RUN_SECTIONS,
    defaults,
    load_config,
    resolve_config_path,
    run_config,
    split_config_arg,
    to_dict,
    upgrade_config,
    validate_config,
)
from wsss.config.sections import (
    AMP_CHOICES,
    DEFAULTS,
    OPEN_KEYS,
    SECTIONS,
    CamConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    ParConfig,
    TopConfig,
    TrainConfig,
)

__all__ = [
    "AMP_CHOICES", "CONFIG_DIR", "DEFAULTS", "MOVED_KEYS", "OPEN_KEYS", "RUN_SECTIONS", "SECTIONS",
    "CamConfig", "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "ParConfig", "TopConfig",
    "TrainConfig", "defaults", "load_config", "resolve_config_path", "run_config", "split_config_arg",
    "to_dict", "upgrade_config", "validate_config",
]
