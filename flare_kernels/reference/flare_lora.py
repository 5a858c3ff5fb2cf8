"""Pure-PyTorch FLARE-LoRA projection over an NF4 base weight: the spec every backend is held to.

For target rows x_t, their aligned source rows x_s, frozen W0 (NF4) and bias b, LoRA factors
A [r, K], B [N, r] and scaling s::

    y_t = x_t W0^T + b + s * phi(drop(x_s) A^T, drop(x_t) A^T) B^T     (trainable A, B)
    y_s = x_s W0^T + b                                                 (frozen, no grad)

Precision follows bitsandbytes + PEFT exactly, so that with ``fusion="none"`` and no source this
is PEFT's ``lora.bnb.Linear4bit`` forward:

* base branch in the compute dtype (``compute_dtype`` or x's dtype): W0 dequantized to it,
  ``F.linear(x, W0, b)``, result cast back to x's dtype;
* LoRA branch in the adapter dtype (A's dtype): x cast to it, dropout, ``x A^T``, fusion,
  ``z B^T * s``, result cast to x's dtype and added.

Dropout is drawn independently per stream (``p`` with masks given or drawn here). The source
stream carries no gradient; A receives gradient through both ``A x_s`` and ``A x_t``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..format.nf4 import NF4Tensors, NF4Weight
from .fusion import AttentionParams, fuse, fuse_backward


class FlareOutput(NamedTuple):
    y: torch.Tensor  # [..., N] target rows
    y_source: torch.Tensor | None  # [..., N] source rows (base product only), no grad
    s_target: torch.Tensor  # [..., r] drop(x_t) A^T in the adapter dtype
    s_source: torch.Tensor | None  # [..., r] drop(x_s) A^T in the adapter dtype


def dense_weight(weight: NF4Weight | NF4Tensors | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W0 as a dense [N, K] tensor of ``dtype`` (bitsandbytes' dequantization for NF4 weights)."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype)
    return weight.dequantize(dtype)


def base_forward(
    x: torch.Tensor,
    w_dense: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """bitsandbytes' Linear4bit product: x in the dtype of ``w_dense``, output in x's dtype."""
    xc = x.to(w_dense.dtype)
    b = None if bias is None else bias.to(w_dense.dtype)
    return F.linear(xc, w_dense, b).to(x.dtype)


def draw_dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A fresh keep-mask (bool, True = kept) with keep probability 1 - p."""
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)


