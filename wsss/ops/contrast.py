"""Token contrast (ToCo, Ru et al., CVPR 2023): the two contrastive losses and where their inputs
come from.

- :func:`token_grid_labels` / :func:`token_pair_labels`: token labels from the auxiliary CAM
  (two background scores, uncertain tokens ignored) and the same / different pairs they imply.
- :func:`patch_token_contrast` (PTC): pulls the final-layer patch tokens of a pair with the same
  token label together (|cosine| -> 1) and pushes pairs with different labels apart (|cosine| -> 0).
- :func:`uncertain_regions` / :func:`sample_local_crops`: local crops centred in the CAM's
  uncertain or background regions, each flagged positive when it holds enough uncertain / object
  area.
- :func:`class_token_contrast` (CTC): an InfoNCE between the teacher's projected class tokens of the
  global views and the student's projected class tokens of every view, the negative local crops
  forming the negatives.

Everything is batched; random draws come from an optional ``torch.Generator`` and land on the
inputs' device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.ops.views import uniform
from wsss.refine.labels import affinity_labels, box_mask, cam_to_label

# ------------------------------------------------------------------------------------------------
# Patch token contrast


def grid_box_mask(img_box: Tensor, size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """(B, h, w) bool: tokens whose centre pixel lies inside the image box.

    img_box: (B, 4) long [row0, row1, col0, col1] in pixels of an (H, W) = ``size`` input; grid: (h, w).
    The official code slices the token map with the pixel box (every token kept when the box starts
    at 0, none when it starts beyond the grid); mapping by token centres keeps the real tokens.
    """
    hh, ww = size
    rows = ((torch.arange(grid[0], device=img_box.device) + 0.5) * hh / grid[0]).long().clamp_(max=hh - 1)
    cols = ((torch.arange(grid[1], device=img_box.device) + 0.5) * ww / grid[1]).long().clamp_(max=ww - 1)
    return box_mask(img_box, size)[:, rows][:, :, cols]


def token_grid_labels(
    cam: Tensor,
    labels: Tensor,
    grid: tuple[int, int],
    high: float,
    low: float,
    bkg_score: float,
    img_box: Tensor | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Token labels from a normalised CAM (ToCo's PTC targets).

    The CAM (B, K, H, W) in [0, 1] is resized bilinearly to ``grid`` and thresholded as
    :func:`~wsss.refine.labels.cam_to_label` does with ``high`` / ``low`` (value > high -> its class,
    low < value <= high -> ``ignore_index``, value <= low -> background); tokens outside ``img_box``
    (pixels of the (H, W) input) are ignored. Returns (B, h, w) long.
    """
    size = tuple(cam.shape[-2:])
    cam_g = F.interpolate(cam, size=grid, mode="bilinear", align_corners=False)
    label = cam_to_label(cam_g, labels, bkg_score=bkg_score, high=high, low=low, ignore_index=ignore_index)
    if img_box is None:
        return label
    return label.masked_fill(~grid_box_mask(img_box, size, grid), ignore_index)  # type: ignore[arg-type]


def token_pair_labels(token_label: Tensor, ignore_index: int = 255) -> Tensor:
    """(B, h, w) token labels -> (B, N, N) pair labels: 1 same label, 0 different, ``ignore_index``
    for pairs with an ignored token and for the diagonal (a token with itself teaches nothing)."""
    grid = tuple(token_label.shape[-2:])
    n = grid[0] * grid[1]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=token_label.device)
    return affinity_labels(token_label, grid, off_diagonal, sampling="center", ignore_index=ignore_index)


def patch_token_contrast(tokens: Tensor, target: Tensor) -> Tensor:
    """PTC loss on a token map (B, D, h, w) with pair labels (B, N, N) (1 / 0 / ignored).

    S = |cos(t_i, t_j)| over all token pairs of an image (fp32). With P / Q the positive / negative
    pairs of the whole batch:
        loss = 0.5 * (1 - sum_P S / (|P| + 1)) + 0.5 * sum_Q S / (|Q| + 1).
    """
    z = F.normalize(tokens.flatten(2).float(), p=2, dim=1, eps=1e-8)  # (B, D, N)
    sim = torch.bmm(z.transpose(1, 2), z).abs()
    pos = target == 1
    neg = target == 0
    pos_term = (sim * pos).sum() / (pos.sum() + 1)
    neg_term = (sim * neg).sum() / (neg.sum() + 1)
    return 0.5 * (1.0 - pos_term) + 0.5 * neg_term


# ------------------------------------------------------------------------------------------------
# Local crops from uncertain regions


