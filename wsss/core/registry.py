"""Name -> builder registries (``build_*`` style, as in segment-anything).

Each registry maps a string to a callable that returns an ``nn.Module``. Families register
their builders at import time; :func:`Registry.build` gives a clear error for unknown names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


class Registry:
    """A named mapping of builders."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, Callable[..., Any]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(
        self, name: str | None = None, **meta: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@BACKBONES.register()`` registers under the function's own name; ``meta``: facts
        about the entry that a builder's caller needs (:meth:`meta`)."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self._fns:
                raise KeyError(f"{self.kind} '{key}' is registered twice")
            self._fns[key] = fn
            self._meta[key] = dict(meta)
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._fns:
            raise KeyError(f"unknown {self.kind} '{name}'; known: {', '.join(sorted(self._fns))}")
        return self._fns[name]

    def meta(self, name: str) -> dict[str, Any]:
        """The facts registered with ``name`` (e.g. ``class_tokens_per_class``: the builder takes the
        number of classes)."""
        self.get(name)
        return self._meta[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: str) -> bool:
        return name in self._fns


BACKBONES = Registry("backbone")
# One function per backbone family: a foreign state dict -> (registered name, builder kwargs), or None
# when it is not one of the family's checkpoints (wsss.api.hub.detect_backbone asks each in turn).
BACKBONE_DETECTORS: list[Callable[[Mapping[str, Any]], tuple[str, dict[str, Any]] | None]] = []


def named_builder(fn: Callable[..., Any], name: str, doc: str) -> Callable[..., Any]:
    """A builder made by a size-table factory, given its registered name and docstring."""
    fn.__name__, fn.__qualname__, fn.__doc__ = name, name, doc
    return fn


def register_detector(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: add a family's checkpoint detector to :data:`BACKBONE_DETECTORS`."""
    BACKBONE_DETECTORS.append(fn)
    return fn

# Parameter-group presets of the official recipes (name -> builder of a ParamRule list): the default
# "afa" registered by wsss.core.param_rules, a recipe's own by its method file (optim.param_rules).
PARAM_RULES = Registry("param_rules preset")
# Method classes (:class:`wsss.methods.base.Method`), registered by their modules in wsss/methods/.
METHODS = Registry("method")
