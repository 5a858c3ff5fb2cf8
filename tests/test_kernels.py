"""Triton kernels (interpreted on CPU, compiled on CUDA) against the reference, forward and backward.

Every case: kernel error against a float64 reference <= 2 x the error of the reference run by
PyTorch at the input precision + a small atol (tests/tolerance.py).
"""

import dataclasses

import pytest
import torch
import triton
import triton.language as tl

import cases
from cases import Case
from flare_kernels.kernels.common import tf32_hi
from flare_kernels.ops import launch

FUSIONS = ("none", "add", "mul", "add_relu", "matmul", "matmul_relu", "cross_attention")
BASE = Case()
CASES = [
    # every fusion, with and without a source stream
    *[dataclasses.replace(BASE, fusion=f, source=s) for f in FUSIONS for s in (True, False)],
    # sequence-level fusions over several sequences
    *[dataclasses.replace(BASE, fusion=f, m=24, seq=8) for f in ("matmul", "matmul_relu", "cross_attention")],
    # awkward row counts
    *[dataclasses.replace(BASE, m=m) for m in (1, 3, 65)],
    # ranks (BLOCK_R pads 8 to 16; 64 is a full tile)
    *[dataclasses.replace(BASE, r=r, fusion=f) for r in (16, 64) for f in ("add_relu", "mul")],
    # no bias; odd N; K a multiple of the blocksize but not of BLOCK_K (128 under the interpreter)
    dataclasses.replace(BASE, bias=False),
    dataclasses.replace(BASE, n=33, k=96, blocksize=32),
    dataclasses.replace(BASE, k=320, blocksize=64),
    # one quantization block per row and k-tile (the per-row scale path), double quant on and off
    dataclasses.replace(BASE, k=256, blocksize=256),
    dataclasses.replace(BASE, k=256, blocksize=128, double_quant=False),
    dataclasses.replace(BASE, blocksize=64, double_quant=False),
    # blocks that run across rows (K not a multiple of the blocksize)
    dataclasses.replace(BASE, k=160, blocksize=128),
    # dropout with given masks, on each path
    *[dataclasses.replace(BASE, dropout=0.25, fusion=f) for f in ("add_relu", "mul", "none", "matmul", "cross_attention")],
    dataclasses.replace(BASE, dropout=0.25, source=False),
    # activation dtypes
    *[dataclasses.replace(BASE, dtype=dt, fusion=f) for dt in (torch.bfloat16, torch.float16) for f in ("add_relu", "mul", "cross_attention")],
    dataclasses.replace(BASE, dtype=torch.bfloat16, m=65, r=16, dropout=0.1, fusion="add"),
    # fp32 adapters over 16-bit activations (PEFT's QLoRA default): LoRA products in fp32
    *[dataclasses.replace(BASE, dtype=dt, adapter=torch.float32, fusion=f, dropout=p)
      for dt in (torch.bfloat16, torch.float16) for f, p in (("add_relu", 0.0), ("cross_attention", 0.0), ("mul", 0.2))],
    dataclasses.replace(BASE, dtype=torch.bfloat16, adapter=torch.float32, source=False),
]


