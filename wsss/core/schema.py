"""What a config key may hold: :class:`Rule` (type, range, choices, null, list shape).

Every config section is a :class:`ConfigSection`: a dataclass of :func:`option` fields, each stating
its key's default and rule in one place. The generic sections (:mod:`wsss.config.sections`) and every
method's section (``Method.Config``; :class:`MethodConfig` is the same class) are declared this way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

_NUM = (int, float)


class Rule:
    """What one key may hold: ``kind`` int | float | bool | str | list | any, a range [lo, hi], a set of
    choices, null allowed or not; for lists the element kind, the element range and a length."""

    def __init__(self, kind: str, lo: float | None = None, hi: float | None = None,
                 choices: Sequence[str] | None = None, null: bool = False, item: str = "float",
                 length: int | None = None, min_len: int = 0) -> None:
        self.kind, self.lo, self.hi, self.choices, self.null = kind, lo, hi, choices, null
        self.item, self.length, self.min_len = item, length, min_len

    def _scalar(self, v: Any, kind: str) -> str | None:
        if kind == "bool":
            return None if isinstance(v, bool) else "true or false"
        if kind == "str":
            if not self.choices and isinstance(v, _NUM) and not isinstance(v, bool):
                return None  # a name such as name=2024 (read as a number); code reads it with str()
            if not isinstance(v, str):
                return "a string"
            return None if not self.choices or v in self.choices else f"one of {', '.join(self.choices)}"
        ok = isinstance(v, int) if kind == "int" else isinstance(v, _NUM)
        if isinstance(v, bool) or not ok:
            return "an integer" if kind == "int" else "a number"
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            lo = "" if self.lo is None else f">= {self.lo:g}"
            hi = "" if self.hi is None else f"<= {self.hi:g}"
            what = "an integer" if kind == "int" else "a number"
            return f"{what} {' and '.join(x for x in (lo, hi) if x)}"
        return None

    def problem(self, v: Any) -> str | None:
        """None when ``v`` fits, else what it should be."""
        if v is None or self.kind == "any":
            return None if self.null or self.kind == "any" else "set (not null)"
        if self.kind != "list":
            return self._scalar(v, self.kind)
        if not isinstance(v, (list, tuple, ListConfig)):
            return f"a list of {self.item}s"
        if (self.length is not None and len(v) != self.length) or len(v) < self.min_len:
            n = self.length if self.length is not None else f"at least {self.min_len}"
            return f"a list of {n} {self.item}s"
        bad = next((p for p in (self._scalar(x, self.item) for x in v) if p), None)
        return None if bad is None else f"a list whose items are each {bad}"


def default_rule(value: Any) -> Rule:
    """Rule of a key declared without one: the type of its default, non-negative numbers."""
    if isinstance(value, bool):
        return Rule("bool")
    if isinstance(value, int):
        return Rule("int", 0)
    if isinstance(value, float):
        return Rule("float", 0.0)
    if isinstance(value, list):
        return Rule("list", item="int" if value and isinstance(value[0], int) else "float")
    return Rule("str" if isinstance(value, str) else "any")


def cfg_get(cfg: Any, key: str, default: Any = None, keep_null: bool = False) -> Any:
    """``cfg[key]`` of a dict, an OmegaConf config or a plain object; ``default`` when it is missing or
    null (with ``keep_null``: only when it is missing, for keys whose null means something, such as
    ``data.crop_size: null``, the full image). Callers pass the key's default (its section's field in
    :mod:`wsss.config.sections`)."""
    missing = object()
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        try:
            value = cfg.get(key, missing)
        except Exception:  # OmegaConf struct mode raises on unknown keys
            value = missing
    else:
        value = getattr(cfg, key, missing)
    if value is missing or (value is None and not keep_null):
        return default
    return value


def option(default: Any, rule: Rule | None = None) -> Any:
    """A :class:`ConfigSection` field: its default and the rule its values follow (default: the type of
    the default, non-negative numbers). A dict default makes the key a free-form sub-section: its
    contents are not checked."""
    meta = {"rule": rule}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class ConfigSection:
    """A config section: subclasses are dataclasses whose fields (declared with :func:`option`) are the
    section's keys. :meth:`parse` checks a section: unknown keys, types, ranges and choices, then
    :meth:`check` (relations between keys)."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return dataclasses.asdict(cls())

    @classmethod
    def rules(cls) -> dict[str, tuple[Any, Rule]]:
        """Each key's default and the rule its values follow, in the order of the fields."""
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            out[f.name] = (default, f.metadata.get("rule") or default_rule(default))
        return out

    @classmethod
    def parse(cls, section: Mapping[str, Any] | None, where: str) -> ConfigSection:
        """The section ``where`` of a config as this dataclass; a ``KeyError`` names an unknown key, a
        ``ValueError`` a bad value (key, value and what it should be)."""
        values = _plain(section)
        rules = cls.rules()
        unknown = [k for k in values if k not in rules]
        if unknown:
            raise KeyError(f"unknown config key '{where}.{unknown[0]}' (known: {', '.join(rules)})")
        kw = {}
        for name, (default, rule) in rules.items():
            value = values.get(name, default)
            problem = rule.problem(value)
            if problem:
                raise ValueError(f"config key '{where}.{name}' must be {problem}, got {value!r}")
            kw[name] = value
        opts = cls(**kw)
        opts.check(where)
        return opts

    @classmethod
    def of(cls, section: Mapping[str, Any]) -> ConfigSection:
        """The values of a config's section as this dataclass, unchecked (defaults for keys it lacks;
        keys it does not declare are left out). Read key by key: a free-form sub-section's contents are
        taken as they are, unresolved."""
        kw = {}
        for name in cls.rules():
            if name in section:
                value = section[name]
                if isinstance(value, (DictConfig, ListConfig)):
                    value = OmegaConf.to_container(value, resolve=isinstance(value, ListConfig))
                kw[name] = value
        return cls(**kw)

    def check(self, where: str) -> None:
        """Relations between keys (one ``ValueError`` naming them); none by default."""


#: the name method plugins know the base of their sections by
MethodConfig = ConfigSection


def _plain(section: Any) -> dict[str, Any]:
    if section is None:
        return {}
    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
    return dict(section)
