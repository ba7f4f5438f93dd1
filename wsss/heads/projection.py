"""Projection head for class token contrast (ToCo's CTC head, a DINO-style head) and its EMA teacher.

``ProjectionHead``: an MLP (Linear + GELU layers down to a bottleneck), L2 normalisation, then a
linear layer without bias whose rows are kept at unit norm (weight normalisation with the gain
fixed at 1), so every output is a cosine between the bottleneck direction and a learned prototype.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """``forward(x (..., in_dim)) -> (..., out_dim)``, each output in [-1, 1].

    num_layers: Linear layers of the MLP (1: a single Linear to the bottleneck; n > 1: in -> hidden,
    n - 2 hidden -> hidden, hidden -> bottleneck, GELU between them).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 1024,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"projection head num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # prototype directions; only their direction matters (rows normalised in forward)
        self.prototypes = nn.Parameter(nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        h = F.normalize(self.mlp(x), p=2, dim=-1)
        return F.linear(h, F.normalize(self.prototypes, p=2, dim=1))


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach().to(t.dtype), 1.0 - momentum)


def frozen_copy(head: nn.Module) -> nn.Module:
    """A copy of ``head`` whose parameters take no gradient (the EMA teacher starts as the student)."""
    teacher = copy.deepcopy(head)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
