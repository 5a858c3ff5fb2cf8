"""Compiled Triton kernels against the float64 reference at the real Llama 3.1 8B shapes (GPU only).

The interpreter tests (test_kernels.py) cover every code path at small, awkward shapes; these run
the compiled kernels where the tiles and the tensor-core dtypes are the ones users get: q/o (4096 x 4096) and gate/up (14336 x 4096), M from 1 to 8192 rows per stream,
every fusion, forward (both streams) and backward (dX, dA, dB, fusion parameters), bf16
activations with bf16 or fp32 (PEFT's QLoRA default) adapters. Same check as everywhere:
``cases.check_against_reference`` with the tolerance rule of tests/tolerance.py (error against a
float64 reference on the same inputs <= 2 x PyTorch's error at the input precision + a small atol).

Sized for the one-call GPU check (``python -m benchmarks.gpu_check``, about 4 of its 8 minutes on an
H100, most of it Triton compilation: about 90 distinct kernel specializations). The grid comes in
order of value, so a budget cut (conftest's FLARE_GPU_CHECK_DEADLINE) drops the largest cases last
to start: (1) every fusion x adapter dtype on the q shape at a decode row count and an awkward
prefill row count, (2) the M sweep of the default fusion and plain LoRA on both shapes, (3) the
largest problems (14336 x 4096, M = 8192) with fp32 adapters and a sequence-level fusion.
"""

from __future__ import annotations

import pytest
import torch

import cases
from cases import Case

FUSIONS = ("none", "add", "mul", "add_relu", "matmul", "matmul_relu", "cross_attention")
SHAPES = {"q": (4096, 4096), "gate_up": (14336, 4096)}  # name: (N = out_features, K = in_features)
ADAPTERS = {"bf16": None, "fp32": torch.float32}  # None: the activations' dtype (bf16)
M_SWEEP = (1, 16, 64, 1000, 8192)  # GEMV (M = 1 is its own specialization), narrow, 64-row, ragged, large
SEQ_MAX = 128  # tokens per sequence for the sequence-level fusions (matmul*, cross_attention)


def seq_len(m: int) -> int:
    """Sequences of at most 128 tokens (the largest divisor of m up to 128: 1000 -> 8 x 125)."""
    return next(d for d in range(min(m, SEQ_MAX), 0, -1) if m % d == 0)


def gpu_case(shape: str, m: int, fusion: str, adapter: str = "bf16") -> Case:
    """One real-shape problem: r = 16, bias, NF4 with double quantization, blocksize 64, bf16
    activations; plain LoRA (fusion ``none``) without a source stream, FLARE with one."""
    n, k = SHAPES[shape]
    return Case(m=m, k=k, n=n, r=16, fusion=fusion, source=fusion != "none", bias=True, dtype=torch.bfloat16,
                adapter=ADAPTERS[adapter], blocksize=64, double_quant=True, seq=seq_len(m))  # fmt: skip


def _grid() -> list[tuple[str, Case]]:
    out: list[tuple[str, Case]] = []
    # (1) every fusion x adapter dtype, q shape, a decode-size and a ragged prefill row count
    out += [("q", gpu_case("q", m, f, a)) for m in (16, 1000) for a in ADAPTERS for f in FUSIONS]
    # (2) the M sweep: default fusion and plain LoRA, both shapes, bf16 adapters
    out += [(s, gpu_case(s, m, f)) for s in SHAPES for m in M_SWEEP for f in ("add_relu", "none")]
    # (3) fp32 adapters at one row (their own skinny passes), then the largest problems: fp32
    # adapters, and a sequence-level fusion
    out += [("q", gpu_case("q", 1, f, "fp32")) for f in ("add_relu", "none")]
    out += [("gate_up", gpu_case("gate_up", 8192, f, a))
            for f, a in (("add_relu", "fp32"), ("none", "fp32"), ("cross_attention", "bf16"))]  # fmt: skip
    seen, unique = set(), []
    for shape, case in out:
        if case not in seen:
            seen.add(case)
            unique.append((shape, case))
    return unique


GPU_CASES: list[tuple[str, Case]] = _grid()


def case_id(item: tuple[str, Case]) -> str:
    shape, case = item
    return f"{shape}-{case.id}"


@pytest.mark.gpu
@pytest.mark.parametrize("item", GPU_CASES, ids=case_id)
def test_compiled_kernels_match_reference_at_real_shapes(item, device):
    _, case = item
    cases.check_against_reference(case, device, "triton")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the float64 reference of the largest cases holds several GB


def test_grid_covers_what_the_gpu_check_promises():
    """Runs everywhere (no GPU): the grid has every fusion x adapter dtype, both shapes, M 1..8192."""
    fusions_by_adapter = {(c.fusion, c.adapter) for _, c in GPU_CASES}
    assert fusions_by_adapter >= {(f, a) for f in FUSIONS for a in ADAPTERS.values()}
    assert {s for s, _ in GPU_CASES} == set(SHAPES)
    for shape in SHAPES:
        assert {c.m for s, c in GPU_CASES if s == shape} == set(M_SWEEP)
    assert all(c.m % c.seq == 0 for _, c in GPU_CASES)
    assert len({case_id(x) for x in GPU_CASES}) == len(GPU_CASES)
