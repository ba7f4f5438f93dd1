"""What ``wsss analyze`` asks of a method beyond training and map prediction.

A method takes part in an analysis by implementing one of these protocols (structurally: it defines
the members, it imports nothing from here, so a method never depends on the analysis layer). The
base :class:`wsss.methods.base.Method` implements none of them; ``isinstance(method, OracleRefinement)``
says whether a method has one.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor

from wsss.model import WSSSNet


@runtime_checkable
class OracleRefinement(Protocol):
    """A method whose label refinement can be replayed with a perfect affinity built from the masks
    (AFA's propagation, AReAM's attention refinement): :mod:`wsss.analysis.oracle` runs it."""

    #: names of the label maps :meth:`oracle_batch` returns
    ORACLE_MAPS: ClassVar[tuple[str, ...]]

    def oracle_batch(self, net: WSSSNet, x: Tensor, labels: Tensor, gt: Tensor
                     ) -> tuple[dict[str, Tensor], Tensor | None]:
        """The refinement with the model's own affinity and with the perfect one built from ``gt``
        (B, H, W) (255 = ignored), for padded images x (B, 3, H, W) in [0, 1] and labels (B, K): label
        maps (B, H, W) named as :attr:`ORACLE_MAPS`, and float64 pair-agreement sums (8,) of a learned
        affinity (:func:`wsss.refine.labels.pair_agreement`) or None."""
        ...

    def oracle_protocol(self) -> dict[str, Any]:
        """The settings of :meth:`oracle_batch`, for the analysis JSON."""
        ...


@runtime_checkable
class LearnedAffinity(Protocol):
    """A method with a learned token affinity (AFA's affinity head): probes and plots of it."""

    def affinity_probe(self, net: WSSSNet, x: Tensor) -> dict[str, Any]:
        """The learned affinity for single-scale images x (B, 3, H, W): ``{"affinity": (B, N, N),
        "grid": (h, w), "attn": [(B, heads, N', N') logits it is computed from], "cam": (B, K, h', w')}``."""
        ...

    def head_weights(self, net: WSSSNet) -> dict[str, Any]:
        """The learned weight of each attention head in the affinity head, its bias and its layers."""
        ...
