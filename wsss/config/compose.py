"""Loading configs: base chains, dotted overrides, moved keys and validation.

A config file may name a ``base`` file (relative to itself) that it extends. Values are merged
as: built-in defaults <- base chain <- file <- overrides (``train.max_iters=100``). Unknown keys
in an override are an error (typos must not be silently ignored). The defaults and rules are the
fields of the sections' dataclasses (:mod:`wsss.config.sections`, each method's ``Config``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from wsss.config.sections import DEFAULTS, OPEN_KEYS, SECTIONS, TopConfig
from wsss.core.registry import PARAM_RULES
from wsss.core.schema import ConfigSection
from wsss.methods import config_sections, import_methods, method_names

# The shipped configs: package data of an installed wsss; in the repository wsss/configs links to configs/.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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
# Values: the type and range of every key (the rules of the sections' fields), checked when a config
# is loaded (before any run folder)
# ---------------------------------------------------------------------------------------------

def validate_config(cfg: DictConfig) -> None:
    """Check the type and range of every key (method options included); the first bad key is a
    ``ValueError`` naming it, its value and what it should be. Free-form sections are not checked;
    a key that defaults to another (``optim.max_iters: ${train.max_iters}``) is reported after it."""
    problems = _value_problems(cfg)
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
    for key, section in SECTIONS.items():  # relations between the keys of a generic section
        section.of(cfg[key]).check(key)


def _value_problems(cfg: DictConfig) -> list[tuple[bool, str]]:
    """``(derived, message)`` of each generic key whose value breaks its field's rule, in the order of
    the fields (``derived``: its default is an interpolation); a section that is not a mapping is a
    ``ValueError`` at once."""
    problems: list[tuple[bool, str]] = []

    def walk(section: type[ConfigSection], prefix: str) -> None:
        for key, (default, rule) in section.rules().items():
            dotted = f"{prefix}{key}"
            if dotted in OPEN_KEYS:
                continue
            value = OmegaConf.select(cfg, dotted)
            problem = rule.problem(OmegaConf.to_container(value) if isinstance(value, ListConfig) else value)
            if problem:
                derived = isinstance(default, str) and default.startswith("${")
                problems.append((derived, f"config key '{dotted}' must be {problem}, got {value!r}"))

    walk(TopConfig, "")
    for key, section in SECTIONS.items():
        sub = OmegaConf.select(cfg, key)
        if not isinstance(sub, DictConfig):
            raise ValueError(f"config key '{key}' must be a section (mapping), got {sub!r}")
        walk(section, key + ".")
    return problems


def _check_keys(ref: Any, new: Any, where: str, prefix: str = "") -> None:
    if not isinstance(new, DictConfig) or prefix.rstrip(".") in OPEN_KEYS:
        return
    for key in new.keys():
        dotted = f"{prefix}{key}"
        if not isinstance(ref, DictConfig) or key not in ref:
            raise KeyError(f"unknown config key '{dotted}' ({where})")
        if isinstance(ref[key], DictConfig):
            _check_keys(ref[key], new[key], where, dotted + ".")


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