def apply_dropout(x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    if mask is None or p == 0.0:
        return x
    return x * mask.to(x.dtype) / (1.0 - p)


def lora_forward(
    x: torch.Tensor,
    source: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    fusion: str,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    source_dropout_mask: torch.Tensor | None = None,
    fusion_params: Sequence[torch.Tensor] = (),
    fusion_mask: torch.Tensor | None = None,
    source_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The LoRA + fusion branch: returns (update in the adapter dtype, s_target, s_source).

    The source is a constant (the frozen model's English stream) unless ``source_grad``: FLARE MT's
    source is a trainable map's output, which learns through A x_s."""
    adapter_dtype = lora_A.dtype
    s_t = F.linear(apply_dropout(x.to(adapter_dtype), dropout_mask, dropout_p), lora_A)
    s_s = None
    if source is not None:
        xs = (source if source_grad else source.detach()).to(adapter_dtype)
        s_s = F.linear(apply_dropout(xs, source_dropout_mask, dropout_p), lora_A)
    z = fuse(s_s, s_t, fusion, fusion_params, fusion_mask)
    return F.linear(z, lora_B) * scaling, s_t, s_s


def attention_params(
    fusion_params: Sequence[torch.Tensor], x: torch.Tensor, heads: int, p: float, keep: torch.Tensor | None = None
) -> Sequence[torch.Tensor]:
    """cross_attention's parameters with its heads and attention-probability dropout (``AttentionParams``),
    the keep-mask (bool [..., heads, L, L]) drawn here when ``p > 0`` and none is given; one head and no
    dropout: the plain parameters."""
    if heads == 1 and p == 0.0:
        return fusion_params
    keep = keep if p > 0.0 else None
    if p > 0.0 and keep is None:
        length = x.shape[-2]
        keep = torch.empty((*x.shape[:-2], heads, length, length), dtype=torch.bool, device=x.device)
        keep = keep.bernoulli_(1.0 - p)
    return AttentionParams(fusion_params, heads, keep, p)


def flare_lora_reference(
    x: torch.Tensor,
    weight: NF4Weight | NF4Tensors | torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    source: torch.Tensor | None = None,
    fusion: str = "add_relu",
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    source_dropout_mask: torch.Tensor | None = None,
    fusion_params: Sequence[torch.Tensor] = (),
    compute_dtype: torch.dtype | None = None,
    return_source_output: bool = False,
    source_base: torch.Tensor | None = None,
    fusion_mask: torch.Tensor | None = None,
    heads: int = 1,
    attention_dropout_p: float = 0.0,
    attention_dropout_mask: torch.Tensor | None = None,
) -> FlareOutput:
    """Reference FLARE-LoRA projection; x and source are [..., L, K] (sequence fusions mix dim -2).

    With ``dropout_p > 0`` and no mask given, masks are drawn here (independently per stream).
    ``source_base``: the rows whose base product is ``y_source`` when they differ from the fused
    ``source`` (the paper's residual-stream variant fuses the block input); default ``source``.
    ``fusion_mask`` [..., L]: key-padding mask of the sequence-level fusions (True = real token).
    ``heads`` / ``attention_dropout_p`` / ``attention_dropout_mask`` (bool [..., heads, L, L]):
    cross-attention's heads and attention-probability dropout, the mask drawn here after the
    LoRA masks when not given (as ``flare_lora_linear`` draws it).
    """
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = draw_dropout_mask(x, dropout_p)
        if source is not None and source_dropout_mask is None:
            source_dropout_mask = draw_dropout_mask(source, dropout_p)
    if fusion == "cross_attention" and source is not None:
        fusion_params = attention_params(fusion_params, x, heads, attention_dropout_p, attention_dropout_mask)
    w = dense_weight(weight, compute_dtype or x.dtype)
    update, s_t, s_s = lora_forward(
        x,
        source,
        lora_A,
        lora_B,
        scaling,
        fusion=fusion,
        dropout_p=dropout_p,
        dropout_mask=dropout_mask,
        source_dropout_mask=source_dropout_mask,
        fusion_params=fusion_params,
        fusion_mask=fusion_mask,
    )
    y = base_forward(x, w, bias) + update.to(x.dtype)
    y_source = None
    if source is not None and return_source_output:
        with torch.no_grad():
            y_source = base_forward(source if source_base is None else source_base, w, bias)
    return FlareOutput(y, y_source, s_t, s_s)


class FlareGrads(NamedTuple):
    dx: torch.Tensor | None
    d_lora_A: torch.Tensor | None
    d_lora_B: torch.Tensor | None
    d_fusion_params: list[torch.Tensor]


def flare_lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    source: torch.Tensor | None,
    weight: NF4Weight | NF4Tensors | torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    fusion: str,
    s_target: torch.Tensor,
    s_source: torch.Tensor | None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    source_dropout_mask: torch.Tensor | None = None,
    fusion_params: Sequence[torch.Tensor] = (),
    fusion_mask: torch.Tensor | None = None,
) -> FlareGrads:
    """Explicit gradients of :func:`flare_lora_reference`'s y (x in the compute dtype, no bias).

    ``s_target`` / ``s_source`` are the forward's rank-r intermediates; inputs are [..., L, K] as
    in the forward. Matches autograd of the reference forward (the tests check it); written out so
    that it can run inside an op implementation.
    """
    ad = lora_A.dtype
    s_t = s_target.to(ad)
    s_s = None if s_source is None else s_source.to(ad)
    z = fuse(s_s, s_t, fusion, fusion_params, fusion_mask)
    dup = dy.to(ad) * scaling  # gradient of F.linear(z, B) (the update before scaling)
    d_b = dup.reshape(-1, dup.shape[-1]).transpose(0, 1) @ z.reshape(-1, z.shape[-1])
    dz = dup @ lora_B
    ds_s, ds_t, d_params = fuse_backward(dz, s_s, s_t, fusion, fusion_params, fusion_mask)
    xd_t = apply_dropout(x.to(ad), dropout_mask, dropout_p)

    def rows(a: torch.Tensor) -> torch.Tensor:
        return a.reshape(-1, a.shape[-1])

    d_a = rows(ds_t).transpose(0, 1) @ rows(xd_t)
    if ds_s is not None:
        xd_s = apply_dropout(source.to(ad), source_dropout_mask, dropout_p)
        d_a = d_a + rows(ds_s).transpose(0, 1) @ rows(xd_s)
    dx_lora = apply_dropout(ds_t @ lora_A, dropout_mask, dropout_p).to(x.dtype)
    # The base branch is F.linear(x, W0) with W0 frozen: its only gradient is dY W0.
    dx = dy.to(x.dtype) @ dense_weight(weight, x.dtype) + dx_lora
    return FlareGrads(dx, d_a, d_b, d_params)
