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

from flare_kernels.reference.flare_lora import attention_params, draw_dropout_mask, lora_forward


def flare_lora_source_grad(layer, x: torch.Tensor, source: torch.Tensor,
                           fusion_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``layer`` (a FLARE-LoRA projection) on x [..., L, in] fusing ``source`` [..., L, in] with grad."""
    if source.shape != x.shape:
        raise ValueError(f"source must have the shape of x, got source {tuple(source.shape)} and x {tuple(x.shape)}")
    kw = layer.adapter_kwargs(source)
    p = kw["dropout_p"]
    masks = (draw_dropout_mask(x, p), draw_dropout_mask(source, p)) if p > 0.0 else (None, None)
    params = kw["fusion_params"]
    if layer.fusion == "cross_attention":
        params = attention_params(params, x, kw["heads"], kw["attention_dropout_p"])
    update, _, _ = lora_forward(
        x, source, kw["lora_A"], kw["lora_B"], kw["scaling"], fusion=layer.fusion, dropout_p=p,
        dropout_mask=masks[0], source_dropout_mask=masks[1], fusion_params=params, fusion_mask=fusion_mask,
        source_grad=True,
    )  # fmt: skip
    return layer.base_forward(x) + update.to(x.dtype)
