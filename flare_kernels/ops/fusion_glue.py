"""Backend-independent torch steps between the kernels, shared by the kernel launchers.

Every kernel backend computes the same rank-r pipeline: s = drop(x) A^T per stream (fp32
[M, r]), z = phi(s_s, s_t), y += scaling * z B^T; backward dz = scaling * dy B, then phi's
gradients. The [M, r] mixing steps are tiny (r = 8..64), so they run in torch on the reference's
fusion functions; the launchers only differ in the kernels around them. No Triton import here:
the native CPU backend uses this module on machines without Triton.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ..format.nf4 import NF4Tensors
from ..reference.fusion import fuse, fuse_backward, is_per_token, retensor


class LoraCall(NamedTuple):
    """One FLARE-LoRA projection as every backend's ``forward`` / ``backward`` takes it.

    Rows are flattened: x, source and source_base [M, K]; masks (target, source) keep-masks
    [M, K]; fusion_mask [M] (real positions, sequence-level fusions); sequences of ``seq_len`` rows.
    """

    x: torch.Tensor
    source: torch.Tensor | None
    weight: NF4Tensors
    bias: torch.Tensor | None
    lora_A: torch.Tensor  # [r, K]
    lora_B: torch.Tensor  # [N, r]
    scaling: float
    fusion: str
    # the fusion's parameters (cross_attention: Wq, bq, Wk, bk, Wv, bv, as reference.fusion.AttentionParams
    # when it has several heads or attention dropout, so the settings reach the glue below)
    params: Sequence[torch.Tensor]
    dropout_p: float
    masks: tuple[torch.Tensor | None, torch.Tensor | None]
    seq_len: int
    source_base: torch.Tensor | None = None
    fusion_mask: torch.Tensor | None = None


class Grads(NamedTuple):
    dx: torch.Tensor | None
    d_lora_A: torch.Tensor | None
    d_lora_B: torch.Tensor | None
    d_params: list[torch.Tensor]


def fusion_plan(fusion: str, has_source: bool) -> tuple[str, bool]:
    """(effective fusion, whether it reads the source stream's s)."""
    if not has_source or fusion == "none":
        return "none", False
    return fusion, True


def keep_scale(p: float) -> float:
    """Inverted dropout's factor for kept entries."""
    return 1.0 / (1.0 - p) if p > 0.0 else 1.0


def _seq_mask(mask: torch.Tensor | None, m: int, seq_len: int) -> torch.Tensor | None:
    return None if mask is None else mask.view(m // seq_len, seq_len)


def sequence_fuse(
    s_s: torch.Tensor, s_t: torch.Tensor, fusion: str, params: Sequence[torch.Tensor], seq_len: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """phi for a sequence-level fusion over flattened rows ([M, r], sequences of ``seq_len``;
    ``mask`` [M] marks real positions)."""
    m, r = s_t.shape
    shape = (m // seq_len, seq_len, r)
    z = fuse(s_s.view(shape), s_t.view(shape), fusion, retensor(params, [p.float() for p in params]),
             _seq_mask(mask, m, seq_len))  # fmt: skip
    return z.reshape(m, r)


def rank_r_backward(
    dz: torch.Tensor,
    s_s: torch.Tensor | None,
    s_t: torch.Tensor,
    fusion: str,
    params: Sequence[torch.Tensor],
    seq_len: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[torch.Tensor]]:
    """Given dz = d phi (fp32 [M, r]): (ds_t, ds_s or None, z = phi(s_s, s_t), d params in their dtypes)."""
    m, r = s_t.shape
    if is_per_token(fusion):
        z = fuse(s_s, s_t, fusion)
        g_s, g_t, d_params = fuse_backward(dz, s_s, s_t, fusion)
    else:
        shape = (m // seq_len, seq_len, r)
        params32 = retensor(params, [p.float() for p in params])
        z = sequence_fuse(s_s, s_t, fusion, params32, seq_len, mask)
        g_s, g_t, d_params = fuse_backward(dz.view(shape), s_s.view(shape), s_t.view(shape), fusion, params32,
                                           _seq_mask(mask, m, seq_len))  # fmt: skip
        d_params = [g.to(p.dtype) for g, p in zip(d_params, params)]
    ds_s = None if s_s is None or g_s is None else g_s.reshape(m, r)
    return g_t.reshape(m, r), ds_s, z, d_params


def zero_grads(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    params: Sequence[torch.Tensor],
    needs: tuple[bool, bool, bool, bool],
) -> Grads:
    """The gradients of an empty batch (M = 0)."""
    need_dx, need_da, need_db, need_dparams = needs
    return Grads(
        torch.empty((0, x.shape[1]), device=x.device, dtype=x.dtype) if need_dx else None,
        torch.zeros(lora_A.shape, device=x.device, dtype=lora_A.dtype) if need_da else None,
        torch.zeros(lora_B.shape, device=x.device, dtype=lora_B.dtype) if need_db else None,
        [torch.zeros_like(p) for p in params] if need_dparams else [],
    )
