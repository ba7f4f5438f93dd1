"""Name -> builder registries (``build_*`` style, as in segment-anything).

Each registry maps a string to a callable that returns an ``nn.Module``. Families register
their builders at import time; :func:`Registry.build` gives a clear error for unknown names.
"""

from __future__ import annotations

from collections.abc import Callable
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
# Method classes (:class:`wsss.methods.base.Method`), registered by their modules in wsss/methods/.
METHODS = Registry("method")
