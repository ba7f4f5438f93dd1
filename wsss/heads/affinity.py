"""AFA affinity head (``docs/methods/afa.md`` 2): learned affinity from the attention of the last blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


class _ChannelSum(torch.autograd.Function):
    """z = sum_c w_c a_c: w (C,), a (B, C, M) -> (B, M), as the batched gemv ``w @ a``.

    The backward writes grad_a in a's own (B, C, M) layout in one pass; autograd's matmul backward
    produces it as a (B, M, C) outer product viewed transposed, and every later op on that gradient
    (the dtype cast back to bf16 under autocast, its sum with the attention's own gradient) then walks
    memory with stride C.
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor, a: Tensor) -> Tensor:
        ctx.save_for_backward(w, a)
        return torch.matmul(w, a)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        w, a = ctx.saved_tensors
        grad_w = torch.einsum("bcm,bm->c", a, grad) if ctx.needs_input_grad[0] else None
        grad_a = w.view(1, -1, 1) * grad.unsqueeze(1) if ctx.needs_input_grad[1] else None
        return grad_w, grad_a


class AffinityHead(nn.Module):
    """A = sigmoid(Conv1x1(S + S^T)) with S the channel-concatenated attention logits.

    in_channels: total number of heads of the used blocks (16 for MiT: 2 stage-4 blocks x 8 heads).
    head_dims: head dimension of each used block; with ``unscale=True`` (default) every block's logits
    are multiplied by sqrt(head_dim), turning the backbone's scaled q k^T / sqrt(d) back into the
    official unscaled q k^T the head was trained on. Can also be given to :meth:`forward`.

    init: ``"kaiming"`` as the official code (Kaiming-normal weight, a = sqrt(5), mode fan_out, so
    std = sqrt(1/3); the bias keeps PyTorch's default init) or ``"zero"`` (weight and bias 0: A = 0.5
    everywhere at the start, so the sigmoid is not saturated and every pair has a gradient).
    center: subtract from each query row of every channel its mean over the keys, S_ij - mean_j' S_ij'
    (``docs/methods/afa.md`` 2). The softmax attention is unchanged by it; it removes the per-query
    offsets that a pretrained ViT's last blocks carry (several times the within-row spread on DINOv2)
    and that a per-pair linear head cannot cancel.
    """

    def __init__(
        self, in_channels: int = 16, head_dims: Sequence[int] | None = None, unscale: bool = True,
        init: str = "kaiming", center: bool = False,
    ) -> None:
        super().__init__()
        if init not in ("kaiming", "zero"):
            raise ValueError(f"init must be 'kaiming' or 'zero', got '{init}'")
        self.in_channels = in_channels
        self.head_dims = list(head_dims) if head_dims is not None else None
        self.unscale = unscale
        self.center = bool(center)
        self.proj = nn.Conv2d(in_channels, 1, kernel_size=1, bias=True)
        if init == "zero":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            nn.init.kaiming_normal_(self.proj.weight, a=math.sqrt(5), mode="fan_out")

    def forward(self, attn: Sequence[Tensor], head_dims: Sequence[int] | None = None) -> Tensor:
        """attn: per-block scaled logits, each (B, h_i, N, N), sum h_i = in_channels. Returns A (B, N, N).

        The 1x1 conv is linear, so conv(S + S^T) = z + z^T + b with z = sum_c w_c S_c: computed that way
        (no (B, 16, N, N) concatenation or transpose), in float32 (float64 for float64 inputs).
        """
        dims = list(head_dims) if head_dims is not None else self.head_dims
        if self.unscale and (dims is None or len(dims) != len(attn)):
            raise ValueError("AffinityHead needs one head_dim per attention block to unscale the logits")
        heads = sum(a.shape[1] for a in attn)
        if heads != self.in_channels:
            raise ValueError(f"attention has {heads} heads in total, the head expects {self.in_channels}")
        # float32 at least (float64 inputs stay float64): unscaled logits are large.
        dtype = torch.float64 if attn[0].dtype == torch.float64 else torch.float32
        weight = self.proj.weight.view(-1).to(dtype)
        with torch.autocast(attn[0].device.type, enabled=False):
            z: Tensor | None = None
            start = 0
            for i, a in enumerate(attn):
                w = weight[start : start + a.shape[1]]
                start += a.shape[1]
                if self.unscale:
                    w = w * math.sqrt(dims[i])  # type: ignore[index]
                # (C,) @ (B, C, N*N): one batched gemv, no permuted copy of the logits
                part = _ChannelSum.apply(w, a.to(dtype).flatten(2)).view(a.shape[0], *a.shape[2:])
                z = part if z is None else z + part
            assert z is not None
            if self.center:  # the channel sum is linear: centring z centres every channel
                z = z - z.mean(dim=-1, keepdim=True)
            return torch.sigmoid(z + z.transpose(1, 2) + self.proj.bias.to(dtype))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, head_dims={self.head_dims}, unscale={self.unscale}, "
                f"center={self.center}")
