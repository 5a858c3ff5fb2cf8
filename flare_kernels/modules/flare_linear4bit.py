"""``FlareLinear4bit``: a bitsandbytes ``Linear4bit`` + PEFT LoRA replacement with FLARE fusion.

One module, one fused op: ``y = x W0^T + b + scaling * phi(A drop(source), A drop(x)) B^T``
(plain QLoRA when ``source`` is None). Parameter names follow PEFT (``lora_A.weight`` [r, in],
``lora_B.weight`` [out, r]) so adapter state dicts carry over; the frozen NF4 weight is a
buffer-only submodule (``weight.packed``, ``weight.absmax``, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from ..format.nf4 import NF4Weight, quantize_nf4
from ..ops.functional import flare_lora_linear
from .adapter import LoraAdapter


class FlareLinear4bit(LoraAdapter):
    """Frozen NF4 linear layer with a trainable (FLARE) LoRA adapter.

    Args:
        weight: the frozen base weight [out, in] (``NF4Weight``).
        bias: optional frozen bias [out].
        r, lora_alpha, lora_dropout: LoRA rank, alpha (scaling = alpha / r) and dropout on the
            adapter's input (each stream draws its own mask; training mode only).
        fusion: one of ``flare_kernels.FUSIONS``; used only when a source is passed to forward.
        compute_dtype: dtype of the base product (bitsandbytes' ``compute_dtype``); None = x's.
        adapter_dtype: dtype of the LoRA parameters (PEFT keeps them in fp32 for QLoRA).
    """

    def __init__(
        self,
        weight: NF4Weight,
        bias: torch.Tensor | None = None,
        *,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        fusion: str = "add_relu",
        compute_dtype: torch.dtype | None = None,
        adapter_dtype: torch.dtype = torch.float32,
        cross_attention_heads: int = 1,
        attention_dropout: float = 0.0,
    ) -> None:
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         fusion=fusion, device=weight.device, adapter_dtype=adapter_dtype,
                         cross_attention_heads=cross_attention_heads, attention_dropout=attention_dropout)  # fmt: skip
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must be [out_features] = [{out_features}], got shape {tuple(bias.shape)}")
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.device), requires_grad=False)
        self.compute_dtype = compute_dtype if compute_dtype is not None else weight.compute_dtype

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_bnb(cls, linear4bit: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                 fusion: str = "add_relu", **kwargs) -> "FlareLinear4bit":  # fmt: skip
        """Wrap a quantized bitsandbytes ``Linear4bit`` (nf4), sharing its packed bytes.

        Call it before the layer's first eval-mode forward on a CPU: bitsandbytes then repacks the
        weight for its CPU kernel (see ``NF4Weight.from_bnb``).
        """
        weight = NF4Weight.from_bnb(linear4bit)
        bias = getattr(linear4bit, "bias", None)
        return cls(weight, None if bias is None else bias.data, r=r, lora_alpha=lora_alpha,
                   lora_dropout=lora_dropout, fusion=fusion, **kwargs)  # fmt: skip

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    fusion: str = "add_relu", *, blocksize: int = 64, double_quant: bool = True,
                    **kwargs) -> "FlareLinear4bit":  # fmt: skip
        """Quantize a dense ``nn.Linear`` to NF4 (bytes as bitsandbytes would write them) and wrap it."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = quantize_nf4(linear.weight.data, blocksize=blocksize, double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.data
        return cls(weight, bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, fusion=fusion, **kwargs)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None, *, return_source_output: bool = False,
                source_base: torch.Tensor | None = None, fusion_mask: torch.Tensor | None = None):  # fmt: skip
        """x, source: [..., L, in]. Returns y [..., out], or (y, y_source) with return_source_output.

        ``source_base`` / ``fusion_mask``: see ``flare_kernels.flare_lora_linear``.
        """
        return flare_lora_linear(
            x, self.weight, bias=self.bias, return_source_output=return_source_output,
            compute_dtype=self.compute_dtype, source_base=source_base, fusion_mask=fusion_mask,
            **self.adapter_kwargs(source),
        )  # fmt: skip

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone, x W0^T + b (bitsandbytes' numerics): the fused op with the
        adapter's term scaled by zero, which adds exactly nothing (r / out extra FLOPs)."""
        return flare_lora_linear(
            x, self.weight, self.lora_A.weight.detach(), self.lora_B.weight.detach(), 0.0, fusion="none",
            bias=self.bias, compute_dtype=self.compute_dtype,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compute_dtype={self.compute_dtype}"
