"""Pure tensor maths shared by the methods: CAMs, attention affinities, losses."""

from wsss.ops.attention import (
    aream_affinity_loss,
    attention_probs,
    class_token_attention,
    entropy_weights,
    fuse_layers,
    fusion_weights,
    layer_affinity,
    layer_entropy,
    layer_logit_mean,
    loss_weights,
    online_entropy_weights,
    refine_by_affinity,
    slice_patches,
)
from wsss.ops.cam_fusion import AFA_FUSE, AREAM_FUSE, fuse_multiscale, multiscale_cam, normalize_cam
from wsss.ops.losses import (
    affinity_loss,
    affinity_loss_logits,
    energy_loss,
    multilabel_soft_margin,
    seg_loss_bg_fg,
    window_bilateral_filter,
)

__all__ = [
    "AFA_FUSE",
    "AREAM_FUSE",
    "aream_affinity_loss",
    "affinity_loss",
    "affinity_loss_logits",
    "attention_probs",
    "class_token_attention",
    "energy_loss",
    "entropy_weights",
    "fuse_layers",
    "fuse_multiscale",
    "fusion_weights",
    "layer_affinity",
    "layer_entropy",
    "layer_logit_mean",
    "loss_weights",
    "multilabel_soft_margin",
    "multiscale_cam",
    "normalize_cam",
    "online_entropy_weights",
    "refine_by_affinity",
    "seg_loss_bg_fg",
    "slice_patches",
    "window_bilateral_filter",
]
