"""Batched random views of an image batch for contrastive losses (ToCo's second global view).

Images are (B, 3, H, W) RGB in [0, 1]; every image draws its own parameters from an optional
``torch.Generator``; the output has the input's device and dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_LUMA = (0.299, 0.587, 0.114)


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) draws from ``generator`` (made on the generator's device), moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def resized_crop_theta(
    batch: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_p: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """(B, 2, 3) affine matrices (``F.affine_grid`` convention) of random resized crops.

    Area fraction a ~ U(scale), log aspect ~ U(log ratio); the crop spans fw = min(1, sqrt(a r)) of
    the width and fh = min(1, sqrt(a / r)) of the height at a uniform position inside the image;
    mirrored with probability ``flip_p``.
    """
    u = uniform((batch, 5), generator, device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    fw = (area * log_r.exp()).sqrt().clamp(max=1.0)
    fh = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (1.0 - fw) * (2.0 * u[:, 2] - 1.0)
    cy = (1.0 - fh) * (2.0 * u[:, 3] - 1.0)
    sign = torch.where(u[:, 4] < flip_p, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = fw * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = fh, cy
    return theta


def random_resized_crop(
    images: Tensor,
    scale: tuple[float, float] = (0.4, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A random resized crop (bilinear) of each image back to its (H, W), mirrored with
    probability ``flip_p`` (see :func:`resized_crop_theta`)."""
    theta = resized_crop_theta(images.shape[0], scale, ratio, flip_p, generator, images.device)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gray(images: Tensor) -> Tensor:
    """ITU-R 601 luma (B, 1, H, W) of RGB images (B, 3, H, W)."""
    return (images * images.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def color_jitter(
    images: Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    p: float = 0.8,
    gray_p: float = 0.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Colour jitter on [0, 1] RGB images, applied to each image with probability ``p``, then a
    grayscale conversion with probability ``gray_p``.

    Factors are drawn from U(1 - s, 1 + s): brightness scales the image, contrast blends it with its
    mean luma, saturation with its luma image (in that fixed order); results are clamped to [0, 1].
    """
    u = uniform((images.shape[0], 5), generator, images.device).to(images.dtype)
    view = (-1, 1, 1, 1)
    on = (u[:, 0] < p).to(images.dtype).view(view)

    def factor(col: int, s: float) -> Tensor:
        f = (1.0 - s + 2.0 * s * u[:, col]).view(view)
        return on * f + (1.0 - on)  # 1 where the jitter is off

    out = (images * factor(1, brightness)).clamp(0.0, 1.0)
    c = factor(2, contrast)
    out = (c * out + (1.0 - c) * gray(out).mean(dim=(-2, -1), keepdim=True)).clamp(0.0, 1.0)
    s = factor(3, saturation)
    out = (s * out + (1.0 - s) * gray(out)).clamp(0.0, 1.0)
    to_gray = (u[:, 4] < gray_p).view(view)
    return torch.where(to_gray, gray(out).expand_as(out), out)