def check_against_reference(case: Case, device, **kwargs):
    cases.check_against_reference(case, device, "triton", **kwargs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernels_match_reference(case, device):
    check_against_reference(case, device)


@pytest.mark.parametrize("fusion", ["add_relu", "mul", "add"])
@pytest.mark.parametrize("fuse_down", [True, False], ids=["down-in-K-loop", "down-separate-pass"])
def test_down_projection_placement(fusion, fuse_down, device, monkeypatch):
    """Both ways of computing A x (inside the base K loop, or its own pass) give the same result."""
    monkeypatch.setattr(launch, "FUSE_DOWN_DEFAULT", fuse_down)
    check_against_reference(dataclasses.replace(BASE, fusion=fusion, dropout=0.2), device)


DEQUANT_CASES = [
    BASE,
    dataclasses.replace(BASE, fusion="none", source=False, dropout=0.25),
    dataclasses.replace(BASE, fusion="cross_attention", m=24, seq=8, dtype=torch.bfloat16),
    dataclasses.replace(BASE, fusion="mul", dropout=0.2, dtype=torch.bfloat16, adapter=torch.float32),
    dataclasses.replace(BASE, n=33, k=96, blocksize=32, dtype=torch.float16),
    # blocks across rows: the element-wise dequantization
    dataclasses.replace(BASE, k=160, blocksize=128, double_quant=False),
]


@pytest.mark.parametrize("case", DEQUANT_CASES, ids=lambda c: c.id)
def test_dequant_route_matches_reference(case, device, monkeypatch):
    """The large-M route (W dequantized once, torch's GEMM, the LoRA term in place), forced at
    small shapes: same contract as the fused kernels."""
    monkeypatch.setattr(launch, "GEMM_ROUTE", "dequant")
    check_against_reference(case, device)


SPLIT_CASES = [
    BASE,
    dataclasses.replace(BASE, m=1, dtype=torch.bfloat16),
    dataclasses.replace(BASE, fusion="mul", dropout=0.2, bias=False),
    dataclasses.replace(BASE, fusion="none", source=False),
    dataclasses.replace(BASE, fusion="cross_attention", m=24, seq=8, dtype=torch.bfloat16, adapter=torch.float32),
    dataclasses.replace(BASE, k=160, blocksize=128, dtype=torch.float16),
    # fp32 adapters over 16-bit activations: split, the down-projection runs in programs of its own
    dataclasses.replace(BASE, m=3, dtype=torch.bfloat16, adapter=torch.float32, dropout=0.2),
    # above 64 rows (a grid on half the GPU or less is split), one stream and two
    dataclasses.replace(BASE, m=65, fusion="none", source=False, dtype=torch.bfloat16),
    dataclasses.replace(BASE, m=70, dropout=0.2, dtype=torch.bfloat16, adapter=torch.float32),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c.id)
def test_split_forward_and_dx_match_reference(case, device, monkeypatch):
    """The decode forward split over K and dX split over N (partial sums, then an epilogue
    kernel), forced at small shapes by asking for many programs per SM; the fused
    down-projection and the precomputed one (dX: the fused dZ and the precomputed one)."""
    monkeypatch.setattr(launch, "SPLIT_PROGRAMS_PER_SM", 64)
    for fuse_down in (True, False):
        monkeypatch.setattr(launch, "FUSE_DOWN_DEFAULT", fuse_down)
        check_against_reference(case, device)


EIGHT_ROW_CASES = [
    dataclasses.replace(BASE, m=10, dtype=torch.bfloat16, adapter=torch.float32, dropout=0.2),
    dataclasses.replace(BASE, m=3, fusion="mul", dtype=torch.bfloat16),
    dataclasses.replace(BASE, m=5, fusion="add", k=160, blocksize=128),
]


@pytest.mark.parametrize("case", EIGHT_ROW_CASES, ids=lambda c: c.id)
def test_eight_row_stacked_tiles_match_reference(case, device, monkeypatch):
    """Decode's 8-row tiles per stream (both streams one 16-row MMA operand), forced under the
    interpreter: split over K (the down-projection in programs of its own), and unsplit, where
    the launcher widens them to 16 rows."""
    gemm_tiles = launch._gemm_tiles

    def eight_rows(rows, two_streams, target, **kwargs):
        tiles = gemm_tiles(rows, two_streams, target, **kwargs)
        return tiles._replace(block_m=8) if two_streams else tiles

    monkeypatch.setattr(launch, "_gemm_tiles", eight_rows)
    for per_sm in (64, 0):
        monkeypatch.setattr(launch, "SPLIT_PROGRAMS_PER_SM", per_sm)
        check_against_reference(case, device)


@pytest.mark.parametrize("case", [BASE, dataclasses.replace(BASE, fusion="mul", dropout=0.2, dtype=torch.bfloat16)],
                         ids=lambda c: c.id)
def test_unstacked_streams_match_reference(case, device, monkeypatch):
    """Two streams as two MMAs (the large tiles' layout; the interpreter's 16-row tiles stack)."""
    monkeypatch.setattr(launch, "STACK_STREAMS", False)
    check_against_reference(case, device)


def test_dequantized_weight_is_bit_exact(device):
    """The dense buffer the large-M route multiplies holds bitsandbytes' values exactly."""
    from flare_kernels.format.nf4 import quantize_nf4

    for blocksize, k, nested in ((64, 192, True), (128, 160, False), (32, 96, True)):
        w = torch.randn(33, k, generator=torch.Generator().manual_seed(k)).to(device)
        q = quantize_nf4(w, blocksize=blocksize, double_quant=nested)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = launch.dequantize(q.tensors(), dtype)
            assert torch.equal(got, q.tensors().dequantize(torch.float32).to(dtype)), (blocksize, k, nested, dtype)


def test_unknown_gemm_route_is_refused(monkeypatch):
    monkeypatch.setattr(launch, "GEMM_ROUTE", "cublas")
    with pytest.raises(ValueError, match="FLARE_KERNELS_GEMM_ROUTE must be one of"):
        launch.gemm_route(4096, launch.Target(num_sms=132))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [16, 4096])
@pytest.mark.parametrize("fusion", ["add_relu", "none", "cross_attention"])
def test_llama_q_proj_shape_on_gpu(m, fusion, device):
    """Llama 3.1 8B q_proj (4096 x 4096), r = 8, bf16, sequences of 128 tokens."""
    case = Case(m=m, k=4096, n=4096, r=8, fusion=fusion, dtype=torch.bfloat16, seq=min(m, 128))
    check_against_reference(case, device)


@triton.jit
def _tf32_hi_kernel(v_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tf32_hi(tl.load(v_ptr + offs)))


def test_tf32_split_of_fp32_adapter_products(device):
    """lora_mma's fp32-adapter product against a 16-bit operand (GPU: two TF32 dots) rests on
    tf32_hi: a_hi holds a's 10 high mantissa bits (exact in TF32), a - a_hi is exact in fp32 and
    at most 2**-10 |a|, so a_hi b + tf32(a - a_hi) b is a b to about 2**-21 for a bf16 b."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4096, generator=g) * torch.logspace(-20, 20, 4096)
    a_hi = torch.empty_like(a, device=device)
    _tf32_hi_kernel[(1,)](a.to(device), a_hi, N=4096)
    a_hi = a_hi.cpu()
    assert torch.all(a_hi.view(torch.int32) & 0x1FFF == 0)
    lo = a - a_hi
    assert torch.equal(a_hi + lo, a)
    assert torch.all(lo.abs() <= a.abs() * 2.0**-10)
    # TF32 rounding of the low part (nearest, 10 mantissa bits), products of TF32 x bf16 exact in fp32
    lo_tf32 = ((lo.view(torch.int32) + 0x1000) & -8192).view(torch.float32)
    b = torch.randn(4096, generator=g).to(torch.bfloat16).double()
    approx = a_hi.double() * b + lo_tf32.double() * b
    assert torch.all((approx - a.double() * b).abs() <= (a.double() * b).abs() * 2.0**-21)
