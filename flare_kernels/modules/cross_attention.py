"""Parameters of the ``cross_attention`` fusion: three r x r linears with bias (Wq, Wk, Wv)."""

from __future__ import annotations

import torch
from torch import nn


class CrossAttentionFusion(nn.Module):
    """Holds Wq, bq, Wk, bk, Wv, bv for phi(s, t) = softmax((s Wq^T + bq)(t Wk^T + bk)^T / sqrt(r)) (t Wv^T + bv).

    The computation itself lives in the op (reference ``fuse`` / the launchers); this module only
    owns the parameters, initialized as ``nn.Linear`` initializes them.
    """

    def __init__(self, r: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.q = nn.Linear(r, r, device=device, dtype=dtype)
        self.k = nn.Linear(r, r, device=device, dtype=dtype)
        self.v = nn.Linear(r, r, device=device, dtype=dtype)

    def params(self) -> tuple[torch.Tensor, ...]:
        """(Wq, bq, Wk, bk, Wv, bv), the order the ops take."""
        return (self.q.weight, self.q.bias, self.k.weight, self.k.bias, self.v.weight, self.v.bias)
