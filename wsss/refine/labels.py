"""CAM -> pseudo labels: thresholds, PAR-refined labels, and token-pair affinity labels.

Conventions: class ids 0 = background, 1..K foreground, ``ignore_index`` (255) = ignore. ``labels`` are
(B, K) float multi-hot over the foreground classes; score stacks (B, K+1, ...) have channel 0 =
background. ``img_box`` is (B, 4) long [row0, row1, col0, col1], end-exclusive.

All functions are batched. Where the official code softmaxes over a per-image subset of channels
(background + present classes), the channels are gathered into a compact (B, M, ...) stack,
M = 1 + the largest number of present classes in the batch, with the padding channels masked to -inf
before the softmax: they come out exactly 0, which gives the same result as the per-image subset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.refine.par import PAR, PAR_DOWNSCALE, ImageKernel
from wsss.refine.resize import resize_bilinear

# The official AFA recipe's background scores (the config's ``eval.bkg_score``, ``cam.high``, ``cam.low``)
BKG_SCORE = 0.45  # a CAM at or below it is background (the validation-mode label)
CAM_HIGH = 0.55  # the pseudo label's high background score: foreground above it
CAM_LOW = 0.35  # the pseudo label's low background score: background at or below it (<= CAM_HIGH)

#: how a token takes the label of its cell (:func:`token_labels`, :func:`affinity_labels`)
SAMPLING = ("topleft", "center", "mode")


def box_mask(img_box: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) bool, True inside each image's box [row0:row1, col0:col1]."""
    h, w = size
    box = img_box.to(torch.long)
    rows = torch.arange(h, device=box.device)
    cols = torch.arange(w, device=box.device)
    in_rows = (rows[None] >= box[:, 0:1]) & (rows[None] < box[:, 1:2])  # (B, H)
    in_cols = (cols[None] >= box[:, 2:3]) & (cols[None] < box[:, 3:4])  # (B, W)
    return in_rows[:, :, None] & in_cols[:, None, :]


def _keep_with_bkg(labels: Tensor) -> Tensor:
    """(B, K) labels -> (B, K+1) bool: background (always kept) + present classes."""
    bkg = torch.ones_like(labels[:, :1], dtype=torch.bool)
    return torch.cat([bkg, labels > 0], dim=1)


def _softmax_keep(scores: Tensor, keep: Tensor, dim: int = 1) -> Tensor:
    """Softmax along ``dim`` over the channels where ``keep`` (B, C) is True; the others are exactly 0."""
    shape = [1] * scores.dim()
    shape[0], shape[dim] = keep.shape
    return scores.masked_fill(~keep.view(shape), float("-inf")).softmax(dim=dim)


def masked_softmax(scores: Tensor, labels: Tensor, dim: int = 1) -> Tensor:
    """Softmax over background + present classes.

    Args:
        scores: (B, K+1, ...) with channel 0 = background (channel axis ``dim``).
        labels: (B, K) multi-hot foreground labels.
    Returns:
        scores' shape; absent classes exactly 0.
    """
    return _softmax_keep(scores, _keep_with_bkg(labels), dim=dim)


