"""The per-pixel majority vote of label maps against a pixel-by-pixel reference."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from wsss.refine.vote import majority_vote


def _ref_vote(labels: torch.Tensor, min_votes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel by pixel: count the votes that are not 255, keep the labels with the most, and of those the
    one the earliest voter gave."""
    n = labels.shape[0]
    flat = labels.reshape(n, -1)
    out, cnt = torch.full((flat.shape[1],), 255), torch.zeros(flat.shape[1], dtype=torch.long)
    for p in range(flat.shape[1]):
        column = [int(v) for v in flat[:, p]]
        counts = Counter(v for v in column if v != 255)
        if not counts:
            continue
        best = max(counts.values())
        winner = next(v for v in column if v != 255 and counts[v] == best)
        cnt[p] = best
        out[p] = winner if best >= min_votes else 255
    return out.view(labels.shape[1:]), cnt.view(labels.shape[1:])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_majority_vote_matches_the_reference(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    labels = torch.randint(0, 4, (n, 2, 9, 7), generator=g)  # few classes: many ties
    labels[torch.rand(labels.shape, generator=g) < 0.2] = 255
    labels[:, 0, 0, 0] = 255  # a pixel where every voter abstains
    for min_votes in range(1, n + 1):
        got, votes = majority_vote(labels.to(torch.uint8), min_votes=min_votes)
        ref, ref_votes = _ref_vote(labels, min_votes)
        assert torch.equal(got, ref) and torch.equal(votes, ref_votes)
        assert got.dtype == torch.long and int(got[0, 0, 0]) == 255 and int(votes[0, 0, 0]) == 0


def test_majority_vote_rules_by_hand() -> None:
    lab = torch.tensor([[1, 1, 2, 255, 3], [2, 2, 2, 4, 4], [2, 3, 2, 4, 255]])
    got, votes = majority_vote(lab)
    # majority 2; a three-way tie goes to voter 0; unanimous 2; voter 0 abstains: 4; 3 against 4, tie
    assert got.tolist() == [2, 1, 2, 4, 3] and votes.tolist() == [2, 1, 3, 2, 1]
    assert majority_vote(lab, min_votes=2)[0].tolist() == [2, 255, 2, 4, 255]
    assert majority_vote(torch.full((3, 2), 255))[0].tolist() == [255, 255]


def test_majority_vote_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="integer label maps"):
        majority_vote(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="min_votes must be >= 1"):
        majority_vote(torch.zeros(2, 3, 3, dtype=torch.long), min_votes=0)
    with pytest.raises(ValueError, match=r"labels must be >= 0 .* got -1"):
        majority_vote(torch.tensor([[0, -1], [1, 1]]))
    with pytest.raises(ValueError, match="N >= 1 voters"):
        majority_vote(torch.zeros(0, 3, dtype=torch.long))