def uncertain_regions(cam: Tensor, labels: Tensor, high: float, low: float) -> Tensor:
    """(B, H, W) long region map of a normalised CAM (B, K, H, W): 0 background (max over the
    present classes <= low), 2 confident object (>= high), 1 uncertain (in between)."""
    value = (cam * labels[:, :, None, None].to(cam.dtype)).amax(dim=1)
    region = torch.ones(value.shape, dtype=torch.long, device=cam.device)
    return region.masked_fill_(value <= low, 0).masked_fill_(value >= high, 2)


def _gather_windows(images: Tensor, top: Tensor, left: Tensor, size: int) -> Tensor:
    """Square windows of (B, C, H, W) at top-left corners (B, n) -> (B, n, C, size, size)."""
    steps = torch.arange(size, device=images.device)
    rows = (top[:, :, None] + steps)[:, :, :, None]  # (B, n, s, 1)
    cols = (left[:, :, None] + steps)[:, :, None, :]  # (B, n, 1, s)
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 1, 4, 2, 3)


def sample_local_crops(
    images: Tensor,
    region: Tensor,
    num_crops: int,
    crop_size: int,
    negative_ratio: float = 0.2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Local crops centred on uncertain or background pixels (ToCo's CTC local views).

    images: (B, C, H, W); region: (B, H, W) long from :func:`uncertain_regions`.
    A centre is drawn uniformly without replacement among the pixels at least ``crop_size // 2``
    from the top / left border (and ``crop_size - crop_size // 2`` from the bottom / right) whose
    region is 0 or 1; an image with fewer such pixels than ``num_crops`` draws among all of them.
    A crop is positive when its mean region value (0 / 1 / 2) exceeds ``negative_ratio``, i.e. it
    is not (almost) all background.
    Returns crops (B, num_crops, C, crop_size, crop_size) and positive (B, num_crops) bool.
    """
    b, _, h, w = images.shape
    margin = crop_size // 2
    inner = (h - 2 * margin, w - 2 * margin)
    if inner[0] * inner[1] < num_crops or min(inner) <= 0:
        raise ValueError(
            f"local crops of {crop_size} px need an input larger than {crop_size} px with room for "
            f"{num_crops} centres, got {h}x{w}"
        )
    # candidate (top, left) corners index the inner window of the region map (its centre pixels)
    centres = region[:, margin : margin + inner[0], margin : margin + inner[1]].flatten(1)
    candidate = centres <= 1
    few = candidate.sum(dim=1, keepdim=True) < num_crops
    candidate = candidate | few
    scores = uniform(tuple(candidate.shape), generator, images.device).masked_fill_(~candidate, -1.0)
    pick = scores.topk(num_crops, dim=1).indices  # uniform draw without replacement
    top, left = pick // inner[1], pick % inner[1]
    crops = _gather_windows(images, top, left, crop_size)
    share = _gather_windows(region[:, None].to(images.dtype), top, left, crop_size).mean(dim=(-3, -2, -1))
    return crops, share > negative_ratio


# ------------------------------------------------------------------------------------------------
# Class token contrast


def class_token_contrast(
    student: Tensor, teacher: Tensor, positive: Tensor, temperature: float, eps: float = 1e-4
) -> Tensor:
    """CTC loss (the official ``CTCLoss_neg``), computed in log space.

    student: (B, V, P) projected class tokens of all V views (the T global views first);
    teacher: (B, T, P) the teacher's projections of the global views; positive: (B, V) bool (the
    global views and the positive local crops). With s_tv = exp(<teacher_t, student_v> / temperature)
    and N_t = sum of s_tv over the negative views v:
        l_b = sum_t [ sum_{v positive} -log(s_tv / (s_tv + N_t + eps)) + log(1 + N_t + eps) ]
              / (T * (|positive_b| + eps)),
    and the loss is the mean of l_b over the batch.
    """
    t = teacher.shape[1]
    z = torch.einsum("btp,bvp->btv", teacher.float(), student.float()) / temperature
    pos = positive[:, None, :].expand_as(z)
    log_eps = z.new_full((*z.shape[:2], 1), math.log(eps))
    log_neg = torch.logsumexp(torch.cat([z.masked_fill(pos, float("-inf")), log_eps], dim=-1), dim=-1)
    pos_terms = ((torch.logaddexp(z, log_neg[..., None]) - z) * pos).sum(dim=-1)  # (B, T)
    extra = F.softplus(log_neg)  # log(1 + N_t + eps)
    per_image = (pos_terms + extra).sum(dim=-1) / (t * (positive.sum(dim=1) + eps))
    return per_image.mean()
