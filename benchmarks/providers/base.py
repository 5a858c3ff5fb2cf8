"""What every provider shares: the inputs of a case, one copy of a layer's weights, the interface.

A provider builds a ``Layer`` from ``LayerWeights`` once per (shape, r, copy) and the runner calls
it for every M and mode. ``layer(inputs, case)`` returns ``(y_target, y_source_or_None)``: a FLARE
case must produce both streams' outputs (the next layer of the source stream needs its rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import MODES, Case, Shape

ACT_DTYPE = torch.bfloat16  # activations and compute dtype (QLoRA's bnb_4bit_compute_dtype)
ADAPTER_DTYPE = torch.float32  # LoRA factors: PEFT casts adapters of 4-bit models to fp32


@dataclass
class Inputs:
    x: torch.Tensor  # [M, K] target rows; requires grad in the training modes
    src: torch.Tensor | None  # [M, K] aligned source rows (FLARE only), no grad
    x_all: torch.Tensor  # [S*M, K] both streams in one buffer, no grad (the dense GEMM anchor)
    dy: torch.Tensor  # [M, N] gradient of the target output

    def grad_tensors(self) -> list[torch.Tensor]:
        return [self.x] if self.x.requires_grad else []


def make_inputs(case: Case, dev: torch.device, seed: int = 0) -> Inputs:
    g = torch.Generator(device=dev).manual_seed(seed)
    m, k, n = case.m, case.shape.k, case.shape.n
    streams = 2 if case.two_stream else 1
    x_all = torch.randn((streams * m, k), generator=g, device=dev, dtype=ACT_DTYPE)
    src = x_all[:m].clone() if case.two_stream else None
    x = x_all[(streams - 1) * m :].clone().requires_grad_(case.mode != "fwd")
    dy = torch.randn((m, n), generator=g, device=dev, dtype=ACT_DTYPE)
    return Inputs(x, src, x_all, dy)


@dataclass
class LayerWeights:
    """One copy of a projection's weights: the dense weight it is quantized from and LoRA factors."""

    shape: Shape
    r: int
    dev: torch.device
    seed: int = 0
    scaling: float = 2.0  # lora_alpha / r with alpha = 2r (QLoRA's alpha 16 at r 8)
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        g = torch.Generator(device=self.dev).manual_seed(1000 + self.seed)
        n, k, r = self.shape.n, self.shape.k, self.r
        # A kaiming-uniform as PEFT initializes it; B random (PEFT's zeros would make the update
        # exactly zero, which some paths could short-cut; a trained adapter is not zero).
        bound = 1.0 / math.sqrt(k)
        self.dense = (torch.randn((n, k), generator=g, device=self.dev) * 0.02).to(ACT_DTYPE)
        self.lora_a = (torch.rand((r, k), generator=g, device=self.dev) * 2 - 1) * bound
        self.lora_b = torch.randn((n, r), generator=g, device=self.dev) * 0.02

    def cached(self, key: str, build: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def nf4(self):
        """The weight in NF4 (flare_kernels' format; bytes identical to bitsandbytes')."""
        import flare_kernels as fk

        return self.cached("nf4", lambda: fk.quantize_nf4(self.dense, blocksize=64, double_quant=True))

    def trainable_lora(self, dtype: torch.dtype = ADAPTER_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh leaf copies (each provider trains its own factors)."""
        return tuple(t.to(dtype, copy=True).requires_grad_(True) for t in (self.lora_a, self.lora_b))


def tensor_bytes(*tensors) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


@dataclass
class Layer:
    """A built provider instance: ``fn(inputs, case) -> (y, y_source | None)``."""

    fn: Callable[[Inputs, Case], tuple[torch.Tensor, torch.Tensor | None]]
    params: list[torch.Tensor]  # trainable tensors (their .grad is reset between timed calls)
    state_bytes: int  # bytes of the weights this provider holds (its format + LoRA factors)
    info: dict = field(default_factory=dict)

    def __call__(self, inputs: Inputs, case: Case):
        return self.fn(inputs, case)


class Provider:
    """One implementation of the op. Subclasses set the class attributes and ``build``."""

    name: str = ""
    label: str = ""  # legend text in plots
    modes: tuple[str, ...] = MODES
    devices: tuple[str, ...] = ("cpu", "cuda")
    max_m: int | None = None
    ours: bool = False

    def unavailable(self, dev: torch.device) -> str | None:
        """Why this provider cannot run on ``dev`` (a missing package, another device), or None."""
        if dev.type not in self.devices:
            return f"runs on {'/'.join(self.devices)} only"
        return None

    def supports(self, case: Case) -> bool:
        return case.mode in self.modes and (self.max_m is None or case.m <= self.max_m)

    def build(self, weights: LayerWeights) -> Layer:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<provider {self.name}>"
