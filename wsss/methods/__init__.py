"""Methods: each module of this package registers one :class:`Method` (``@register_method``).

``build_network(cfg, K)`` builds the network with the configured method's heads and
``build_method(cfg, net)`` the method; both check the method's config section first.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import wsss.core.param_rules  # noqa: F401  (registers the default preset, DEFAULT_PARAM_RULES)
from wsss.core.registry import METHODS
from wsss.methods.base import SHARED_SECTIONS, Method, MethodConfig
from wsss.model import WSSSNet, build_model

DEFAULT_METHOD = "afa"  # the config's ``method`` when none is given
DEFAULT_PARAM_RULES = "afa"  # the config's ``optim.param_rules`` when none is given (core.param_rules)


def import_methods() -> None:
    """Import every module of this package, so that each registers its method. A method module that
    cannot be found (removed, or hidden from the import system) is left out: the others stand alone.
    Any other error, a missing dependency of the module included, is raised."""
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            name = f"{__name__}.{mod.name}"
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as err:
                if err.name != name:
                    raise


def method_names() -> list[str]:
    import_methods()
    return METHODS.names()


def method_class(name: str) -> type[Method]:
    """The registered method ``name`` (a ``ValueError`` naming the known ones otherwise)."""
    import_methods()
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose one of {', '.join(METHODS.names())}")
    return METHODS.get(name)  # type: ignore[return-value]


def config_sections() -> dict[str, type[MethodConfig]]:
    """Config section name -> its dataclass: the sections every method reads (``pseudo``), then each
    registered method's own (methods may share one)."""
    import_methods()
    out: dict[str, type[MethodConfig]] = dict(SHARED_SECTIONS)
    for name in METHODS.names():
        cls = METHODS.get(name)
        if cls.Config is None:
            continue
        key = cls.section_name()
        if out.setdefault(key, cls.Config) is not cls.Config:
            raise TypeError(f"config section '{key}' is declared by two methods with different dataclasses")
    return out


def all_map_names() -> list[str]:
    """Every label map some registered method produces ('seg' included), each once."""
    import_methods()
    names = [m for n in METHODS.names() for m in (*METHODS.get(n).MAPS, *METHODS.get(n).EXTRA_MAPS)]
    return list(dict.fromkeys(["pseudo", *names, "seg"]))


def build_network(cfg: Any, num_classes: int, model_cfg: Any = None) -> WSSSNet:
    """The network of ``cfg.model`` (or ``model_cfg``) with the heads of the method ``cfg.method``;
    num_classes: K."""
    cls = method_class(str(cfg.method))
    opts = cls.options(cfg)
    model = cfg.model if model_cfg is None else model_cfg
    return build_model(model, num_classes, lambda bb: cls.build_heads(opts, bb, num_classes))


def build_method(cfg: Any, net: WSSSNet) -> Method:
    """The method named by ``cfg.method``."""
    return method_class(str(cfg.method))(cfg, net)


__all__ = ["DEFAULT_METHOD", "DEFAULT_PARAM_RULES", "Method", "MethodConfig", "all_map_names", "build_method",
           "build_network", "config_sections", "method_class", "method_names"]
