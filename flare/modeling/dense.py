"""``FlareLinearDense``: the FLARE-LoRA projection over a dense (unquantized) ``nn.Linear`` weight.

flare_kernels fuses the projection over 4-bit NF4 weights only. A model given with plain
``nn.Linear`` projections (the paper trains XLM-R unquantized) keeps its dense weights: quantizing
them behind the user's back would change the model. This module has ``FlareLinear4bit``'s
interface and parameter names and computes the same equations with the kernel package's
pure-PyTorch reference (autograd), which accepts a dense weight in place of an NF4 one::

    y_t = x_t W^T + b + s * phi(drop(x_s) A^T, drop(x_t) A^T) B^T     (A, B trainable)
    y_s = x_s W^T + b                                                 (no adapter, no grad)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flare_kernels import FUSIONS, CrossAttentionFusion
from flare_kernels.reference import flare_lora_reference


class FlareLinearDense(nn.Module):
    """Frozen dense linear layer with a trainable (FLARE) LoRA adapter.

    Args:
        linear: the ``nn.Linear`` to wrap; its weight and bias Parameters are shared (not copied)
            and frozen.
        r, lora_alpha, lora_dropout, fusion: as in ``flare_kernels.FlareLinear4bit``.
        adapter_dtype: dtype of the LoRA parameters (fp32, as PEFT keeps them).
    """

    def __init__(
        self,
        linear: nn.Linear,
        *,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        fusion: str = "add_relu",
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FlareLinearDense wraps an nn.Linear, got {type(linear).__name__}")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = self.weight.device
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_dropout = lora_dropout
        self.fusion = fusion
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        self.fusion_module = (
            CrossAttentionFusion(r, device=device, dtype=adapter_dtype) if fusion == "cross_attention" else None
        )
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default LoRA init: A kaiming-uniform (a = sqrt(5)), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None, *, return_source_output: bool = False):
        """x, source: [..., L, in] -> y [..., out], or (y, y_source) with ``return_source_output``."""
        if source is not None and source.shape != x.shape:
            raise ValueError(f"source must have the shape of x, got {tuple(source.shape)} and {tuple(x.shape)}")
        params = self.fusion_module.params() if self.fusion_module is not None else ()
        out = flare_lora_reference(
            x,
            self.weight,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            source=source,
            fusion=self.fusion,
            bias=self.bias,
            dropout_p=self.lora_dropout if self.training else 0.0,
            fusion_params=params if source is not None else (),
            compute_dtype=x.dtype,
            return_source_output=return_source_output,
        )
        if not return_source_output:
            return out.y
        return out.y, out.y_source

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone: x W^T + b in x's dtype."""
        b = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
            f"fusion={self.fusion!r}, bias={self.bias is not None}, dense"
        )
