"""What a head that a method adds to the network looks like."""

from __future__ import annotations

from torch import Tensor, nn

from wsss.backbones.base import BackboneOutput


class MethodHead(nn.Module):
    """A head a method adds to the network (``Method.build_heads``).

    It reads the backbone output: the unreduced attention logits of the blocks in ``attn_layers``
    and the token features of the blocks in ``feature_layers`` (non-negative layer indices), which the
    network captures whenever the head runs. ``forward(out)`` returns the head's output tensor.
    """

    attn_layers: tuple[int, ...] = ()
    feature_layers: tuple[int, ...] = ()

    def forward(self, out: BackboneOutput) -> Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define forward(out)")