def kept_channels(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Compact index of the kept channels of each row.

    keep: (B, C) bool. Returns idx (B, M) long, each row's kept channels first in ascending order,
    then (padding) unkept ones, and valid (B, M) bool, False on the padding; M = most kept in a row.
    """
    # a stable sort of the "dropped" flags puts the kept channels first, each group in channel order
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    idx = order[:, : int(keep.sum(dim=1).max()) if keep.numel() else 0]
    return idx, keep.gather(1, idx)


def present_index(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Compact channel index of background + present classes.

    Returns:
        idx: (B, M) long class ids (0 = background first, then present classes ascending, then padding
            with absent ids); valid: (B, M) bool, False on padding. M = 1 + max number present.
    """
    return kept_channels(_keep_with_bkg(labels))


def gather_channels(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, C, H, W), idx (B, M) -> (B, M, H, W): the channels ``idx`` of each row (e.g. the compact
    index of :func:`kept_channels` or :func:`present_index`)."""
    b, m = idx.shape
    return x.gather(1, idx.view(b, m, 1, 1).expand(b, m, *x.shape[-2:]))


def channel_max(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``scores.max(dim=1)`` for (B, C, ...): (values, indices), first maximum on ties.

    A strict running comparison over channels: CPU reductions over a short, non-innermost channel
    axis are several times slower than C elementwise passes."""
    if scores.shape[1] > 16:
        return scores.max(dim=1)
    best = scores[:, 0].clone()
    arg = torch.zeros(best.shape, dtype=torch.long, device=scores.device)
    for c in range(1, scores.shape[1]):
        better = scores[:, c] > best
        best = torch.where(better, scores[:, c], best)
        arg.masked_fill_(better, c)
    return best, arg


def channel_argmax(scores: Tensor) -> Tensor:
    """``scores.argmax(dim=1)`` (first maximum on ties), fast for few channels (see channel_max)."""
    return channel_max(scores)[1]


def _to_class_ids(scores: Tensor, idx: Tensor) -> Tensor:
    """Argmax over the compact channels of scores (B, M, H, W), mapped back to class ids (B, H, W)."""
    arg = channel_argmax(scores)
    return idx.gather(1, arg.flatten(1)).view_as(arg)


def _ignore_outside(label: Tensor, img_box: Tensor | None, ignore_index: int) -> Tensor:
    if img_box is None:
        return label
    return label.masked_fill(~box_mask(img_box, label.shape[-2:]), ignore_index)


def cam_to_label(
    cam: Tensor,
    labels: Tensor,
    bkg_score: float = BKG_SCORE,
    high: float | None = None,
    low: float | None = None,
    img_box: Tensor | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Threshold CAMs into a label map (official ``cam_to_label``).

    v = max_k y_k M_k, c = argmax + 1; 0 where v <= bkg_score. With ``high``: ignore where v <= high;
    then with ``low``: 0 where v <= low (so v > high -> class, low < v <= high -> ignore, v <= low -> 0).
    With ``img_box``: ignore outside the box. The official validation mode is the default (no
    high/low, no box); its training mode is ``high=0.55, low=0.35, img_box=...``.

    Args:
        cam: (B, K, H, W) CAMs in [0, 1].
        labels: (B, K) multi-hot labels (absent classes are zeroed before the max).
    Returns:
        (B, H, W) long.
    """
    valid = cam * labels[:, :, None, None].to(cam.dtype)
    value, arg = channel_max(valid)
    label = (arg + 1).masked_fill(value <= bkg_score, 0)
    if high is not None:
        label = label.masked_fill(value <= high, ignore_index)
    if low is not None:
        label = label.masked_fill(value <= low, 0)
    return _ignore_outside(label, img_box, ignore_index)


def combine_high_low(label_high: Tensor, label_low: Tensor, ignore_index: int = 255) -> Tensor:
    """Two-threshold rule: foreground from ``label_high``; background only where both say 0; else ignore.

    out = Lh; out[Lh == 0] = ignore; out[Lh == 0 and Ll == 0] = 0.
    """
    bkg_high = label_high == 0
    out = label_high.masked_fill(bkg_high, ignore_index)
    return out.masked_fill(bkg_high & (label_low == 0), 0)


def downscaled(image01: Tensor, downscale: int) -> Tensor:
    """The image the labels' PAR runs on: (B, 3, H // downscale, W // downscale), bilinear."""
    h, w = image01.shape[-2:]
    return F.interpolate(image01, size=(h // downscale, w // downscale), mode="bilinear", align_corners=False)


def _held_image(image01: Tensor, downscale: int, kernel: ImageKernel | None) -> Tensor:
    """:func:`downscaled` ``image01``, or the image of a held ``kernel`` after checking it is that one's
    size (a kernel is shared by the label functions of one batch, see :func:`par_pseudo_label`)."""
    if kernel is None:
        return downscaled(image01, downscale)
    h, w = image01.shape[-2:]
    want = (image01.shape[0], h // downscale, w // downscale)
    got = kernel.image01
    if (got.shape[0], *got.shape[-2:]) != want:
        raise ValueError(f"the held PAR kernel is of a (B, H, W) = {(got.shape[0], *got.shape[-2:])} image, "
                         f"the labels need {want}")
    return got


def _par_labels(
    image01: Tensor, stack: Tensor, idx: Tensor, valid: Tensor, par: PAR, out_size: tuple[int, int],
    kernel: ImageKernel | None = None,
) -> tuple[Tensor, Tensor]:
    """PAR on the concatenated high/low stacks (B, 2M, h, w), upsample, argmax -> (Lh, Ll) class ids.
    ``valid`` (B, M): the channels of each half that hold a class (the others are zero padding, not
    refined); ``kernel``: held for ``image01`` (None: computed for this call)."""
    refined = par(image01, stack, None if kernel is None else kernel.kernel, valid.repeat(1, 2))
    refined = F.interpolate(refined, size=out_size, mode="bilinear", align_corners=False)
    ref_h, ref_l = refined.chunk(2, dim=1)
    return _to_class_ids(ref_h, idx), _to_class_ids(ref_l, idx)


def par_pseudo_label(
    image01: Tensor,
    cam: Tensor,
    labels: Tensor,
    par: PAR,
    high: float = CAM_HIGH,
    low: float = CAM_LOW,
    img_box: Tensor | None = None,
    downscale: int = PAR_DOWNSCALE,
    ignore_index: int = 255,
    kernel: ImageKernel | None = None,
) -> Tensor:
    """PAR-refined two-threshold pseudo label (AFA ``refine_cams_with_bkg_v2``, AReAM ``cam_to_seg``).

    Both background scores are stacked along channels and refined in one PAR call at 1/``downscale``
    resolution (image and maps downsampled bilinearly); softmax over background + present classes;
    upsampled bilinearly to (H, W); argmax; :func:`combine_high_low`; ignore outside ``img_box``.

    Args:
        image01: (B, 3, H, W) image in [0, 1].
        cam: (B, K, H', W') CAMs in [0, 1] (absent classes are ignored whatever their values).
        labels: (B, K) multi-hot labels.
        par: the PAR module.
        kernel: PAR's kernel of ``downscaled(image01, downscale)`` held by a caller that refines
            another label of the same batch at that size (``ImageKernel(par, downscaled(...))``, e.g.
            AFA's propagated label): its kernel is computed once. None: computed for this call.
    Returns:
        (B, H, W) long labels in {0..K, ignore_index}.
    """
    b, _, h, w = image01.shape
    image_s = _held_image(image01, downscale, kernel)
    size = tuple(image_s.shape[-2:])
    idx, valid = present_index(labels)
    # compact foreground channels; idx[:, 0] is the background, so idx[:, 1:] >= 1. Gathered before the
    # (per-channel) resize: absent classes are never resized
    fg = gather_channels(cam, idx[:, 1:] - 1)
    # a batch of negatives only has no foreground channel: interpolate refuses an empty stack
    fg = F.interpolate(fg, size=size, mode="bilinear", align_corners=False) if fg.shape[1] else fg.new_zeros(
        b, 0, *size)
    stacks = [torch.cat([fg.new_full((b, 1, *size), s), fg], dim=1) for s in (high, low)]
    stack = torch.cat([_softmax_keep(s, valid) for s in stacks], dim=1)
    lab_h, lab_l = _par_labels(image_s, stack, idx, valid, par, (h, w), kernel)
    return _ignore_outside(combine_high_low(lab_h, lab_l, ignore_index), img_box, ignore_index)


def _refine_in_box(
    image01: Tensor, maps: Tensor, idx: Tensor, valid: Tensor, par: PAR, box: tuple[int, int, int, int],
    downscale: int,
) -> tuple[Tensor, Tensor]:
    """Images with one box: crop to it, PAR at 1/downscale of the box size, back to box size -> (Lh,
    Ll), each (n, bh, bw)."""
    r0, r1, c0, c1 = box
    img = image01[:, :, r0:r1, c0:c1]
    bh, bw = img.shape[-2:]
    return _par_labels(downscaled(img, downscale), maps[:, :, r0:r1, c0:c1], idx, valid, par, (bh, bw))


def _present_score_stack(
    scores_high: Tensor, scores_low: Tensor, idx: Tensor, valid: Tensor, size: tuple[int, int]
) -> Tensor:
    """The compact channels ``idx`` (B, M) of both score stacks (B, K+1, h, w), at ``size`` (H, W):
    (B, 2M, H, W), high then low; the padding channels (``valid`` False) are 0."""
    # scores are >= 0 and padding channels hold absent classes' values: zero them, as the official
    # code scatters the refined present classes into a zero tensor
    stack = torch.cat([scores_high, scores_low], dim=0)
    # gathered before the (per-channel) resize: absent classes are never resized
    stack = gather_channels(stack, idx.repeat(2, 1)) * valid.repeat(2, 1)[:, :, None, None].to(stack.dtype)
    if stack.shape[-2:] != size:
        stack = resize_bilinear(stack, size)
    return torch.cat(stack.chunk(2, dim=0), dim=1)  # (B, 2M, H, W): high then low


def _refine_per_box(
    image01: Tensor, stack: Tensor, idx: Tensor, valid: Tensor, par: PAR, img_box: Tensor, downscale: int
) -> tuple[Tensor, Tensor]:
    """PAR labels (Lh, Ll), each (B, H, W) long, with every image refined inside its own box (0 outside).

    image01: (B, 3, H, W); stack: (B, 2M, H, W) high then low; idx: (B, M) class ids of the channels,
    valid (B, M) those that hold a class; img_box: (B, 4) long."""
    b, _, h, w = image01.shape
    lab_h = torch.zeros((b, h, w), dtype=torch.long, device=image01.device)
    lab_l = torch.zeros_like(lab_h)
    # images with the same box (e.g. every one that fills the crop) are refined in one call: each
    # image's result is the same as alone
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, box in enumerate(img_box.tolist()):
        groups.setdefault(tuple(box), []).append(i)
    for box, rows in groups.items():
        r0, r1, c0, c1 = box
        sel = torch.tensor(rows, device=image01.device)
        lab_h[sel, r0:r1, c0:c1], lab_l[sel, r0:r1, c0:c1] = _refine_in_box(
            image01[sel], stack[sel], idx[sel], valid[sel], par, box, downscale  # type: ignore[arg-type]
        )
    return lab_h, lab_l


def par_refine_scores_label(
    image01: Tensor,
    scores_high: Tensor,
    scores_low: Tensor,
    labels: Tensor,
    par: PAR,
    img_box: Tensor,
    crop_to_box: bool = True,
    ignore_index: int = 255,
    downscale: int = PAR_DOWNSCALE,
    kernel: ImageKernel | None = None,
) -> Tensor:
    """PAR-refined label from propagated score stacks (AFA ``refine_cams_with_cls_label`` + combine).

    The channels background + present classes of both stacks are refined by PAR (no extra softmax),
    argmax gives Lh / Ll, :func:`combine_high_low` combines them, and pixels outside ``img_box`` are
    ignored.

    ``crop_to_box=True`` (faithful): per image, the image and maps are cropped to the box, the image is
    downsampled to half of the box size, PAR resizes the maps to it (align_corners=True), and the
    result is upsampled back to the box. This is the one loop over images of the module: boxes
    differ between images, so only images with the same box (e.g. all that fill the crop) are
    batched. ``crop_to_box=False`` (fast): one batched PAR call over the whole crop at half
    resolution; identical when every box is the whole crop, and slightly different near box borders
    otherwise. ``downscale``: PAR runs at 1/downscale resolution
    (official: 2, as for :func:`par_pseudo_label`; the config's ``par.downscale`` governs both).

    Args:
        image01: (B, 3, H, W) image in [0, 1].
        scores_high, scores_low: (B, K+1, h, w) non-negative propagated scores (channel 0 background),
            e.g. from :func:`~wsss.refine.propagation.propagate_affinity`; upsampled to (H, W)
            bilinearly first when at token resolution (what the official caller does).
        labels: (B, K) multi-hot labels.
        img_box: (B, 4) long boxes.
        kernel: as in :func:`par_pseudo_label`, for ``crop_to_box=False`` (the per-box refinement
            runs on each box's own image).
    Returns:
        (B, H, W) long labels.
    """
    b, _, h, w = image01.shape
    idx, valid = present_index(labels)
    stack = _present_score_stack(scores_high, scores_low, idx, valid, (h, w))
    if crop_to_box:
        if kernel is not None:
            raise ValueError("par_refine_scores_label: a held PAR kernel is of the whole crop; "
                             "crop_to_box=True refines each image in its box")
        lab_h, lab_l = _refine_per_box(image01, stack, idx, valid, par, img_box, downscale)
    else:
        image_s = _held_image(image01, downscale, kernel)
        lab_h, lab_l = _par_labels(image_s, stack, idx, valid, par, (h, w), kernel)
    return _ignore_outside(combine_high_low(lab_h, lab_l, ignore_index), img_box, ignore_index)


def par_argmax_label(image01: Tensor, scores: Tensor, labels: Tensor, par: PAR, kernel: Tensor | None = None
                     ) -> Tensor:
    """PAR-refined argmax label of a score stack (the 'cam_par' / 'aff_par' evaluation maps).

    Softmax over background + present classes, PAR at the image size (PAR resizes the maps), argmax
    over those classes (first maximum on ties). Only the background and present channels are gathered
    and refined: PAR treats channels independently and an absent class can never win, so this equals
    refining all K+1 channels, at about M / (K+1) of the work (M = 1 + classes present).

    Args:
        image01: (B, 3, H, W) image in [0, 1].
        scores: (B, K+1, h, w), channel 0 = background.
        labels: (B, K) multi-hot labels.
        kernel: PAR's kernel of ``image01`` when the caller holds it (:class:`~wsss.refine.par.ImageKernel`).
    Returns:
        (B, H, W) long class ids.
    """
    idx, valid = present_index(labels)
    probs = _softmax_keep(gather_channels(scores, idx), valid)
    refined = par(image01, probs, kernel, valid).masked_fill(~valid[:, :, None, None], float("-inf"))
    return _to_class_ids(refined, idx)


def token_labels(label: Tensor, grid: tuple[int, int], sampling: str = "topleft") -> Tensor:
    """(B, H, W) pixel labels -> (B, h, w) token labels, sampled as in :func:`affinity_labels`."""
    hh, ww = label.shape[-2:]
    if sampling == "topleft":
        # PyTorch nearest: pixel floor(i * H / h), the top-left pixel of each cell (official)
        return F.interpolate(label[:, None].float(), size=grid, mode="nearest")[:, 0].to(label.dtype)
    if sampling == "center":
        rows = ((torch.arange(grid[0], device=label.device) + 0.5) * hh / grid[0]).long().clamp_(max=hh - 1)
        cols = ((torch.arange(grid[1], device=label.device) + 0.5) * ww / grid[1]).long().clamp_(max=ww - 1)
        return label[:, rows][:, :, cols]
    # majority vote per cell (adaptive pooling cells); ties -> the smallest label value
    values = torch.unique(label)
    onehot = (label[:, None] == values[None, :, None, None]).float()
    counts = F.adaptive_avg_pool2d(onehot, grid)
    return values[counts.argmax(dim=1)]


def affinity_labels(
    label: Tensor,
    grid: tuple[int, int],
    window: Tensor | None = None,
    sampling: str = "topleft",
    ignore_index: int = 255,
) -> Tensor:
    """Token-pair affinity labels (AFA ``cams_to_affinity_label``, AReAM ``seg_to_aff``).

    Y[b, i, j] = 1 if the tokens' labels are equal else 0 (background-background pairs and the
    diagonal are positives); ``ignore_index`` for pairs outside ``window`` and for every row and column
    of a token labelled ``ignore_index``.

    Args:
        label: (B, H, W) long pixel labels.
        grid: (h, w) token grid, N = h * w.
        window: optional (N, N) bool mask (AFA: square radius 8; AReAM: None).
        sampling: "topleft" (official: PyTorch nearest), "center" (the cell's centre pixel) or "mode"
            (majority label of the cell, ignore included).
    Returns:
        (B, N, N) long in {0, 1, ignore_index}.
    """
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    tok = token_labels(label, tuple(grid), sampling).flatten(1)  # (B, N)
    aff = (tok[:, :, None] == tok[:, None, :]).long()
    ign = tok == ignore_index
    ign = ign[:, :, None] | ign[:, None, :]
    if window is not None:
        ign = ign | ~window.to(device=aff.device, dtype=torch.bool)
    return aff.masked_fill_(ign, ignore_index)


def oracle_affinity(target: Tensor) -> Tensor:
    """The ground-truth affinity (B, N, N) float from affinity labels (B, N, N) in {0, 1, ignore}: 1
    for pairs of the same class and for every token with itself, 0 otherwise. The self pair keeps a
    token whose label is ignored (void boundaries, an uncertain cell) at its own score instead of
    zeroing it, so the oracle is a ceiling and not a handicap."""
    eye = torch.eye(target.shape[-1], dtype=torch.bool, device=target.device)
    return ((target == 1) | eye).to(torch.float32)


def pair_agreement(aff: Tensor, target: Tensor, background: Tensor | None = None) -> Tensor:
    """Sums over the labelled token pairs, to be accumulated over a dataset.

    Args:
        aff: (B, N, N) predicted affinity in [0, 1].
        target: (B, N, N) long in {0, 1, 255 = ignored} (:func:`wsss.refine.labels.affinity_labels`).
        background: optional (B, N) bool, the tokens whose label is background: the positives of the
            other rows are the foreground (same-object-class) pairs, usually few beside the
            background pairs.
    Returns:
        float64 (8,): [sum of aff on positives, #positives, sum of aff on negatives, #negatives,
        #pairs whose (aff > 0.5) equals the label, #labelled pairs, sum of aff on foreground
        positives, #foreground positives] (the last two 0 without ``background``).
    """
    a = aff.double()
    pos, neg = target == 1, target == 0
    correct = ((a > 0.5) == pos) & (pos | neg)
    fg = pos & ~background[:, :, None] if background is not None else torch.zeros_like(pos)
    return torch.stack([
        (a * pos).sum(), pos.sum().double(), (a * neg).sum(), neg.sum().double(),
        correct.sum().double(), (pos | neg).sum().double(), (a * fg).sum(), fg.sum().double(),
    ]).cpu()


def present_mask(labels: Tensor) -> Tensor:
    """(B, K+1) bool: background plus the present classes."""
    return torch.cat([labels.new_ones(labels.shape[0], 1), labels], dim=1) > 0
