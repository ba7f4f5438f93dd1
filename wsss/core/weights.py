"""Reading and loading weights safely.

Weights are read with ``safetensors`` or ``torch.load(weights_only=True)``: a checkpoint can never
run code. Loading is strict by default and reports missing, unexpected and mis-shaped keys by name.
Foreign formats are converted by each backbone family's ``checkpoint_filter_fn`` before loading.
A run's training state (optimiser, schedule, resumable checkpoints) is :mod:`wsss.engine.checkpoint`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)

# Wrapper keys under which training scripts nest the real state dict.
_NESTED_KEYS = ("model", "state_dict", "model_state", "module", "net")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# Weight files of a model directory (Hugging Face layout), in order of preference.
WEIGHT_FILES = (
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
)  # fmt: skip


def cache_dir() -> Path:
    """The user's wsss cache folder (converted weights and the like): ``$WSSS_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/wsss``, else ``~/.cache/wsss``. Not created here."""
    if os.environ.get("WSSS_CACHE_DIR"):
        return Path(os.environ["WSSS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wsss"


def resolve_weights(path: str | os.PathLike) -> Path:
    """The weights file of ``path``: a file as is; for a directory the first of :data:`WEIGHT_FILES`
    (a sharded checkpoint is named by its ``*.index.json``), else its single ``.pth`` / ``.pt`` /
    ``.safetensors`` file."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.pth")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"{path} holds no single weights file ({', '.join(WEIGHT_FILES)}, *.pth)")


def _read_sharded(index: Path) -> dict[str, Tensor]:
    """Merge the shards listed in a Hugging Face ``*.index.json`` (``weight_map``: name -> shard file)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index} is not a sharded-checkpoint index (no 'weight_map'): {err}") from err
    out: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(read_state_dict(index.parent / shard))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} tensors of the index are in no shard: {missing[:5]}")
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a flat ``name -> tensor`` dict from ``.safetensors``, ``.pth``, ``.pt`` or ``.bin``, or
    the shards of a Hugging Face ``*.index.json``.

    Nested training checkpoints (``{"model": ...}``, ``{"state_dict": ...}``) are unwrapped and a
    DDP ``module.`` prefix is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: object = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupted, truncated, or holds pickled objects
        raise CheckpointError(
            f"could not read checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
        ) from err
    for _ in range(3):
        if isinstance(sd, Mapping) and not _is_flat(sd):
            inner = next((sd[k] for k in _NESTED_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
            if inner is None:
                break
            sd = inner
    if not isinstance(sd, Mapping) or not _is_flat(sd):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return strip_prefix(dict(sd), "module.")


def _is_flat(sd: Mapping) -> bool:
    return len(sd) > 0 and all(isinstance(v, Tensor) for v in sd.values())


def strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` from every key that has it (all or nothing is not required)."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str = "checkpoint",
    allow_missing: Iterable[str] = (),
) -> None:
    """Load ``state_dict`` into ``model`` strictly, with an error that names every problem.

    allow_missing: key prefixes that may be absent (e.g. freshly initialised heads).
    """
    own = model.state_dict()
    allow = tuple(allow_missing)
    missing = [k for k in own if k not in state_dict and not k.startswith(allow)]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(dict(state_dict), strict=False)


def load_pretrained(
    model: M, path: str | os.PathLike, filter_fn: Callable[[dict[str, Tensor], M], dict[str, Tensor]]
) -> M:
    """The one pretrained-weights loader: read ``path`` (a file, or a directory holding one weights file,
    :func:`resolve_weights`), convert it with the family's ``filter_fn(state_dict, model)`` (foreign
    names -> native ones) and load it strictly (:func:`load_into`). Returns ``model``."""
    file = resolve_weights(path)
    load_into(model, filter_fn(read_state_dict(file), model), source=str(file))
    return model
