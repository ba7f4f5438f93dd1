"""Pixel-Adaptive Refinement (PAR), as in AFA (``wetr/PAR.py``) and AReAM (``networks/PAR.py``).

Every pixel p has 48 neighbours: for each dilation d in ``dilations`` the 8 ring positions of a 3x3
stencil scaled by d, in the order (-1,-1), (-1,0), (-1,+1), (0,-1), (0,+1), (+1,-1), (+1,0), (+1,+1)
(row, col). The centre is not a neighbour; borders use replicate padding. The kernel

    K(p, n) = w_rgb * softmax_n(k_rgb(p, n)) + w2 * softmax_n(k_pos(n))
    k_rgb(p, n) = -mean_ch (|I_ch(n) - I_ch(p)| / (std_ch(p) + 1e-8) / w1)^2
    k_pos(n)    = -(dist_n / (std(dist) + 1e-8) / w_pos_temp)^2

is computed once from the image (``std_ch(p)`` is the unbiased std of the 48 neighbour values, the
centre excluded; ``dist`` is d for axis and d*sqrt(2) for diagonal neighbours) and applied
``num_iter`` times: X(p) <- sum_n K(p, n) X(n). Rows of K sum to w_rgb + w2 = 1.01 (not renormalised,
as in the official code).

Implementation notes: the maps live in a buffer padded with the largest dilation (replicate padding
of any width clamps to the same border values, so every neighbour is a shifted view of that one
padded buffer; two buffers take turns over the iterations, their views made once) and the weighted
sum is accumulated neighbour by neighbour, so the (B, C, 48, H, W) gather of the official
one-hot-convolution code is never materialised. Channels are independent, so any number
of maps (several images' class subsets, the high/low background stacks) is refined in one call.

A caller that refines several score maps of one image holds its kernel in an :class:`ImageKernel`
(computed on first use) and passes it to each call: ``par(image01, maps, kernel=held.kernel)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: on CPU, maps are propagated in blocks of about this many bytes per intra-op thread (see
#: PAR.propagate): each elementwise pass splits a block between the threads, so a block of
#: threads x 512 KiB keeps each core's share in its L2. Measured with 2 threads (2 MiB L2 per core):
#: 1 MiB blocks beat 512 KiB ones by 16-29% on every map set tried, and larger ones on all but the
#: smallest (1.2 MB, best in one block); with 1 thread 512 KiB beat 1 MiB by 17-25% on the larger maps.
CPU_BLOCK_BYTES_PER_THREAD = 512 * 1024


def cpu_block_bytes(t: Tensor) -> int | None:
    """Bytes of maps a blocked loop over ``t``'s images / channels should take at once on a CPU:
    ``CPU_BLOCK_BYTES_PER_THREAD`` per intra-op thread, so each core's share stays in its L2. None
    off the CPU (one block: the device has no such caches to fit)."""
    if t.device.type != "cpu":
        return None
    return CPU_BLOCK_BYTES_PER_THREAD * torch.get_num_threads()


# The official AFA recipe's PAR (the config's ``par`` section defaults to these)
PAR_DILATIONS = (1, 2, 4, 8, 12, 24)  # ring dilations: 8 neighbours each, 48 in all
PAR_NUM_ITER = 10  # propagation iterations (VOC; the official COCO recipe uses 15)
PAR_W1 = 0.3  # temperature of the colour term
PAR_W2 = 0.01  # weight of the positional term
PAR_DOWNSCALE = 2  # the pseudo labels run PAR at 1/PAR_DOWNSCALE of the image size

# 3x3 ring without the centre, row-major (the order of the official one-hot conv kernel)
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(row, col) offsets of the 8 * len(dilations) neighbours, dilation-major."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in _RING]


def neighbour_distances(dilations: Sequence[int]) -> Tensor:
    """(8 * len(dilations),) float64 Euclidean distances of the neighbours to the centre."""
    return torch.tensor([math.hypot(dy, dx) for dy, dx in neighbour_offsets(dilations)], dtype=torch.float64)


class PAR(nn.Module):
    """Pixel-adaptive refinement of score maps with an image-dependent local kernel.

    Args:
        dilations: ring dilations; 8 neighbours each (official: 1, 2, 4, 8, 12, 24 -> 48).
        num_iter: propagation iterations (official: 10 VOC, 15 COCO).
        w1: temperature of the colour term (official 0.3; the paper's c_I = w1^2).
        w2: weight of the positional term (official 0.01; the paper's w_L / w3).
        w_pos_temp: temperature of the positional term; None reuses ``w1`` (what the official code
            does; the paper's c_L = w_pos_temp^2).
        w_rgb: weight of the colour term (official 1; the paper's w_I).
    """

    def __init__(
        self,
        dilations: Sequence[int] = PAR_DILATIONS,
        num_iter: int = PAR_NUM_ITER,
        w1: float = PAR_W1,
        w2: float = PAR_W2,
        w_pos_temp: float | None = None,
        w_rgb: float = 1.0,
    ) -> None:
        super().__init__()
        if not dilations or min(dilations) < 1:
            raise ValueError(f"dilations must be positive integers, got {dilations}")
        self.dilations = tuple(int(d) for d in dilations)
        self.num_iter = int(num_iter)
        self.w1 = float(w1)
        self.w2 = float(w2)
        self.w_pos_temp = self.w1 if w_pos_temp is None else float(w_pos_temp)
        self.w_rgb = float(w_rgb)
        self.offsets = neighbour_offsets(self.dilations)
        self.pad = max(self.dilations)
        self._pos_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    @classmethod
    def from_paper(
        cls,
        c_I: float,  # noqa: N803 (paper notation)
        c_L: float,  # noqa: N803
        w_I: float = 1.0,  # noqa: N803
        w_L: float = PAR_W2,  # noqa: N803
        dilations: Sequence[int] = PAR_DILATIONS,
        num_iter: int = PAR_NUM_ITER,
    ) -> PAR:
        """AReAM eq. 11-12: w_I * softmax(-(dI/sigma_I)^2 / c_I) + w_L * softmax(-(d/sigma_L)^2 / c_L).

        The official code corresponds to c_I = c_L = 0.3^2 = 0.09, w_I = 1, w_L = 0.01.
        """
        return cls(dilations, num_iter, w1=math.sqrt(c_I), w2=w_L, w_pos_temp=math.sqrt(c_L), w_rgb=w_I)

    def extra_repr(self) -> str:
        return (
            f"dilations={self.dilations}, num_iter={self.num_iter}, w1={self.w1}, w2={self.w2}, "
            f"w_pos_temp={self.w_pos_temp}, w_rgb={self.w_rgb}"
        )

    @property
    def num_neighbours(self) -> int:
        return len(self.offsets)

    def positional_weights(
        self, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """(48,) softmax of the positional logits (an image-independent constant), cached per device."""
        key = (torch.device(device or "cpu"), dtype)
        if key not in self._pos_cache:
            dist = neighbour_distances(self.dilations).to(torch.float32)
            logits = -(dist / (dist.std() + 1e-8) / self.w_pos_temp) ** 2
            self._pos_cache[key] = logits.softmax(0).to(device=key[0], dtype=dtype)
        return self._pos_cache[key]

    def _shifted(self, padded: Tensor, size: tuple[int, int]) -> list[Tensor]:
        """Views of ``padded`` (.., H+2P, W+2P) shifted to each neighbour, each (.., H, W)."""
        h, w = size
        p = self.pad
        return [padded[..., p + dy : p + dy + h, p + dx : p + dx + w] for dy, dx in self.offsets]

    def _pad(self, x: Tensor) -> Tensor:
        return F.pad(x, [self.pad] * 4, mode="replicate")

    def kernel(self, image01: Tensor) -> Tensor:
        """Refinement kernel K(p, n) (held for several refinements of one image: :class:`ImageKernel`).

        Args:
            image01: (B, 3, H, W) image (any channel count works), values in [0, 1].
        Returns:
            (B, 48, H, W) weights; each pixel's weights sum to w_rgb + w2.
        """
        if image01.dim() != 4:
            raise ValueError(f"image01 must be (B, 3, H, W), got {tuple(image01.shape)}")
        return self._kernel(image01)

    def _kernel(self, image01: Tensor) -> Tensor:
        size = image01.shape[-2:]
        views = self._shifted(self._pad(image01), size)  # 48 x (B, 3, H, W) strided views
        n = len(views)
        # Two-pass unbiased std over the neighbours (as torch.std), accumulated view by view so no
        # 48-wide buffer is ever built.
        mean = torch.zeros_like(image01)
        for v in views:
            mean.add_(v)
        mean.div_(n)
        var = torch.zeros_like(image01)
        for v in views:
            d = v - mean
            var.addcmul_(d, d)
        # k_rgb(p, n) = -mean_ch (|I_n - I_p| / (std + 1e-8) / w1)^2 = -sum_ch (I_n - I_p)^2 * inv
        inv = var.div_(n - 1).sqrt_().add_(1e-8).mul_(self.w1).pow_(-2).div_(image01.shape[1])
        k = image01.new_empty(image01.shape[0], n, *size)
        for i, v in enumerate(views):
            d = v - image01
            torch.sum(d.mul_(d).mul_(inv), dim=1, out=k[:, i])
        k = k.neg_().softmax(dim=1)
        if self.w_rgb != 1.0:
            k.mul_(self.w_rgb)
        pos = self.positional_weights(image01.device, k.dtype)
        return k.add_(pos.view(1, -1, 1, 1), alpha=self.w2)

    def propagate(self, kernel: Tensor, maps: Tensor) -> Tensor:
        """Apply ``num_iter`` iterations of X(p) <- sum_n K(p, n) X(n).

        Args:
            kernel: (B, 48, H, W) from :meth:`kernel`.
            maps: (B, C, H, W) at the kernel's size.
        Returns:
            (B, C, H, W).
        """
        b, c = maps.shape[:2]
        plane = maps.shape[-2] * maps.shape[-1] * maps.element_size()
        block = cpu_block_bytes(maps)
        if block is None or b * c * plane <= block:
            return self._propagate(kernel, maps)
        # On CPU the 48 x num_iter passes over the maps are bound by memory traffic: run them on blocks
        # of images and channels (all independent) small enough to stay in the cores' caches.
        chans = min(c, max(1, block // plane))
        imgs = max(1, block // (chans * plane))
        out = torch.empty_like(maps)
        for i in range(0, b, imgs):
            for j in range(0, c, chans):
                out[i : i + imgs, j : j + chans] = self._propagate(
                    kernel[i : i + imgs], maps[i : i + imgs, j : j + chans]
                )
        return out

    def _propagate(self, kernel: Tensor, maps: Tensor) -> Tensor:
        b, c, h, w = maps.shape
        p = self.pad
        # Two padded buffers in turn: an iteration writes the interior of one from the 48 shifted views
        # of the other, then fills its border. The views are made once (not 48 slices per iteration)
        # and no padded copy is allocated per iteration; the arithmetic is the same, term by term.
        bufs = [maps.new_empty(b, c, h + 2 * p, w + 2 * p) for _ in range(2)]
        views = [self._shifted(buf, (h, w)) for buf in bufs]
        inner = [buf[..., p : p + h, p : p + w] for buf in bufs]
        inner[0].copy_(maps)
        self._fill_border(bufs[0], (h, w))
        weights = kernel.unsqueeze(2).unbind(1)  # 48 x (B, 1, H, W)
        src = 0
        for _ in range(self.num_iter):
            dst = 1 - src
            out = inner[dst]
            torch.mul(weights[0], views[src][0], out=out)  # the first term starts the sum
            for wn, xn in zip(weights[1:], views[src][1:]):
                out.addcmul_(wn, xn)
            self._fill_border(bufs[dst], (h, w))
            src = dst
        return inner[src].clone()

    def _fill_border(self, buf: Tensor, size: tuple[int, int]) -> None:
        """Replicate padding in place: the border of width ``pad`` of ``buf`` (.., H+2P, W+2P) copies the
        nearest interior pixel (rows first, then whole columns, so the corners copy the corner pixel),
        as ``F.pad(interior, [P] * 4, mode="replicate")``."""
        h, w = size
        p = self.pad
        buf[..., :p, p : p + w] = buf[..., p : p + 1, p : p + w]
        buf[..., p + h :, p : p + w] = buf[..., p + h - 1 : p + h, p : p + w]
        buf[..., :, :p] = buf[..., :, p : p + 1]
        buf[..., :, p + w :] = buf[..., :, p + w - 1 : p + w]

    def forward(self, image01: Tensor, maps: Tensor, kernel: Tensor | None = None, valid: Tensor | None = None
                ) -> Tensor:
        """Refine ``maps`` with the kernel of ``image01``.

        Args:
            image01: (B, 3, H, W) image in [0, 1].
            maps: (B, C, h, w) score maps; resized to (H, W) bilinearly with align_corners=True first
                when the sizes differ (as the AFA code does).
            kernel: :meth:`kernel` of ``image01`` when the caller holds it (:class:`ImageKernel`);
                None: computed for this call.
            valid: (B, C) bool, the channels to refine; the others come out 0 without being propagated
                (the padding channels of a batch's compact class stacks, zero maps that PAR keeps at
                zero). None: every channel.
        Returns:
            (B, C, H, W) refined maps.
        """
        if maps.dim() != 4 or maps.shape[0] != image01.shape[0]:
            raise ValueError(f"maps must be (B, C, h, w) with B={image01.shape[0]}, got {tuple(maps.shape)}")
        if valid is not None and tuple(valid.shape) != tuple(maps.shape[:2]):
            raise ValueError(f"valid must be (B, C) = {tuple(maps.shape[:2])}, got {tuple(valid.shape)}")
        if maps.shape[-2:] != image01.shape[-2:]:
            maps = F.interpolate(maps, size=image01.shape[-2:], mode="bilinear", align_corners=True)
        kernel = self.kernel(image01) if kernel is None else kernel
        if valid is None or bool(valid.all()):
            return self.propagate(kernel, maps)
        return self._propagate_valid(kernel, maps, valid.bool())

    def _propagate_valid(self, kernel: Tensor, maps: Tensor, valid: Tensor) -> Tensor:
        """:meth:`propagate` of the channels ``valid`` (B, C) marks, zeros elsewhere. Images with the same
        channels go together: a loop over the distinct rows of ``valid`` (a batch's class counts), not
        over images. Each channel's arithmetic is the same as in one call over all of them."""
        out = torch.zeros_like(maps)
        patterns, group = torch.unique(valid.to(torch.uint8), dim=0, return_inverse=True)
        for g, pattern in enumerate(patterns):
            chans = pattern.nonzero().squeeze(1)
            if chans.numel() == 0:
                continue
            rows = (group == g).nonzero()  # (n, 1): broadcasts against chans for the (n, c) selection
            out[rows, chans] = self.propagate(kernel[rows.squeeze(1)], maps[rows, chans])
        return out


class ImageKernel:
    """The PAR kernel of one image batch, held by a caller that refines several score maps of it (the
    evaluation's 'cam_par', 'aff_par', ... maps of a batch): computed the first time it is used, then
    reused. The image must not change in place while the kernel is held.

    ``par(image01, maps, kernel=held.kernel)`` is ``par(image01, maps)`` without computing the kernel
    again."""

    def __init__(self, par: PAR, image01: Tensor) -> None:
        self.par = par
        self.image01 = image01
        self._kernel: Tensor | None = None

    @property
    def kernel(self) -> Tensor:
        """(B, 48, H, W): :meth:`PAR.kernel` of the image, computed on first use."""
        if self._kernel is None:
            self._kernel = self.par.kernel(self.image01)
        return self._kernel

    def refine(self, maps: Tensor) -> Tensor:
        """``par(image01, maps)`` with the held kernel."""
        return self.par(self.image01, maps, kernel=self.kernel)
