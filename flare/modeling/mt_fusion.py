"""A FLARE-LoRA projection whose source carries gradient (FLARE MT's trained map).

The fused ops and the reference (``flare_kernels.reference.flare_lora``) treat the source as a
constant: for the English stream it is the frozen base model's activation, so its gradient would be
wasted work. FLARE MT's source is the output of a trainable linear map, which must learn through
``A x_s``. This computes the same function with torch autograd end to end:

    y_t = base(x_t) + s * phi(drop(x_s) A^T, drop(x_t) A^T) B^T

with the precision rules of the reference (base in the layer's compute dtype, the LoRA branch in
the adapter dtype, the update cast to x's dtype before it is added) and dropout drawn per stream.
Only FLARE MT takes this path (a source that requires grad), so the English method keeps its kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flare_kernels.reference.flare_lora import apply_dropout, draw_dropout_mask
from flare_kernels.reference.fusion import AttentionParams, fuse


def flare_lora_source_grad(layer, x: torch.Tensor, source: torch.Tensor,
                           fusion_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``layer`` (a FLARE-LoRA projection) on x [..., L, in] fusing ``source`` [..., L, in] with grad."""
    if source.shape != x.shape:
        raise ValueError(f"source must have the shape of x, got source {tuple(source.shape)} and x {tuple(x.shape)}")
    kw = layer.adapter_kwargs(source)
    lora_A, lora_B, p = kw["lora_A"], kw["lora_B"], kw["dropout_p"]
    ad = lora_A.dtype
    xt, xs = x.to(ad), source.to(ad)
    if p > 0.0:
        xt = apply_dropout(xt, draw_dropout_mask(xt, p), p)
        xs = apply_dropout(xs, draw_dropout_mask(xs, p), p)
    s_t, s_s = F.linear(xt, lora_A), F.linear(xs, lora_A)
    params = kw["fusion_params"]
    attention_p = kw["attention_dropout_p"]
    if layer.fusion == "cross_attention" and (kw["heads"] != 1 or attention_p > 0.0):
        keep = None
        if attention_p > 0.0:
            length = x.shape[-2]
            keep = torch.empty((*x.shape[:-2], kw["heads"], length, length), dtype=torch.bool, device=x.device)
            keep = keep.bernoulli_(1.0 - attention_p)
        params = AttentionParams(params, kw["heads"], keep, attention_p)
    z = fuse(s_s, s_t, layer.fusion, params, fusion_mask)
    update = F.linear(z, lora_B) * kw["scaling"]
    return layer.base_forward(x) + update.to(x.dtype)
