"""The trainable part shared by every FLARE-LoRA layer: A, B, the fusion's parameters, their init.

Parameter names follow PEFT (``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]) so adapter
state dicts carry over; ``fusion_module.{q,k,v}`` holds the cross-attention fusion's linears.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..reference.fusion import FUSIONS, check_heads
from .cross_attention import CrossAttentionFusion

ADAPTER_PREFIXES = ("lora_A.", "lora_B.", "fusion_module.")


class LoraAdapter(nn.Module):
    """Base class: owns the adapter of an ``in_features -> out_features`` layer; subclasses own
    the frozen base weight and the forward."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        fusion: str,
        device: torch.device | None,
        adapter_dtype: torch.dtype,
        cross_attention_heads: int = 1,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if fusion == "cross_attention":
            check_heads(cross_attention_heads, r)
        if isinstance(attention_dropout, bool) or not isinstance(attention_dropout, numbers.Real) or not (
            0.0 <= attention_dropout < 1.0
        ):
            raise ValueError(f"attention_dropout must be in [0, 1), got {attention_dropout!r}")
        # as FlareConfig and the CLI refuse it: a negative or zero alpha flips or silences the adapter
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
        self.in_features, self.out_features = in_features, out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_dropout = lora_dropout
        self.fusion = fusion
        self.cross_attention_heads = cross_attention_heads
        self.attention_dropout = float(attention_dropout)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=adapter_dtype)
        self.fusion_module = (
            CrossAttentionFusion(r, device=device, dtype=adapter_dtype) if fusion == "cross_attention" else None
        )
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default LoRA init: A kaiming-uniform (a = sqrt(5)), B zeros (the adapter starts as a no-op)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def adapter_kwargs(self, source: torch.Tensor | None) -> dict:
        """The adapter's arguments to ``flare_lora_linear`` / the reference for one forward."""
        params = self.fusion_module.params() if self.fusion_module is not None and source is not None else ()
        return dict(
            lora_A=self.lora_A.weight,
            lora_B=self.lora_B.weight,
            scaling=self.scaling,
            source=source,
            fusion=self.fusion,
            dropout_p=self.lora_dropout if self.training else 0.0,
            fusion_params=params,
            heads=self.cross_attention_heads,
            attention_dropout_p=self.attention_dropout if self.training else 0.0,
        )

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trainable adapter tensors, keyed as in a PEFT adapter file (``lora_A.weight``, ...)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(ADAPTER_PREFIXES)}

    def _attention_repr(self) -> str:
        if self.fusion != "cross_attention":
            return ""
        return f"cross_attention_heads={self.cross_attention_heads}, attention_dropout={self.attention_dropout}, "

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
            f"fusion={self.fusion!r}, {self._attention_repr()}bias={getattr(self, 'bias', None) is not None}"
        )
