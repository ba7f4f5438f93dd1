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

from wsss.checkpoint import CheckpointError, read_state_dict, resolve_weights
from wsss.engine.runs import (  # noqa: F401 - re-exported: wsss.hub is where users look for loaders
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


def _mit_name(sd: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]] | None:
    from wsss.backbones.mit import _CONFIGS, checkpoint_filter_fn

    native = checkpoint_filter_fn(sd)
    if "patch_embed1.proj.weight" not in native:
        return None
    dims = tuple(int(native[f"patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5)
                 if f"patch_embed{i}.proj.weight" in native)
    depths = tuple(
        len({int(m[1]) for k in native if (m := re.match(rf"block{i}\.(\d+)\.", k))}) for i in range(1, 5)
    )
    for name, c in _CONFIGS.items():
        if tuple(c["embed_dims"]) == dims and tuple(c["depths"]) == depths:
            return name, {}
    raise CheckpointError(f"MiT checkpoint with embed dims {dims} and depths {depths} matches no MiT size "
                          f"({', '.join(_CONFIGS)})")


def _vit_name(sd: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]] | None:
    from wsss.backbones.vit import _SHAPES, _from_hf, detect_format

    fmt = detect_format(dict(sd))
    native = dict(sd) if fmt == "timm" else _from_hf(dict(sd), fmt)
    w = native.get("patch_embed.proj.weight")
    if w is None or not any(k.startswith("blocks.") for k in native):
        return None
    dim = int(w.shape[0])
    depth = len({int(m[1]) for k in native if (m := re.match(r"blocks\.(\d+)\.", k))})
    size = next((s for s, (d, n, _) in _SHAPES.items() if d == dim and n == depth), None)
    if size is None:
        raise CheckpointError(f"ViT checkpoint with embed dim {dim} and depth {depth} matches no ViT size "
                              f"({', '.join(f'{s}: {d}x{n}' for s, (d, n, _) in _SHAPES.items())})")
    kw: dict[str, Any] = {}
    p = int(w.shape[-1]) if w.ndim == 4 else 16
    if p != 16:
        kw["patch_size"] = p
    tokens = int(native["cls_token"].shape[1]) if "cls_token" in native else 1
    pos = native.get("pos_embed")
    if pos is not None:
        n_patch = pos.shape[1] - tokens - (1 if "dist_token" in native else 0)
        g = int(round(n_patch**0.5))
        if g * g == n_patch and g * p != 224:
            kw["img_size"] = g * p
    if tokens > 1:  # one class token per class: MCTformer-V2
        return f"mctformer_v2_{size}", {"num_classes": tokens, **kw}
    return f"vit_{size}", kw


def _conformer_name(sd: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]] | None:
    if "trans_patch_conv.weight" not in sd or "conv_1.conv3.weight" not in sd:
        return None
    dim = int(sd["trans_patch_conv.weight"].shape[0])
    c1 = int(sd["conv_1.conv3.weight"].shape[0])
    stem = int(sd["conv1.weight"].shape[0]) if "conv1.weight" in sd else 64
    sizes = {("conformer_s", 384, 256, 64), ("conformer_ti", 384, 64, 64), ("conformer_micro", 64, 16, 16)}
    for name, d, c, s in sizes:
        if (d, c, s) == (dim, c1, stem):
            return name, {}
    raise CheckpointError(f"Conformer checkpoint with embed dim {dim}, first stage {c1} channels and stem "
                          f"{stem} matches no Conformer size (conformer_s, conformer_ti, conformer_micro)")


def _efficientnet_name(sd: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]] | None:
    from wsss.backbones.efficientnet import is_efficientnet_lite

    if not is_efficientnet_lite(dict(sd)):
        return None
    fc = next((v for k, v in sd.items() if k.endswith("_fc.weight")), None)
    return "efficientnet_lite0", ({"num_classes": int(fc.shape[0])} if fc is not None else {})


def detect_backbone(state_dict: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """Family and size of a foreign backbone state dict, from key names and tensor shapes only
    (meta tensors are fine). Returns ``(registered backbone name, builder kwargs)``, e.g.
    ``("mit_b1", {})``, ``("vit_small", {})``, ``("mctformer_v2_small", {"num_classes": 20})``."""
    from wsss.checkpoint import strip_prefix

    sd = strip_prefix(dict(state_dict), "module.")
    for detect in (_conformer_name, _efficientnet_name, _mit_name, _vit_name):
        found = detect(sd)
        if found is not None:
            return found
    keys = ", ".join(list(sd)[:6])
    raise CheckpointError(f"cannot tell the backbone family of a checkpoint with keys {keys}, ... "
                          f"(known: MiT/SegFormer, ViT/DeiT/MCTformer, Conformer, EfficientNet-Lite0)")


def load_backbone(path: str | os.PathLike, backbone: str | None = None, **kw: Any) -> nn.Module:
    """A backbone with the weights of a foreign checkpoint, built through its family's
    ``pretrained=`` path. ``backbone`` forces the registered name; ``kw`` go to the builder."""
    from wsss.registry import BACKBONES

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
