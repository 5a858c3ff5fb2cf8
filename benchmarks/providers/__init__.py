"""The implementations compared, in table order. ``all_providers()`` builds fresh instances."""

from __future__ import annotations

from .base import ACT_DTYPE, ADAPTER_DTYPE, Inputs, Layer, LayerWeights, Provider, make_inputs
from .bnb_peft import BnbGemm4bit, BnbPeft, BnbPeftCpuPacked
from .dense import DenseBf16, DenseBf16Gemm
from .ours import Ours, OursBf16Down, Reference, ReferenceCompiled, fuse_down_default, resolved_backend
from .unsloth_style import UnslothStyle

# The baselines a user would otherwise run, compared with ``ours`` in the speedup plots; on a CPU
# the faster of bitsandbytes' two paths is taken per case.
BNB_PEFT = ("bnb_peft", "bnb_peft_cpu_packed")


def all_providers() -> list[Provider]:
    return [
        Ours(),
        OursBf16Down(fuse_down=True),
        OursBf16Down(fuse_down=False),
        Reference(),
        ReferenceCompiled(),
        BnbPeft(),
        BnbPeftCpuPacked(),
        UnslothStyle(),
        DenseBf16(),
        DenseBf16Gemm(),
        BnbGemm4bit(),
    ]


def provider_names() -> list[str]:
    return [p.name for p in all_providers()]


__all__ = [
    "ACT_DTYPE",
    "ADAPTER_DTYPE",
    "BNB_PEFT",
    "Inputs",
    "Layer",
    "LayerWeights",
    "Provider",
    "all_providers",
    "fuse_down_default",
    "make_inputs",
    "provider_names",
    "resolved_backend",
]
