"""The ``torch`` backend: the reference as a launcher, with the signatures of ``ops/launch.py``.

Rows arrive flattened ([M, K]); sequence-level fusions mix the ``seq_len`` rows of each sequence,
so the reference sees them as [M / seq_len, seq_len, K].
"""

from __future__ import annotations

import torch

from ..reference.flare_lora import flare_lora_backward, flare_lora_reference
from .fusion_glue import Grads, LoraCall, fusion_plan


def _seq_view(t: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1, seq_len, t.shape[-1])


def _seq_mask(mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    return None if mask is None else mask.reshape(-1, seq_len)


def forward(
    call: LoraCall, source_out: bool, fuse_down: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(y_t [M, N], y_s [M, N] or None, s_t [M, R], s_s [M, R] or None), s in the adapter dtype."""
    (x, source, w, bias, lora_A, lora_B, scaling, fusion, params, dropout_p, masks, seq_len, source_base,
     fusion_mask) = call
    out = flare_lora_reference(
        _seq_view(x, seq_len), w, lora_A, lora_B, scaling, source=_seq_view(source, seq_len), fusion=fusion,
        bias=bias, dropout_p=dropout_p, dropout_mask=_seq_view(masks[0], seq_len),
        source_dropout_mask=_seq_view(masks[1], seq_len), fusion_params=params,
        return_source_output=source_out and source is not None, source_base=_seq_view(source_base, seq_len),
        fusion_mask=_seq_mask(fusion_mask, seq_len),
    )  # fmt: skip
    m, n, r = x.shape[0], w.out_features, lora_A.shape[0]
    y_s = None if out.y_source is None else out.y_source.reshape(m, n)
    s_s = out.s_source.reshape(m, r) if fusion_plan(fusion, source is not None)[1] else None
    return out.y.reshape(m, n), y_s, out.s_target.reshape(m, r), s_s


def backward(
    call: LoraCall, dy: torch.Tensor, s_t: torch.Tensor, s_s: torch.Tensor | None, needs: tuple[bool, bool, bool, bool]
) -> Grads:
    """The reference's explicit gradients (``flare_lora_backward``) for x, A, B, fusion params."""
    (x, source, w, bias, lora_A, lora_B, scaling, fusion, params, dropout_p, masks, seq_len, source_base,
     fusion_mask) = call
    need_dx, need_da, need_db, need_dparams = needs
    g = flare_lora_backward(
        _seq_view(dy, seq_len), _seq_view(x, seq_len), _seq_view(source, seq_len), w, lora_A, lora_B, scaling,
        fusion=fusion, s_target=_seq_view(s_t, seq_len), s_source=_seq_view(s_s, seq_len), dropout_p=dropout_p,
        dropout_mask=_seq_view(masks[0], seq_len), source_dropout_mask=_seq_view(masks[1], seq_len),
        fusion_params=params, fusion_mask=_seq_mask(fusion_mask, seq_len),
    )  # fmt: skip
    return Grads(
        g.dx.reshape(x.shape) if need_dx else None,
        g.d_lora_A.to(lora_A.dtype) if need_da else None,
        g.d_lora_B.to(lora_B.dtype) if need_db else None,
        list(g.d_fusion_params) if need_dparams else [],
    )
