"""Per-pixel majority vote of several label maps of one image (the pseudo labels of several first-stage
runs): each run loses different classes (docs/results.md, real photographs), so a class that one run
misses is usually kept by the others."""

from __future__ import annotations

import torch
from torch import Tensor


def majority_vote(labels: Tensor, ignore_index: int = 255, min_votes: int = 1) -> tuple[Tensor, Tensor]:
    """The label most voters give each pixel; a tie goes to the label of the earliest voter among the tied.

    Args:
        labels: (N, ...) integer label maps of N voters, in priority order (voter 0 breaks ties first);
            ``ignore_index`` is an abstention, not a vote.
        ignore_index: the uncertain value, in and out.
        min_votes: a pixel whose winning label has fewer votes comes out ``ignore_index`` (1: every
            pixel with a vote is labelled; N: only where every voter agrees).
    Returns:
        label (...) int64 and votes (...) int64, the winning label's vote count (0 where all abstain).
    """
    if labels.dim() < 1 or labels.shape[0] < 1:
        raise ValueError(f"labels must be (N, ...) with N >= 1 voters, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer label maps, got {labels.dtype}")
    if min_votes < 1:
        raise ValueError(f"min_votes must be >= 1, got {min_votes}")
    n = labels.shape[0]
    lab = labels.long()
    voted = lab != ignore_index
    if bool((lab[voted] < 0).any()):
        raise ValueError(f"labels must be >= 0 (or {ignore_index}), got {int(lab[voted].min())}")
    if not bool(voted.any()):
        return torch.full_like(lab[0], ignore_index), torch.zeros_like(lab[0])
    bins = int(lab[voted].max()) + 2  # the last bin holds the abstentions
    idx = torch.where(voted, lab, bins - 1)
    counts = torch.zeros((bins, *lab.shape[1:]), dtype=torch.long, device=lab.device)
    counts.scatter_add_(0, idx, torch.ones_like(idx))
    # Priority n - i of voter i; per label, its earliest voter's. It is below n + 1, so it only breaks ties.
    prio = torch.arange(n, 0, -1, device=lab.device).view(n, *[1] * (lab.dim() - 1)).expand_as(idx)
    first = torch.zeros_like(counts).scatter_reduce_(0, idx, prio, reduce="amax")
    score = counts * (n + 1) + first
    score[-1] = -1  # an abstention never wins: where all abstain, a label bin with 0 votes does
    win = score.argmax(0)
    votes = counts.gather(0, win[None])[0]
    label = torch.where(votes >= min_votes, win, torch.full_like(win, ignore_index))
    return label, votes
