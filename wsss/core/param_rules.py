"""Parameter groups of the official recipes: :class:`ParamRule` lists (first match wins) and
:func:`build_param_groups`. The presets live in :data:`wsss.core.registry.PARAM_RULES` (the config's
``optim.param_rules``): the default one every method may use, ``afa`` (:func:`afa_rules`), is
registered here; a recipe with parameter groups of its own registers them in its method file."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from wsss.core.registry import PARAM_RULES

Matcher = Callable[[str, nn.Parameter], bool]


# ---------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamRule:
    """Assigns an lr multiplier and a weight decay to the parameters it matches.

    match: ``f(name, param) -> bool`` or a regular expression searched in the name.
    weight_decay: None = the optimiser's default. exclude: drop matched parameters from the optimiser.
    """

    match: Matcher | str
    lr_mult: float = 1.0
    weight_decay: float | None = None
    name: str = ""
    exclude: bool = False

    def matches(self, name: str, param: nn.Parameter) -> bool:
        if isinstance(self.match, str):
            return re.search(self.match, name) is not None
        return bool(self.match(name, param))


def prefix(*prefixes: str) -> Matcher:
    """Matcher: the name starts with one of ``prefixes``."""
    return lambda name, _p: name.startswith(prefixes)


def contains(*parts: str) -> Matcher:
    """Matcher: the name contains one of ``parts``."""
    return lambda name, _p: any(s in name for s in parts)


def both(a: Matcher, b: Matcher) -> Matcher:
    return lambda name, p: a(name, p) and b(name, p)


def no_decay(extra_names: Iterable[str] = ()) -> Matcher:
    """Matcher of timm's ``add_weight_decay``: 1-D tensors, ``*.bias`` and the listed names (compared
    with the last component of the parameter name, so ``backbone.cls_token`` matches ``cls_token``)."""
    names = frozenset(extra_names)
    return lambda name, p: p.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in names


def build_param_groups(
    model: nn.Module, rules: Sequence[ParamRule], base_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Optimiser groups from ``rules`` (first match wins; unmatched parameters go to a default group
    with lr x1 and ``weight_decay``). Parameters with ``requires_grad=False`` and excluded ones are left
    out; empty groups are dropped. Each group: ``params, lr, weight_decay, lr_mult, name``."""
    buckets: list[list[nn.Parameter]] = [[] for _ in range(len(rules) + 1)]
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        idx = next((i for i, r in enumerate(rules) if r.matches(pname, param)), len(rules))
        if idx < len(rules) and rules[idx].exclude:
            continue
        buckets[idx].append(param)
    specs = [(r.name or f"rule{i}", r.lr_mult, r.weight_decay) for i, r in enumerate(rules)]
    specs.append(("default", 1.0, None))
    groups = []
    for params, (gname, mult, wd) in zip(buckets, specs):
        if params:
            groups.append({"params": params, "lr": base_lr * mult, "lr_mult": mult, "name": gname,
                           "weight_decay": weight_decay if wd is None else wd})
    return groups


@PARAM_RULES.register("afa")
def afa_rules(encoder_prefix: str = "backbone.", norm: str = "freeze", head_mult: float = 10.0,
              aff_head_mult: float | None = None, aff_head_prefix: str = "aff_head.") -> list[ParamRule]:
    """AFA ``WeTr.get_param_groups`` (docs/methods/afa.md 9).

    Encoder parameters with "norm" in the name: ``norm="freeze"`` (official: lr 0, wd 0, still held by
    the optimiser), ``"train"`` (lr x1, no weight decay) or ``"drop"`` (left out of the optimiser, so no
    Adam moments are kept; they receive no update). Other encoder parameters: lr x1, default wd
    (biases included, as official). Everything else (classifier, AFA head, decoder): ``head_mult``.

    The default preset of every method (the config's ``optim.param_rules: afa``): method heads fall in
    "heads".

    ``aff_head_mult``: the affinity head's own multiplier (None: ``head_mult``, as official), for the
    parameters under ``aff_head_prefix`` (AFA's head, ``AFAMethod.HEAD``). AdamW
    moves a weight by about lr per step, so in a short schedule the head's 1x1 conv (13 numbers,
    initial std 0.58) stays near its random init at x10 (400 steps x 6e-4 = 0.24 at most).
    """
    enc = prefix(encoder_prefix)
    norm_rule = {
        "freeze": ParamRule(both(enc, contains("norm")), lr_mult=0.0, weight_decay=0.0, name="encoder_norm"),
        "train": ParamRule(both(enc, contains("norm")), lr_mult=1.0, weight_decay=0.0, name="encoder_norm"),
        "drop": ParamRule(both(enc, contains("norm")), name="encoder_norm", exclude=True),
    }
    if norm not in norm_rule:
        raise ValueError(f"norm must be 'freeze', 'train' or 'drop', got '{norm}'")
    aff = [] if aff_head_mult is None else [
        ParamRule(prefix(aff_head_prefix), lr_mult=aff_head_mult, name="aff_head")]
    return [norm_rule[norm], ParamRule(enc, name="encoder"), *aff,
            ParamRule(lambda _n, _p: True, lr_mult=head_mult, name="heads")]
