"""Loading trained wsss models and foreign backbone weights from paths or the Hugging Face hub.

* :func:`load_run`: a wsss release directory (``model.safetensors`` + ``config.json``), a run directory
  (its ``model/`` or else its newest ``checkpoints/ckpt_*.pt`` with ``config.yaml``) or a training
  checkpoint file (config from ``extra["config"]``) -> ``(WSSSNet, cfg, class_names)``.
* :func:`from_pretrained`: the same for wsss artefacts; a foreign backbone checkpoint (MiT/SegFormer
  ``.pth``, Hugging Face SegFormer directory / safetensors, DeiT/ViT/MCTformer ``.pth``, Conformer ``.pth``)
  -> that backbone, its family and size detected from key names and tensor shapes
  (:func:`detect_backbone`); a hub id ``org/name`` -> downloaded with ``huggingface_hub`` (optional extra
  ``wsss[hub]``), then loaded as a local path.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from wsss.core.registry import BACKBONE_DETECTORS
from wsss.core.weights import CheckpointError, read_state_dict, resolve_weights
from wsss.engine.runs import (  # noqa: F401 - re-exported: wsss.api.hub is where users look for loaders
    config_from_dict,
    default_class_names,
    is_release_dir,
    is_wsss_artifact,
    load_run,
)
from wsss.model import import_backbones

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.yaml", "*.safetensors", "*.bin", "*.pth", "*.pt"]
NETWORK_PROBE_S = 3.0  # how long a hub download waits for the network before giving up
ETAG_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------------------------
# Foreign backbone checkpoints
# ---------------------------------------------------------------------------------------------


def detect_backbone(state_dict: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """Family and size of a foreign backbone state dict, from key names and tensor shapes only
    (meta tensors are fine). Returns ``(registered backbone name, builder kwargs)``, e.g.
    ``("mit_b1", {})``, ``("vit_small", {})``, ``("mctformer_v2_small", {"num_classes": 20})``."""
    from wsss.core.weights import strip_prefix

    sd = strip_prefix(dict(state_dict), "module.")
    import_backbones()
    for detect in BACKBONE_DETECTORS:  # each family tells its own checkpoints apart
        found = detect(sd)
        if found is not None:
            return found
    keys = ", ".join(list(sd)[:6])
    raise CheckpointError(f"cannot tell the backbone family of a checkpoint with keys {keys}, ... "
                          f"(known: MiT/SegFormer, ViT/DeiT/MCTformer, Conformer, EfficientNet-Lite0)")


def load_backbone(path: str | os.PathLike, backbone: str | None = None, **kw: Any) -> nn.Module:
    """A backbone with the weights of a foreign checkpoint, built through its family's
    ``pretrained=`` path. ``backbone`` forces the registered name; ``kw`` go to the builder."""
    from wsss.core.registry import BACKBONES

    file = resolve_weights(path)
    name, detected = detect_backbone(read_state_dict(file))
    import_backbones()
    return BACKBONES.build(backbone or name, pretrained=str(file), **{**detected, **kw})


# ---------------------------------------------------------------------------------------------
# Hugging Face hub
# ---------------------------------------------------------------------------------------------


def _offline_hint(repo_id: str) -> str:
    return (f"download it on a machine with network access (e.g. `huggingface-cli download {repo_id} "
            f"--local-dir {repo_id.split('/')[-1]}`), copy the folder here and pass its local path instead")


def _network_reachable(url: str, timeout: float) -> bool:
    """True when a TCP connection to the endpoint's host opens within ``timeout`` (DNS included)."""
    host = re.sub(r"^https?://", "", url).split("/")[0].split(":")[0]
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # DNS lookups ignore socket timeouts
    t.start()
    t.join(timeout)
    return bool(ok)


def hub_download(repo_id: str, revision: str | None = None) -> Path:
    """Local snapshot of a hub repo: the cache first, then the network (failing within seconds when it
    is unreachable or ``HF_HUB_OFFLINE=1``), with a message that says how to provide it offline."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as err:
        raise ImportError(f"loading '{repo_id}' from the Hugging Face hub needs huggingface_hub "
                          f"(pip install 'wsss[hub]'); or {_offline_hint(repo_id)}") from err
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS,
                                      local_files_only=True))
    except Exception:  # not cached: go online below
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or bool(
        getattr(constants, "HF_HUB_OFFLINE", False))
    endpoint = str(getattr(constants, "ENDPOINT", "https://huggingface.co"))
    if offline or not _network_reachable(endpoint, NETWORK_PROBE_S):
        why = "HF_HUB_OFFLINE is set" if offline else f"{endpoint} cannot be reached"
        raise FileNotFoundError(
            f"hub repo '{repo_id}' is not in the local cache and {why}: {_offline_hint(repo_id)}"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS,
                                      etag_timeout=ETAG_TIMEOUT_S))
    except Exception as err:  # HTTP errors, timeouts, missing repos: one message with the remedy
        msg = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        hint = _offline_hint(repo_id)
        raise FileNotFoundError(f"could not download hub repo '{repo_id}': {msg}; {hint}") from err


def from_pretrained(path_or_hub_id: str | os.PathLike, backbone: str | None = None, **kw: Any) -> nn.Module:
    """A trained ``WSSSNet`` (wsss release dir, run dir or training checkpoint) or a foreign backbone
    with its weights (family and size detected; ``backbone`` forces the name, ``kw`` go to its builder),
    from a local path or a Hugging Face hub id ``org/name`` (``revision=`` optional)."""
    revision = kw.pop("revision", None)
    p = Path(path_or_hub_id)
    if not p.exists():
        s = str(path_or_hub_id)
        if _HUB_ID.match(s) and not s.startswith((".", "/")):
            return from_pretrained(hub_download(s, revision), backbone=backbone, **kw)
        raise FileNotFoundError(f"no such file or directory: {p} (nor a hub id of the form 'org/name')")
    if is_wsss_artifact(p):
        if backbone is not None or kw:
            raise ValueError(f"{p} is a trained wsss model; backbone options {sorted(kw)} do not apply")
        return load_run(p)[0]
    return load_backbone(p, backbone, **kw)
