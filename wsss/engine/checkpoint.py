"""Resumable training state and the release format.

Training checkpoints (``ckpt_<iteration:08d>.pt``) hold the model (DDP unwrapped), optimiser,
scheduler, every RNG state, the iteration, the data position and the config. They are written
atomically (temp file in the same directory, fsync, ``os.replace``), so an interrupted save never
replaces a good checkpoint, and are read with ``torch.load(weights_only=True)``: RNG states are stored
as tensors and plain Python types, so no pickled object is ever loaded.

The release format is a directory with ``model.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from wsss.core.weights import CheckpointError, strip_prefix
from wsss.model import unwrap

_CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# RNG states as weights_only-loadable values
# ---------------------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """torch CPU (+ CUDA), numpy global and Python ``random`` states as tensors and plain types."""
    np_state = np.random.get_state()  # noqa: NPY002 - the global state is what code seeds and uses
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`get_rng_state` (the CUDA part is restored when CUDA is available)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np_state = (n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(np_state)  # noqa: NPY002
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_files(items: Sequence[tuple[str | os.PathLike, Callable[[str], None]]]) -> list[Path]:
    """Write every ``(path, write)`` all or nothing: ``write(tmp)`` fills a temp file beside ``path``
    (with ``path``'s suffix, so writers that pick the format from the name work), it is fsynced, and
    only when every file is written are they all renamed onto their paths. A failure (a full disk, an
    interrupt) removes the temp files and leaves every earlier file as it was. New files get the
    permissions of an ordinary file under the umask (``mkstemp`` alone makes them 0600)."""
    paths = [Path(p) for p, _ in items]
    tmps: list[str] = []
    try:
        for path, (_, write) in zip(paths, items):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
            os.close(fd)
            tmps.append(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for path, tmp in zip(paths, tmps):
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps:
            Path(tmp).unlink(missing_ok=True)
        raise
    for directory in dict.fromkeys(p.parent for p in paths):
        _fsync_dir(directory)
    return paths


def check_writable(directory: str | os.PathLike) -> None:
    """Raise an ``OSError`` naming the folder when ``directory`` (or, when it does not exist yet, the
    nearest folder above it) cannot be written: read-only, no permission, or a file in the way."""
    p = Path(directory).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "a file is in the way of the output folder", str(p))
    if not os.access(p, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "cannot write to the folder (read-only or permission denied)",
                              str(p))


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write through ``write(file)`` to a temp file next to ``path``, fsync, then ``os.replace`` it
    onto ``path``: a crash leaves either the old file or the new one, never a partial one."""

    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return atomic_write_files([(path, fill)])[0]


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (see :func:`_atomic_write`)."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def _atomic_write_bytes(data: bytes, path: Path) -> Path:
    return _atomic_write(path, lambda f: f.write(data))


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; not supported on every platform/filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Training state
# ---------------------------------------------------------------------------------------------


def checkpoint_path(run_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(run_dir) / f"ckpt_{int(iteration):08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Training checkpoints of ``run_dir`` sorted by iteration (temp files are never listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest iteration in ``run_dir``, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    iteration: int,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Write a resumable checkpoint atomically.

    path: a file, or a directory (then ``<dir>/ckpt_<iteration>.pt``). extra: plain values to keep
    (``epoch``, data-loader position, ``config`` dict, ...); it must hold only tensors and plain types.
    keep_last: after writing, delete all but the newest ``keep_last`` ``ckpt_*.pt`` of that directory
    (None keeps everything).
    """
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        path = checkpoint_path(path, iteration)
    state = {
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": get_rng_state(),
        "extra": dict(extra or {}),
    }
    atomic_save(state, path)
    if keep_last is not None and keep_last > 0:
        for old in list_checkpoints(path.parent)[:-keep_last]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def load_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; returns ``{"iteration": int, **extra}``.

    The model is loaded strictly (a DDP ``module.`` prefix in the file is stripped). Raises
    :class:`CheckpointError` for unreadable files.
    """
    path = Path(path)
    if path.is_dir():
        latest = find_latest(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {path}")
        path = latest
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"could not read training state {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, Mapping) or "model" not in state:
        raise CheckpointError(f"{path} is not a wsss training checkpoint")
    unwrap(model).load_state_dict(strip_prefix(state["model"], "module."), strict=True)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return {"iteration": int(state["iteration"]), **dict(state.get("extra") or {})}


# ---------------------------------------------------------------------------------------------
# Release format
# ---------------------------------------------------------------------------------------------


def export_model(model: nn.Module, config: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` (contiguous CPU tensors; shared storage is copied) and ``config.json``."""
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in unwrap(model).state_dict().items()}
    meta = {"format": "pt", "wsss_format_version": str(FORMAT_VERSION)}
    _atomic_write_bytes(sorted_header(save(sd, metadata=meta)), out / "model.safetensors")
    _atomic_write_bytes(json.dumps(dict(config), indent=2, sort_keys=True).encode(), out / "config.json")
    return out


def sorted_header(data: bytes) -> bytes:
    """A safetensors file with its JSON header re-written with sorted keys: the library writes the
    metadata in hash order, so identical weights could give different bytes (and checksums). The data
    section is untouched (its offsets do not depend on the header's key order)."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header with spaces to 8-byte alignment
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def import_model_state(out_dir: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a release directory: ``(state_dict, config)``."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    weights, cfg = out / "model.safetensors", out / "config.json"
    for f in (weights, cfg):
        if not f.is_file():
            raise FileNotFoundError(f"release directory {out} lacks {f.name}")
    try:
        sd = load_file(str(weights), device="cpu")
    except Exception as err:
        raise CheckpointError(f"could not read {weights}: {type(err).__name__}: {err}") from err
    return sd, json.loads(cfg.read_text())
