"""AReAM attention maths: layer affinities, refinement, entropy-based layer weights, affinity loss.

Inputs are the backbone's **scaled** pre-softmax logits (B, heads, N, N) with the T prefix (class)
tokens first, N = T + Np (``docs/methods/aream.md`` 4). Layers are 0-based; with a split index k the "shallow"
layers [0, k) are fused into the pseudo-label affinity and the "deep" layers [k, L) are supervised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from wsss.ops.cam_fusion import normalize_cam
from wsss.ops.losses import affinity_loss_logits


def upcast(x: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32 (softmax, log and sums of affinities need the range)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _stack(maps: Sequence[Tensor] | Tensor) -> Tensor:
    """A list of L tensors (B, ...) or an already stacked (L, B, ...) tensor -> (L, B, ...)."""
    return maps if isinstance(maps, Tensor) else torch.stack(list(maps), 0)


def attention_probs(logits: Tensor) -> Tensor:
    """Head-mean attention over all tokens: logits (B, heads, N, N) -> mean_h softmax_keys (B, N, N).

    Usable as a backbone ``attn_reduce`` (``lambda l, x: attention_probs(x)``) to avoid holding per-head maps.
    """
    return upcast(logits).softmax(dim=-1).mean(dim=1)


def layer_affinity(logits: Tensor, num_prefix: int, renormalize: bool = False) -> Tensor:
    """Patch-to-patch affinity of one layer: logits (B, heads, N, N) -> (B, Np, Np), row = query.

    Softmax over **all** N keys, mean over heads, slice [T:, T:]. Official: not renormalised (each row
    sums to 1 minus its mass on prefix tokens); ``renormalize=True`` divides each row by its sum.
    """
    return slice_patches(attention_probs(logits), num_prefix, renormalize)


def slice_patches(probs: Tensor, num_prefix: int, renormalize: bool = False) -> Tensor:
    """(..., N, N) head-mean attention over all tokens -> (..., Np, Np) patch block.

    ``renormalize`` divides each row by its sum (default off, as the official code).
    """
    aff = probs[..., num_prefix:, num_prefix:]
    if renormalize:
        aff = aff / aff.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(aff.dtype).tiny)
    return aff


def layer_logit_mean(logits: Tensor, num_prefix: int) -> Tensor:
    """Head-mean of the pre-softmax logits, patch block: (B, heads, N, N) -> (B, Np, Np).

    This is the input of the AReAM affinity loss (sigmoid is applied there).
    """
    return logits[:, :, num_prefix:, num_prefix:].mean(dim=1)


def class_token_attention(
    probs: Sequence[Tensor] | Tensor, num_classes: int, grid: tuple[int, int]
) -> Tensor:
    """MCTformer class-to-patch attention (``docs/methods/aream.md`` 4).

    probs: per-layer head-mean softmax maps over all tokens, a list of L (B, N, N) or (L, B, N, N)
    (see :func:`attention_probs`), the K class tokens first. Returns the mean over the given layers of
    rows 0:K, columns K:, reshaped to (B, K, h, w) with grid = (h, w). AReAM uses all 12 layers.
    """
    stacked = _stack(probs)
    cls = stacked[:, :, :num_classes, num_classes:].mean(dim=0)
    return cls.reshape(cls.shape[0], num_classes, *grid)


def refine_by_affinity(cam: Tensor, aff: Tensor, transpose: bool = False) -> Tensor:
    """Affinity refinement R(i) = sum_j A[i, j] M(j) (``docs/methods/aream.md`` 5).

    cam: (B, K, h, w); aff: (B, Np, Np) with Np = h*w, row = query. ``transpose=True`` uses A^T
    (TransCAM's ``attnagg`` variant, not AReAM). Returns (B, K, h, w).
    """
    b, k, h, w = cam.shape
    dtype = torch.promote_types(aff.dtype, torch.float32)  # fp32 at least, also under bf16 autocast
    flat = cam.reshape(b, k, h * w).to(dtype)
    with torch.autocast(cam.device.type, enabled=False):
        # (B, K, Np) x (B, Np, Np): M A^T gives sum_j A[i, j] M(j); M A gives sum_j A[j, i] M(j).
        out = flat @ (aff if transpose else aff.transpose(1, 2)).to(dtype)
    return out.reshape(b, k, h, w)


def fuse_layers(
    affs: Sequence[Tensor] | Tensor,
    weights: Tensor | None = None,
    normalize: Literal["k", "sum"] = "k",
) -> Tensor:
    """Fuse L layer affinities (L, B, Np, Np) (or a list) into one (B, Np, Np).

    weights None: uniform mean. weights (L,) or per-image (B, L): ``"k"`` gives the official
    (1/L) sum_l w_l A_l (not divided by sum w, the later min-max makes the scale irrelevant);
    ``"sum"`` gives sum_l w_l A_l / sum_l w_l (a convex combination).
    """
    stacked = _stack(affs)
    if weights is None:
        return stacked.mean(dim=0)
    weights = weights.to(device=stacked.device, dtype=stacked.dtype)
    num_layers = stacked.shape[0]
    if weights.ndim == 1:
        if weights.shape[0] != num_layers:
            raise ValueError(f"{weights.shape[0]} weights for {num_layers} layers")
        fused = torch.einsum("l,lbij->bij", weights, stacked)
        denom = weights.sum() if normalize == "sum" else weights.new_tensor(float(num_layers))
        return fused / denom
    if weights.ndim == 2:
        if weights.shape[1] != num_layers:
            raise ValueError(f"per-image weights {tuple(weights.shape)} do not match {num_layers} layers")
        fused = torch.einsum("bl,lbij->bij", weights, stacked)
        denom = (
            weights.sum(1) if normalize == "sum" else weights.new_full((weights.shape[0],), float(num_layers))
        )
        return fused / denom.view(-1, 1, 1)
    raise ValueError(f"weights must be (L,) or (B, L), got {tuple(weights.shape)}")


def layer_entropy(
    cam: Tensor,
    affs: Sequence[Tensor] | Tensor,
    labels: Tensor,
    base: float = 2.0,
    eps: float = 0.0,
) -> Tensor:
    """Per-layer, per-image entropy of the refined CAM (official offline pass, ``docs/methods/aream.md`` 6.2).

    cam: (B, K, h, w) CAM (official: MCTformer ReLU conv CAM, Conformer raw CAM; not normalised);
    affs: L patch affinities (L, B, Np, Np) (or a list); labels: (B, K) multi-hot, the CAM is restricted
    to these classes. For each layer l: s = sum_c A_l M_c (an Np-vector), p = softmax(s) over Np,
    e_l = -sum p log_base(p + eps). With eps = 0 (MCTformer) the term 0 * log 0 is taken as 0 instead
    of the official NaN; the Conformer script uses eps = 1e-6. Returns (L, B).
    """
    stacked = upcast(_stack(affs))
    b, k, h, w = cam.shape
    # Refinement is linear, so sum_c A M_c = A (sum_c y_c M_c).
    summed = (cam.reshape(b, k, h * w).to(stacked.dtype) * labels.to(stacked.dtype).unsqueeze(-1)).sum(1)
    s = torch.einsum("lbij,bj->lbi", stacked, summed)
    p = s.softmax(dim=-1)
    plogp = torch.special.xlogy(p, p) if eps == 0.0 else p * torch.log(p + eps)
    return -plogp.sum(-1) / torch.log(torch.tensor(base, dtype=p.dtype, device=p.device))


def entropy_weights(entropy: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max normalise entropies over the layer axis (last): (L,) or (B, L) -> same shape in [0, 1].

    The lowest-entropy layer gets 0 and the highest 1 (official: done once on the dataset-mean vector).
    If all layers tie (max - min <= eps) every entry is 0.5: no layer is preferred, fusion and loss
    weights are then equal across layers.
    """
    lo = entropy.amin(dim=-1, keepdim=True)
    span = entropy.amax(dim=-1, keepdim=True) - lo
    tied = span <= eps
    ent = (entropy - lo) / torch.where(tied, torch.ones_like(span), span)
    return torch.where(tied, torch.full_like(ent, 0.5), ent)


def fusion_weights(ent: Tensor, layer_index: int) -> Tensor:
    """Fusion weights 1 - ent_l of the shallow layers [0, layer_index): (..., L) -> (..., layer_index)."""
    return 1.0 - ent[..., :layer_index]


def loss_weights(
    ent: Tensor | None,
    layer_index: int,
    mode: Literal["entropy", "uniform"] = "entropy",
    num_layers: int | None = None,
) -> Tensor:
    """Loss weights of the deep layers [layer_index, L): ent_l (``"entropy"``) or ones (``"uniform"``).

    ent: (..., L). For ``"uniform"`` ent may be None when ``num_layers`` is given.
    """
    if mode == "entropy":
        if ent is None:
            raise ValueError("entropy loss weights need the entropy vector")
        return ent[..., layer_index:]
    if mode == "uniform":
        total = ent.shape[-1] if ent is not None else num_layers
        if total is None:
            raise ValueError("uniform loss weights need ent or num_layers")
        device = ent.device if ent is not None else None
        return torch.ones(total - layer_index, device=device)
    raise ValueError(f"mode must be 'entropy' or 'uniform', got {mode!r}")


def online_entropy_weights(
    cam: Tensor,
    affs: Sequence[Tensor] | Tensor,
    labels: Tensor,
    normalized_cam: bool = True,
    base: float = 2.0,
    eps: float = 0.0,
) -> Tensor:
    """Paper-style (eq. 7-8) per-image layer weights from the current model: -> (B, L) in [0, 1].

    An **interpretation** (``docs/methods/aream.md`` 6.1, 6.4), not the official behaviour: the detached CAM
    (min-max normalised when ``normalized_cam``, as the paper's M-hat) is refined by every layer,
    :func:`layer_entropy` gives e (L, B), and the entropies are min-max normalised across layers per
    image (:func:`entropy_weights`). Use ``1 - w`` of the shallow layers for fusion and ``w`` of the deep
    ones for the loss; the batch-pooled affinity loss takes one weight per layer, e.g. ``w.mean(0)``.
    Note that with normalised CAMs the softmax over positions is nearly uniform, so the differences
    between layers are small and the min-max amplifies them.
    """
    with torch.no_grad():
        cam = cam.detach()
        if normalized_cam:
            cam = normalize_cam(cam)
        ent = layer_entropy(cam, affs, labels, base=base, eps=eps)
        return entropy_weights(ent.transpose(0, 1))


def aream_affinity_loss(
    logit_means: Mapping[int, Tensor] | Sequence[Tensor],
    target: Tensor,
    weights: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """AReAM affinity loss over the supervised (deep) layers (``docs/methods/aream.md`` 8.2).

    logit_means: per-layer head-mean logits (B, Np, Np) (:func:`layer_logit_mean`), a list or a dict
    layer -> tensor (taken in increasing layer order); target: (B, Np, Np) in {0, 1, 255};
    weights: (L_deep,) or None (uniform). ``"mean"`` (official): mean_l w_l L_l; ``"sum"`` (paper eq. 16):
    sum_l w_l L_l. Returns a float32 scalar.
    """
    maps = (
        [logit_means[k] for k in sorted(logit_means)]
        if isinstance(logit_means, Mapping)
        else list(logit_means)
    )
    if not maps:
        raise ValueError("aream_affinity_loss needs at least one layer")
    losses = torch.stack([affinity_loss_logits(z, target) for z in maps])
    if weights is not None:
        if weights.shape != losses.shape:
            raise ValueError(f"weights {tuple(weights.shape)} do not match {len(maps)} layers")
        losses = losses * weights.to(losses)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
