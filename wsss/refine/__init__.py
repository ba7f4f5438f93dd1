"""Refinement stage: PAR, affinity propagation, window masks, pseudo / affinity labels and the bilinear
resize of token-grid maps."""

from wsss.refine.labels import (
    affinity_labels,
    box_mask,
    cam_to_label,
    channel_argmax,
    channel_max,
    combine_high_low,
    downscaled,
    masked_softmax,
    par_argmax_label,
    par_pseudo_label,
    par_refine_scores_label,
    present_index,
)
from wsss.refine.par import PAR, ImageKernel, neighbour_distances, neighbour_offsets
from wsss.refine.propagation import (
    propagate_affinity,
    propagate_affinity_plain,
    propagate_affinity_scores,
    window_mask,
)
from wsss.refine.resize import interpolation_matrix, resize_bilinear

__all__ = [
    "PAR",
    "ImageKernel",
    "affinity_labels",
    "box_mask",
    "cam_to_label",
    "channel_argmax",
    "channel_max",
    "combine_high_low",
    "downscaled",
    "interpolation_matrix",
    "masked_softmax",
    "neighbour_distances",
    "neighbour_offsets",
    "par_argmax_label",
    "par_pseudo_label",
    "par_refine_scores_label",
    "present_index",
    "propagate_affinity",
    "propagate_affinity_plain",
    "propagate_affinity_scores",
    "resize_bilinear",
    "window_mask",
]
