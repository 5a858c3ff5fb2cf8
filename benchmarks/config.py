"""What is measured: layer shapes, benchmark cases and the presets that select them.

A case is one cell of the grid: (op, shape, r, M, mode). ``M`` counts tokens per stream: a FLARE
case runs M target rows and M aligned source rows through the same weight.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shape:
    """One projection of a real model: weight [n = out_features, k = in_features]."""

    name: str
    n: int
    k: int
    # FLARE fuses only in the query and value projections (flare-method.md); k/o/gate/up/down get
    # plain LoRA, so the FLARE op is benchmarked on q- and v-shaped weights only.
    flare: bool

    @property
    def label(self) -> str:
        return f"{self.name}:{self.n}x{self.k}"


# Llama 3.1 8B: hidden 4096, 32 heads / 8 KV heads of 128, intermediate 14336.
# Gemma 2 9B: hidden 3584, 16 heads / 8 KV heads of 256, intermediate 14336.
SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("llama3.1-8b.q", 4096, 4096, flare=True),
        Shape("llama3.1-8b.kv", 1024, 4096, flare=True),  # v fuses, k is plain LoRA
        Shape("llama3.1-8b.o", 4096, 4096, flare=False),
        Shape("llama3.1-8b.gate_up", 14336, 4096, flare=False),
        Shape("llama3.1-8b.down", 4096, 14336, flare=False),
        Shape("gemma2-9b.q", 4096, 3584, flare=True),
        Shape("gemma2-9b.v", 2048, 3584, flare=True),
    )
}

# op name in the CSV -> fusion passed to the op (FLARE with a source stream, or plain LoRA).
OPS: dict[str, str] = {"flare_add_relu": "add_relu", "lora": "none"}
MODES = ("fwd", "bwd", "fwd+bwd")
RANKS = (8, 16, 64)
TOKENS = (1, 16, 128, 512, 4096, 16384)


@dataclass(frozen=True)
class Case:
    """One benchmark cell.

    mode: ``fwd`` is an inference forward (no autograd graph, the decoding path); ``bwd`` is the
    backward alone after a grad-enabled forward; ``fwd+bwd`` is a training forward plus backward.
    """

    op: str
    shape: Shape
    r: int
    m: int
    mode: str

    @property
    def fusion(self) -> str:
        return OPS[self.op]

    @property
    def two_stream(self) -> bool:
        return self.fusion != "none"

    @property
    def key(self) -> tuple[str, str, str, int, int]:
        return (self.op, self.mode, self.shape.label, self.r, self.m)

    def __str__(self) -> str:
        return f"{self.op} {self.mode} {self.shape.name} r={self.r} M={self.m}"


@dataclass(frozen=True)
class Preset:
    """A grid of cases plus per-provider limits (to keep slow providers inside a time budget)."""

    name: str
    shapes: tuple[str | Shape, ...]  # names in SHAPES, or Shape objects (tests use tiny ones)
    ranks: tuple[int, ...]
    tokens: tuple[int, ...]
    modes: tuple[str, ...] = MODES
    ops: tuple[str, ...] = tuple(OPS)
    # provider -> modes it runs in under this preset (absent: every mode it supports)
    provider_modes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # provider -> the M values it runs at under this preset (absent: every M)
    provider_tokens: dict[str, tuple[int, ...]] = field(default_factory=dict)
    e2e: str = "cpu"  # end-to-end size: "cpu" (reduced) or "gpu" (8B-shaped layers)

    def cases(self) -> list[Case]:
        out = []
        for op, s, r, m, mode in itertools.product(self.ops, self.shapes, self.ranks, self.tokens, self.modes):
            shape = s if isinstance(s, Shape) else SHAPES[s]
            if OPS[op] != "none" and not shape.flare:
                continue
            out.append(Case(op, shape, r, m, mode))
        return out

    def runs(self, provider: str, case: Case) -> bool:
        modes = self.provider_modes.get(provider)
        if modes is not None and case.mode not in modes:
            return False
        tokens = self.provider_tokens.get(provider)
        return tokens is None or case.m in tokens


PRESETS: dict[str, Preset] = {
    # This 2-core CPU, within 10 minutes: the real Llama 3.1 8B q and k/v weights at decode and
    # short-prefill sizes. The eager reference needs about 1 s per 4096x4096 call here and
    # torch.compile 7 to 13 s per compilation, so compilation is limited to the forward.
    "cpu": Preset(
        "cpu",
        shapes=("llama3.1-8b.q", "llama3.1-8b.kv"),
        ranks=(16,),
        tokens=(1, 16, 128),
        provider_modes={"reference_compiled": ("fwd",)},
        e2e="cpu",
    ),
    # One GPU command (< 10 min on an H200): the shapes the targets name, r = 16, every M;
    # torch.compile at a decode and a prefill size (each (shape, op, grad mode) compiles anew).
    "gpu": Preset(
        "gpu",
        shapes=("llama3.1-8b.q", "llama3.1-8b.kv", "llama3.1-8b.gate_up", "llama3.1-8b.down"),
        ranks=(16,),
        tokens=TOKENS,
        provider_tokens={"reference_compiled": (16, 4096)},
        e2e="gpu",
    ),
    # The benchmark part of the one-call GPU check (benchmarks/gpu_check.py: about 2 of its 8
    # minutes): the q and gate/up weights at decode, prefill and training row counts, the
    # providers a user compares (ours, bitsandbytes + PEFT, the unsloth style, bitsandbytes'
    # gemm_4bit, the bare bf16 GEMM); the reference, torch.compile and the down-projection
    # variants are left to the ``gpu`` preset.
    "gpu-check": Preset(
        "gpu-check",
        shapes=("llama3.1-8b.q", "llama3.1-8b.gate_up"),
        ranks=(16,),
        tokens=(1, 16, 512, 4096),
        provider_modes={p: () for p in ("reference", "reference_compiled", "dense_bf16",
                                        "ours_bf16_fused_down", "ours_bf16_split_down")},  # fmt: skip
        e2e="gpu",
    ),
    # The whole grid of issue 4 (several GPU commands: resumable with --resume).
    "full": Preset("full", shapes=tuple(SHAPES), ranks=RANKS, tokens=TOKENS, e2e="gpu"),
    # Seconds: a toy q-shaped weight, to check the harness end to end (tests, --preset smoke).
    "smoke": Preset(
        "smoke",
        shapes=(Shape("toy.q", 256, 512, flare=True),),
        ranks=(8,),
        tokens=(1, 16),
        provider_modes={"reference_compiled": ()},
        e2e="tiny",
    ),
}
