"""``wsss analyze``: probes of a learned affinity (a method's affinity head) against the attention."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from wsss.analysis.hooks import LearnedAffinity
from wsss.methods.base import Method, resize
from wsss.model import WSSSNet
from wsss.ops.attention import attention_probs, slice_patches

# ---------------------------------------------------------------------------------------------
# A learned affinity (a method's affinity head): MHSA vs learned affinity, head weights
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def affinity_query_maps(method: Method, net: WSSSNet, x: Tensor, query: int | None = None) -> dict[str, Any]:
    """Attention vs learned affinity of one query token, image 0 of a padded batch x (B, 3, H, W).

    MHSA: head-mean softmax attention averaged over the layers the affinity is computed from;
    affinity: the method's learned affinity (``affinity_probe`` of
    :class:`~wsss.analysis.hooks.LearnedAffinity`).
    query: flat token index; by default the token with the highest CAM of the image's top class.
    Returns ``{"query": (row, col), "grid": (h, w), "mhsa": (h, w), "affinity": (h, w)}`` tensors on CPU.
    """
    if not isinstance(method, LearnedAffinity):
        raise ValueError(f"method '{method.name}' learns no affinity")
    probe = method.affinity_probe(net, x[:1])
    grid = tuple(probe["grid"])
    t = net.backbone.num_prefix_tokens
    mhsa = torch.stack([slice_patches(attention_probs(a), t)[0] for a in probe["attn"]]).mean(0)
    aff = probe["affinity"][0]
    if query is None:
        cam = resize(probe["cam"][:1].float(), grid)[0]  # (K, h, w)
        top = cam.flatten(1).amax(1).argmax()
        query = int(cam[top].flatten().argmax())
    return {"query": (query // grid[1], query % grid[1]), "grid": grid,
            "mhsa": mhsa[query].reshape(grid).cpu(), "affinity": aff[query].reshape(grid).cpu()}
