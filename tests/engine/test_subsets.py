"""``--max-images``: a pass over part of a split visits images spread over it, not its first ones."""

from __future__ import annotations

import pytest

from wsss.engine.evaluate import image_indices, spread


def reference_spread(n: int, count: int) -> list[int]:
    """Slow reference: split [0, n) into ``count`` equal runs (real-valued bounds) and take the index
    whose unit cell [j, j + 1) holds each run's start."""
    out = []
    for i in range(count):
        start = i * n / count
        out.append(next(j for j in range(n) if j <= start < j + 1))
    return out


@pytest.mark.parametrize("n", [1, 2, 7, 10, 300, 394])
@pytest.mark.parametrize("count", [1, 2, 3, 40, 100])
def test_spread_matches_reference(n: int, count: int) -> None:
    got = spread(range(n), count)
    if count >= n:
        assert got == list(range(n))
    else:
        assert got == reference_spread(n, count)
        assert len(set(got)) == count and got == sorted(got)


def test_spread_keeps_every_class_of_a_name_sorted_split() -> None:
    # MSRC-style names: each class's images are consecutive in the sorted list
    names = [f"{row}_{k}_s" for row in range(1, 11) for k in range(30)]
    first = {n.split("_")[0] for n in names[:40]}
    picked = {names[i].split("_")[0] for i in spread(range(len(names)), 40)}
    assert len(first) == 2 and len(picked) == 10


def test_image_indices_all_without_limit_and_rejects_negative() -> None:
    class DS:
        def __len__(self) -> int:
            return 5

    assert image_indices(DS(), None) == [0, 1, 2, 3, 4]
    assert image_indices(DS(), 9) == [0, 1, 2, 3, 4]
    assert image_indices(DS(), 2) == [0, 2]
    with pytest.raises(ValueError, match="max_images"):
        spread(range(5), -1)
