"""``FlareLinear``: the FLARE-LoRA layer over a dense, unquantized ``nn.Linear`` (e.g. XLM-R, which
the paper trains without quantization).

The fused kernels read NF4 weights only; a dense weight goes through the reference math (torch
autograd), which is what a dense GEMM library does best anyway. Same interface and parameter
names as ``FlareLinear4bit``; the wrapped layer's weight and bias are shared, not copied, and frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from ..reference.flare_lora import base_forward, flare_lora_reference
from .adapter import LoraAdapter


class FlareLinear(LoraAdapter):
    """Frozen dense linear layer with a trainable (FLARE) LoRA adapter (see ``FlareLinear4bit``)."""

    def __init__(
        self,
        linear: nn.Linear,
        *,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        fusion: str = "add_relu",
        adapter_dtype: torch.dtype = torch.float32,
        cross_attention_heads: int = 1,
        attention_dropout: float = 0.0,
    ) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FlareLinear wraps an nn.Linear, got {type(linear).__name__}")
        super().__init__(linear.in_features, linear.out_features, r=r, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, fusion=fusion, device=linear.weight.device,
                         adapter_dtype=adapter_dtype,
                         cross_attention_heads=cross_attention_heads, attention_dropout=attention_dropout)  # fmt: skip
        self.weight = linear.weight.requires_grad_(False)
        self.bias = None if linear.bias is None else linear.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None, *, return_source_output: bool = False,
                source_base: torch.Tensor | None = None, fusion_mask: torch.Tensor | None = None):  # fmt: skip
        """x, source: [..., L, in]. Returns y [..., out], or (y, y_source) with return_source_output.

        ``source_base`` / ``fusion_mask``: see ``flare_kernels.flare_lora_linear``.
        """
        if source is not None and source.shape != x.shape:
            raise ValueError(f"source must have the shape of x, got source {tuple(source.shape)} and x {tuple(x.shape)}")
        kw = self.adapter_kwargs(source)
        out = flare_lora_reference(
            x, self.weight, kw.pop("lora_A"), kw.pop("lora_B"), kw.pop("scaling"), bias=self.bias,
            return_source_output=return_source_output, source_base=source_base,
            fusion_mask=fusion_mask if source is not None else None, **kw,
        )  # fmt: skip
        return (out.y, out.y_source) if return_source_output else out.y

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone: x W^T + b."""
        return base_forward(x, self.weight.to(x.dtype), self.bias)
