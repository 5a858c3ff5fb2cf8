"""Launchers for the Triton kernels: pick tiles, allocate, launch; plus the torch glue between them.

Inputs arrive validated and flattened by ``ops/functional.py``: x and source [M, K] (any strides),
masks uint8/bool [M, K], A [R, K], B [N, R]. Rank-r intermediates are fp32 [M, R].
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..format.nf4 import NF4Tensors
from ..kernels import (
    INTERPRETED, flare_dx_kernel, flare_dx_splitn_epilogue_kernel, flare_fwd_kernel, flare_fwd_splitk_epilogue_kernel, lora_down_kernel,
    lora_reduce_kernel, lora_up_kernel, nf4_dequant_kernel,
)  # fmt: skip
from ..reference.fusion import FUSIONS, fuse, is_per_token
from .fusion_glue import Grads, LoraCall, rank_r_backward, zero_grads
from .fusion_glue import fusion_plan as _fusion_plan
from .fusion_glue import keep_scale as _keep_scale
from .fusion_glue import sequence_fuse as _sequence_fuse
from .plan import LibraryCall, Launch, Target, submit


_CODE_PAIRS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def code_pairs(code: torch.Tensor) -> torch.Tensor:
    """[256] int64: packed byte b -> the fp32 pair (code[b >> 4], code[b & 15]) (the first weight
    of the byte, in its high nibble, in the low half): the per-row dequantization's lookup table
    (``nf4_rows``: one 8-byte gather per two weights).

    Built once per 16-entry code tensor and kept with it (bitsandbytes shares one code per
    device; a weight of ours has its own: 2 KiB each, 448 KiB for the 224 projections of Llama
    3.1 8B). The key holds the code tensor itself, so its address cannot be reused while cached,
    and its version counter, so an in-place change builds a new table.
    """
    if code.device.type == "meta":
        return torch.empty((256,), dtype=torch.int64, device=code.device)
    key = (code.data_ptr(), code.device, code._version)
    hit = _CODE_PAIRS.get(key)
    if hit is None:
        c = code.float()
        pairs = torch.stack((c.repeat_interleave(16), c.repeat(16)), dim=1).contiguous()
        hit = _CODE_PAIRS[key] = (code, pairs.view(torch.int64).view(256))
    return hit[1]


def _weight_pointers(w: NF4Tensors, row_blocks: bool) -> tuple[torch.Tensor, ...]:
    # The per-row path (row_blocks) reads the code through its byte-pair table.
    code = code_pairs(w.code) if row_blocks else w.code
    # Unused nested slots get a real tensor: the kernels never read them (NESTED is constexpr).
    if w.nested:
        return (w.packed, w.absmax, code, w.nested_absmax, w.nested_code, w.nested_offset)
    return (w.packed, w.absmax, code, w.code, w.code, w.code)


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Under the interpreter every tile costs NumPy time, and small tiles exercise the edge masks:
# K = 192 runs one full and one partial 128-wide K block.
_INTERPRETER_TILES = Tiles(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=1)
GROUP_M = 8

# Whether the forward computes the down-projection inside the base K loop (per-token fusions).
# It costs r / BLOCK_N more FLOPs per tile; the separate pass costs one more read of x and a launch.
# Default on (the separate pass's launch dominates at decode sizes); FLARE_KERNELS_FUSE_DOWN=0
# selects the separate pass so the benchmarks can compare both.
FUSE_DOWN_DEFAULT = os.environ.get("FLARE_KERNELS_FUSE_DOWN", "1") != "0"


# Which loop runs an NF4 GEMM (the forward, or dX) of a call with `rows` rows per stream:
#   "fused":   the weight is dequantized in registers inside the GEMM loop (one pass over the
#              4-bit bytes serves both streams): the way to go while reading W is the bound;
#   "dequant": W is dequantized once into a dense buffer in the activation dtype (2 N K bytes,
#              freed after the call: 32 MiB for a 4096 x 4096 projection) and torch's GEMM
#              (cuBLAS) computes each stream; the LoRA term is a rank-r epilogue kernel.
# "auto" takes "dequant" on a GPU from DEQUANT_MIN_ROWS rows (forward) and DEQUANT_MIN_ROWS_DX
# (dX), where the static report predicts it faster. Llama 3.1 8B q_proj, two streams, bf16
# adapters, H200, triton 3.6 / 3.9, fused against dequant, in us:
#   forward M = 64: 24 / 34 against 28 / 28;  M = 128: 34 / 46 against 29 / 29;
#           M = 1024: 138 / 185 against 105 / 105;
#   backward M = 256: 21 / 18 against 26 / 26;  M = 512: 42 / 37 against 40 / 40;
#           M = 1024: 85 / 73 against 67 / 68.
# FLARE_KERNELS_GEMM_ROUTE=fused|dequant forces a route (benchmarks, tests).
STACK_STREAMS = True
# dX tiles at decode sizes (BLOCK_N is dX's reduction step, BLOCK_K its output width), split
# over N (_dx_fused). Static report, sm_90, Llama 3.1 8B q_proj, triton 3.6 / 3.9, main-loop
# warp-instructions per weight with bf16 / fp32 adapters:
#   M <= 16: one warp, 16 x 32 x 64, 2 stages, 512 programs: 0.27 / 0.24 and 0.24 / 0.23 (the
#            4-warp 16 x 64 x 32 tile, 128 programs: 0.30 to 0.63; 3 stages spill 4 B on 3.9);
#   M <= 64: 64 x 64 x 128, 4 warps, 320 programs: 0.26 / 0.26 and 0.25 / 0.24 (64 x 64 x 64:
#            0.36 / 0.40 and 0.30 / 0.38).
DX_DECODE_TILES = Tiles(16, 32, 64, 1, 2)
DX_SMALL_TILES = Tiles(64, 64, 128, 4, 4)
# The one-stream forward (plain LoRA) above 64 rows, 16-bit activations, blocks inside rows: 128
# deep at 2 stages. Static report, sm_90, Llama 3.1 8B q_proj, M = 512, triton 3.6 / 3.9,
# warp-instructions per weight with bf16 adapters 0.29 / 0.27, fp32 0.26 / 0.25 (64 deep at 3
# stages: 0.32 / 0.37 and 0.29 / 0.34). A 4096 x 512 output is 128 such tiles, 4 SMs idle, and
# the launch tensor-bound at a predicted 22 us (H200). Tiles are powers of two, so more programs
# means 256: 64-row tiles dequantize W twice as often (issue-bound, predicted 36 us), 128 x 64
# tiles run 0.49 warp-instructions per weight, and two K splits add 2 x 16.8 MB of fp32 partial
# sums to write and read back.
FWD_ONE_STREAM_TILES = Tiles(128, 128, 128, 8, 2)
GEMM_ROUTE = os.environ.get("FLARE_KERNELS_GEMM_ROUTE", "auto")
GEMM_ROUTES = ("auto", "fused", "dequant")
DEQUANT_MIN_ROWS = 128
# One stream (plain LoRA) reads W once on either route, so its forward switches later: M = 512:
# fused 32.0 / 27.7 against 35.0; M = 4096: 256 / 221 against 208 (the crossover near 1024).
DEQUANT_MIN_ROWS_ONE_STREAM = 1024
DEQUANT_MIN_ROWS_DX = 512

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _lora_dtype(t: torch.Tensor):
    """The precision of the LoRA-branch products: the adapter's dtype (PEFT computes in it)."""
    return _TL_DTYPES[t.dtype]


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _target(device: torch.device, target: Target | None) -> Target:
    return Target.of(device, INTERPRETED) if target is None else target


def _gemm_tiles(rows: int, two_streams: bool, target: Target, row_blocks: bool = True, wide: bool = False) -> Tiles:
    """Tiles for the two NF4 GEMMs (forward and dX), by rows per stream.

    Heuristics for Hopper, to be replaced by the benchmark suite's measurements: small row counts
    are bound by reading the 4-bit weights (narrow N tiles spread them over more SMs); large ones
    by tensor-core throughput (128-wide tiles; half the rows per stream when both streams share a
    program, so the two fp32 accumulators fit in registers).
    """
    if target.interpret:
        return _INTERPRETER_TILES
    if rows <= 16:
        # One warp per program, 16 x 32 x 64 tiles, split over K (forward) to 512 programs on a
        # 4096 x 4096 layer: the two streams stack into one 32-row MMA with no warp repeating
        # another's tensor work (forward.py, STACK). Static report, sm_90, M = 16, two streams,
        # fp32 adapters, H200 (triton 3.6 / 3.9): 0.29 / 0.29 warp-instructions per weight
        # (against 16 x 32 x 128 at 4 warps unstacked and unsplit: 1.02 / 0.88); 2 warps: 0.36 /
        # 0.41; 4 warps 128 deep: 0.44 / 0.46.
        # Up to 8 rows, 8 per stream (a 16-row stacked MMA, half the padded tensor work): M = 1,
        # 618 -> 501 and 591 -> 482 loop instructions per 2048 weights (one stacked load of x
        # instead of two and a join included), 0.24 / 0.24 warp-instructions per weight.
        return Tiles(8 if rows <= 8 and two_streams else 16, 32, 64, 1, 4)
    if rows <= 64 or (two_streams and rows < DEQUANT_MIN_ROWS):
        # 128-wide N tiles (split over K to 320-384 programs): static report, sm_90, M = 64,
        # triton 3.6 / 3.9, warp-instructions per weight, two streams with fp32 / bf16 adapters:
        # 0.26 / 0.27 and 0.25 / 0.27; one stream 0.23 (64-wide tiles at 4 stages: 0.35 / 0.41,
        # 0.38 / 0.44 and 0.37; 64 x 128-deep: 0.32 / 0.36).
        # Two streams keep this class (stacked, split over K) up to the dequant route: M = 96,
        # triton 3.6 / 3.9, fp32 adapters: 0.23 / 0.23 warp-instructions per weight, predicted
        # 20.0 / 20.6 us, against 0.36 / 0.39 and 21.5 / 23.2 us for the one-stream class's 64-row
        # tiles at 8 warps (bf16 adapters: 19.6 / 20.1 against 18.5 / 21.8 us).
        # Blocks across rows (element-wise dequantization) need more shared memory: 243,712 B for
        # this tile at 3 stages (an H100 has 232,448 B), and 194,560 B for a 64-wide one at 4 (an
        # A100 has 166,912 B): 64 wide at 2 stages.
        return Tiles(32 if two_streams else 64, 128 if row_blocks else 64, 64, 4, 3 if row_blocks else 2)
    if wide:
        # fp32 activations: a 128-row dX tile needs 173,056 B of shared memory even at 2 stages on
        # an A100 (166,912 B; tests/test_aot_compile.py); 64 rows need 107,520 B.
        return Tiles(32 if two_streams else 64, 128, 64, 8, 2)
    # The element-wise dequantization (blocks across rows) needs 323,584 B for its 128 x 128 x 64
    # dX tile at 3 stages under triton 3.6 (an H100 has 232,448 B), 188,416 B at 2.
    # One stream keeps 128 rows although 64 x 128 x 64 at 4 warps runs its loop in fewer
    # warp-instructions per weight (0.23 against 0.35 at M = 512): each row tile dequantizes W
    # again, so 64-row tiles do it 8 times at M = 512, and the static report predicts the forward
    # at 34 against 24 us (H200, triton 3.6), 256 programs against 128.
    return Tiles(64 if two_streams else 128, 128, 64, 8, 3 if row_blocks else 2)


def gemm_route(rows: int, target: Target, dx: bool = False, two_streams: bool = True) -> str:
    """"fused" or "dequant" for the forward (of one or two streams) or, with ``dx``, the dX GEMM of
    a call with ``rows`` rows per stream (see GEMM_ROUTE)."""
    if GEMM_ROUTE not in GEMM_ROUTES:
        raise ValueError(f"FLARE_KERNELS_GEMM_ROUTE must be one of {GEMM_ROUTES}, got {GEMM_ROUTE!r}")
    if GEMM_ROUTE != "auto":
        return GEMM_ROUTE
    # The interpreter runs the fused kernels at every size: they are the ones to test.
    threshold = DEQUANT_MIN_ROWS_DX if dx else (DEQUANT_MIN_ROWS if two_streams else DEQUANT_MIN_ROWS_ONE_STREAM)
    return "dequant" if rows >= threshold and not target.interpret else "fused"


def _options(tiles: Tiles) -> dict:
    # No fused multiply-add: the nested absmax must be code * scale + offset with two roundings,
    # exactly as bitsandbytes computes it.
    return dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages, enable_fp_fusion=False)


def _row_blocks(w: NF4Tensors) -> bool:
    """Every quantization block lies inside one row: the kernels' fast dequantization path (whole
    packed bytes per row, one scale per row and block), whose offsets are 32-bit."""
    if w.packed.numel() >= 2**31:
        raise ValueError(
            f"the Triton kernels index NF4 weights with 32-bit offsets: {w.out_features} x {w.in_features} "
            "is 2**32 values or more; split the projection"
        )
    # 32-bit words of packed bytes per row: rows start on 4-byte boundaries (K % 8 == 0 follows
    # from K % BS == 0 for every blocksize bitsandbytes allows, 32 and up) and so must the buffer
    # (a view into a bf16 quant_storage parameter may start anywhere).
    return w.in_features % w.blocksize == 0 and w.in_features % 8 == 0 and w.packed.data_ptr() % 4 == 0


def _as_u8(mask: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return fallback if mask is None else mask.view(torch.uint8)


def _strides(t: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"the Triton backend takes float16, bfloat16 or float32 activations, got {x.dtype}; "
            "use FLARE_KERNELS_BACKEND=torch for other dtypes"
        )


# ------------------------------------------------------------------------------------ skinny GEMMs
# Programs per SM that a launch split over K aims for (two: 264 on 132 SMs; the tests raise it to
# reach the split paths at small shapes).
SPLIT_PROGRAMS_PER_SM = 2


def _k_splits(k: int, block_k: int, programs: int, target: Target, one_warp: bool = False,
              fill_only: bool = False) -> tuple[int, int]:
    """(splits, columns per split) for a launch of ``programs`` programs before splitting K:
    enough splits for SPLIT_PROGRAMS_PER_SM programs per SM, each a whole number of BLOCK_K steps.

    ``one_warp`` programs aim for four per SM and no more, one per warp scheduler: an SM issues
    from at most min(4, resident warps) warps a clock, and its busiest share of programs sets the
    time. dX at M = 16 on 4096 x 4096 (64 programs): 8 splits, 512 programs, where two per SM gave
    6 splits and 384 programs, three warps on the busiest SM (static report, H200: 4.2 against 6.4 us).

    ``fill_only`` (the GEMMs above 64 rows, whose fp32 partial sums grow with M): a grid on at
    most half the SMs is split to one program per SM (half SPLIT_PROGRAMS_PER_SM), a larger one
    not. Static report, H200, Llama 3.1 8B q_proj, triton 3.9, fp32 adapters: plain LoRA's forward
    at M = 128, 32 programs: 23.3 -> 12.7 us; FLARE's at M = 96: 25.5 -> 23.2; dX at M = 128, 64
    programs: 18.7 -> 16.5; but dX at M = 256, 128 programs split in two: 18.2 -> 21.2 us.
    """
    if fill_only:
        if 2 * programs > target.num_sms * max(1, SPLIT_PROGRAMS_PER_SM // 2):
            return 1, k
        want = triton.cdiv(max(1, SPLIT_PROGRAMS_PER_SM // 2) * target.num_sms, programs)
    elif one_warp and SPLIT_PROGRAMS_PER_SM < 4:  # (the tests raise SPLIT_PROGRAMS_PER_SM to force splits)
        want = max(1, 4 * target.num_sms // programs)
    else:
        want = triton.cdiv(SPLIT_PROGRAMS_PER_SM * target.num_sms, programs)
    if want <= 1:
        return 1, k
    per_split = max(block_k, (k // max(1, want)) // block_k * block_k)
    return triton.cdiv(k, per_split), per_split


def lora_down(
    x0: torch.Tensor,
    x1: torch.Tensor | None,
    a: torch.Tensor,
    *,
    masks: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    dropout_p: float = 0.0,
    out_scale: float = 1.0,
    target: Target | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out_scale * drop(x) a^T for one or two [M, K] streams; ``a`` is [R, K] (any strides), an
    adapter tensor whose dtype sets the products' precision."""
    m, k = x0.shape
    r = a.shape[0]
    streams = 1 if x1 is None else 2
    target = _target(x0.device, target)
    # 16-row tiles where rows are few (decode), 64 otherwise; at most 64-deep K steps keep an
    # fp32 (3xTF32) tile within registers. K is split until the launch has two programs per SM:
    # one program walking all of K for 1 to 64 rows left 130 SMs idle. Few rows also take
    # shallower K steps, or K = 4096 would give at most 64 splits (M = 16, one stream: 256 with
    # 16-deep steps).
    block_m = 16 if target.interpret or m <= 16 else 64
    m_tiles = triton.cdiv(m, block_m) if m else 1
    block_k = 32 if target.interpret else next(
        (bk for bk in (64, 32) if m_tiles * streams * triton.cdiv(k, bk) >= 2 * target.num_sms), 16)
    splits, per_split = _k_splits(k, block_k, m_tiles * streams, target)
    # One buffer per stream: the custom op's outputs must not share storage.
    out = [torch.empty((splits, m, r), device=x0.device, dtype=torch.float32) for _ in range(streams)]
    if m == 0:
        return out[0][0], (out[1][0] if streams == 2 else None)
    dropout = dropout_p > 0.0
    mask0 = _as_u8(masks[0], out[0].view(torch.uint8))
    mask1 = _as_u8(masks[1], mask0)
    x1_ = x0 if x1 is None else x1
    submit(Launch(
        lora_down_kernel,
        (m_tiles, streams, splits),
        (
            x0, *_strides(x0), x1_, *_strides(x1_),
            mask0, *_strides(mask0), mask1, *_strides(mask1),
            a, a.stride(0), a.stride(1),
            out[0], out[-1], out[0].stride(0), out[0].stride(1),
            _keep_scale(dropout_p), out_scale, m, k, r, per_split,
        ),
        dict(DROPOUT=dropout, LORA_DTYPE=_lora_dtype(a), INTERPRET=target.interpret,
             BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=_block_r(r)),
        dict(num_warps=4),
    ))  # fmt: skip
    # The splits' partial sums are added in a fixed order (no atomics): the result does not
    # depend on scheduling.
    s = [o[0] if splits == 1 else o.sum(dim=0) for o in out]
    return s[0], (s[1] if streams == 2 else None)


def lora_reduce(
    l0: torch.Tensor,
    x0: torch.Tensor,
    l1: torch.Tensor | None = None,
    x1: torch.Tensor | None = None,
    *,
    masks: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    dropout_p: float = 0.0,
    lora_dtype: torch.dtype = torch.float32,
    target: Target | None = None,
) -> torch.Tensor:
    """sum over rows of l^T drop(x) for one or two streams: [R, C] fp32 (l fp32 [M, R], x [M, C]);
    products in ``lora_dtype`` (the adapter's)."""
    m, c = x0.shape
    r = l0.shape[1]
    if m == 0:
        return torch.zeros((r, c), device=x0.device, dtype=torch.float32)
    target = _target(x0.device, target)
    if target.interpret:
        block_m, block_c = 16, 32
    else:
        # Row tiles no taller than the rows; column tiles narrow enough for two programs per SM
        # where the rows give few splits (M = 16: 4096 / 16 = 256 programs, not 32), and at most
        # 64 wide: a 64 x 128 tile spilled 132-160 B with fp32 (3xTF32) products and 4 B with
        # bf16 ones under triton 3.9 (static report).
        block_m = 16 if m <= 16 else (32 if m <= 64 else 64)
        max_splits = triton.cdiv(m, block_m)
        block_c = next((bc for bc in (64, 32) if triton.cdiv(c, bc) * max_splits >= 2 * target.num_sms), 16)
    tiles_c = triton.cdiv(c, block_c)
    # Enough row splits to give every SM a few programs; each split writes its own partial sum,
    # so the result does not depend on scheduling (no atomics).
    splits = max(1, min(triton.cdiv(m, block_m), triton.cdiv(4 * target.num_sms, tiles_c)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    splits = triton.cdiv(m, rows_per_split)
    partial = torch.empty((splits, r, c), device=x0.device, dtype=torch.float32)
    dropout = dropout_p > 0.0
    mask0 = _as_u8(masks[0], partial.view(torch.uint8))
    mask1 = _as_u8(masks[1], mask0)
    two = x1 is not None
    x1_, l1_ = (x1, l1) if two else (x0, l0)
    submit(Launch(
        lora_reduce_kernel,
        (tiles_c, splits),
        (
            l0, l1_, l0.stride(0),
            x0, *_strides(x0), x1_, *_strides(x1_),
            mask0, *_strides(mask0), mask1, *_strides(mask1),
            partial, partial.stride(0), partial.stride(1),
            _keep_scale(dropout_p), m, c, r, rows_per_split,
        ),
        dict(TWO_STREAMS=two, DROPOUT=dropout, LORA_DTYPE=_TL_DTYPES[lora_dtype], INTERPRET=target.interpret,
             BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=_block_r(r)),
        dict(num_warps=4),
    ))  # fmt: skip
    return partial.sum(dim=0)


def lora_up(
    y: torch.Tensor,
    l: torch.Tensor,
    u: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    out_scale: float = 1.0,
    target: Target | None = None,
) -> None:
    """y += out_scale * drop(l u) in place: y [M, C] (its dtype), l fp32 [M, R], u [R, C] (any
    strides), an adapter tensor whose dtype sets the products' precision; ``mask`` [M, C]."""
    m, c = y.shape
    r = l.shape[1]
    if m == 0:
        return
    target = _target(y.device, target)
    block_m, block_c = (16, 32) if target.interpret else (64, 128)
    mask_ = _as_u8(mask, l.view(torch.uint8))
    submit(Launch(
        lora_up_kernel,
        (triton.cdiv(m, block_m), triton.cdiv(c, block_c)),
        (
            y, *_strides(y), l, l.stride(0), u, u.stride(0), u.stride(1), mask_, *_strides(mask_),
            _keep_scale(dropout_p), out_scale, m, c, r,
        ),
        dict(DROPOUT=dropout_p > 0.0, LORA_DTYPE=_lora_dtype(u), INTERPRET=target.interpret,
             BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=_block_r(r)),
        dict(num_warps=4),
    ))  # fmt: skip


# ------------------------------------------------------------------------------------ the dequant route
def dequantize(w: NF4Tensors, dtype: torch.dtype, *, target: Target | None = None) -> torch.Tensor:
    """The NF4 weight as a dense [N, K] tensor in ``dtype`` (values as bitsandbytes' dequantize_4bit)."""
    n, k = w.out_features, w.in_features
    out = torch.empty((n, k), device=w.packed.device, dtype=dtype)
    target = _target(w.packed.device, target)
    row_blocks = _row_blocks(w)
    # 32 x 256 tiles: 2,048 programs on a 4096 x 4096 weight (16 waves of 132 SMs at one block
    # each), 64 weights per thread, each thread's 32 packed bytes in two 16-byte loads.
    block_n, block_k = (16, 64) if target.interpret else (32, 256)
    submit(Launch(
        nf4_dequant_kernel,
        (triton.cdiv(n, block_n), triton.cdiv(k, block_k)),
        (*_weight_pointers(w, row_blocks), out, out.stride(0), n, k),
        dict(LOG2_BS=int(math.log2(w.blocksize)), NESTED=w.nested, ROW_BLOCKS=row_blocks,
             INTERPRET=target.interpret, BLOCK_N=block_n, BLOCK_K=block_k),
        dict(num_warps=4, num_stages=1, enable_fp_fusion=False),
    ))  # fmt: skip
    return out


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """out = a b (+ bias) by torch's GEMM (cuBLAS on a GPU): a [m, k], b [k, n] (any strides)."""
    m, k = a.shape
    n = b.shape[1]

    def run() -> None:
        if bias is None:
            torch.matmul(a, b, out=out)
        else:
            torch.addmm(bias.to(a.dtype), a, b, out=out)

    submit(LibraryCall("gemm", m, n, k, a.dtype, run))


def _forward_dequantized(call: LoraCall, source_out: bool, target: Target):
    """The forward on the "dequant" route: s by the skinny kernel, phi in torch, W dequantized
    once, one cuBLAS GEMM per stream (bias in its epilogue), then the LoRA term in place."""
    (x, source, w, bias, lora_A, lora_B, scaling, fusion, params, dropout_p, masks, seq_len, source_base,
     fusion_mask) = call
    fusion, need_src_s = _fusion_plan(fusion, source is not None)
    m, n = x.shape[0], w.out_features
    s_t, s_s = lora_down(x, source if need_src_s else None, lora_A, masks=masks, dropout_p=dropout_p, target=target)
    if fusion == "none":
        z = s_t
    elif is_per_token(fusion):
        z = fuse(s_s, s_t, fusion)
    else:
        z = _sequence_fuse(s_s, s_t, fusion, params, seq_len, fusion_mask)
    wd = dequantize(w, x.dtype, target=target).t()
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    gemm(x, wd, y, bias)
    y_s = None
    if source_out:
        y_s = torch.empty_like(y)
        gemm(source if source_base is None else source_base, wd, y_s, bias)
    lora_up(y, z, lora_B.t(), out_scale=scaling, target=target)
    return y, y_s, s_t, s_s


# ------------------------------------------------------------------------------------ forward
def forward(
    call: LoraCall, source_out: bool, fuse_down: bool | None = None, *, target: Target | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(y_t [M, N], y_s [M, N] or None, s_t [M, R] fp32, s_s [M, R] fp32 or None).

    ``source_base``: rows whose base product is y_s, when not the fused ``source`` rows;
    ``fusion_mask`` [M]: real positions, for sequence-level fusions.
    """
    (x, source, w, bias, lora_A, lora_B, scaling, fusion, params, dropout_p, masks, seq_len, source_base,
     fusion_mask) = call
    _check_dtype(x)
    m, k = x.shape
    n, r = w.out_features, lora_A.shape[0]
    source_out = source_out and source is not None
    target = _target(x.device, target)
    if m and gemm_route(m, target, two_streams=source_out) == "dequant":
        return _forward_dequantized(call, source_out, target)
    fusion, need_src_s = _fusion_plan(fusion, source is not None)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    y_s = torch.empty((m, n), device=x.device, dtype=x.dtype) if source_out else None
    s_t = torch.empty((m, r), device=x.device, dtype=torch.float32)
    s_s = torch.empty_like(s_t) if need_src_s else None
    if m == 0:
        return y, y_s, s_t, s_s
    per_token = is_per_token(fusion)
    row_blocks = _row_blocks(w)
    tiles = _gemm_tiles(m, two_streams=source_out, target=target, row_blocks=row_blocks,
                        wide=x.dtype == torch.float32)
    if m > 64 and not source_out and row_blocks and x.dtype != torch.float32 and not target.interpret:
        tiles = FWD_ONE_STREAM_TILES
    # Both streams' rows in one MMA (kernels/forward.py, STACK) where the base products of both
    # are wanted and a stacked tile is at most 64 rows.
    stack = STACK_STREAMS and source_out and tiles.block_m <= 32
    m_tiles, n_tiles = triton.cdiv(m, tiles.block_m), triton.cdiv(n, tiles.block_n)
    # Decode sizes split K until the launch has two programs per SM (a 4096-wide layer has 128
    # 32-wide N tiles: 4 SMs idle, and a second program per SM to hide latency), as do the
    # stacked tiles up to 127 rows; more rows only a grid on half the GPU or less. The splits'
    # partial sums go to fp32 workspaces and a second kernel adds them in order.
    splits, per_split = _k_splits(k, tiles.block_k, m_tiles * n_tiles, target, tiles.num_warps == 1,
                                  fill_only=m > 64 and not stack)
    if tiles.block_m < 16 and not (stack and splits > 1):
        # 8-row tiles only as the stacked split-K operand (the one-pass epilogue's rank-r product
        # needs 16 rows): the same single row tile, 16 rows high.
        tiles = tiles._replace(block_m=16)
        m_tiles = triton.cdiv(m, 16)
    # The down-projection in the base K loop must be as cheap as the base tile's dot: same dtype
    # (an fp32 adapter against 16-bit activations runs its fp32 products in their own pass).
    # Split over K it runs in programs of its own, which read no weight and have time to spare.
    cheap_down = lora_A.dtype == x.dtype or splits > 1
    # With a separate source_base the GEMM's source rows are not the fused ones: s_s needs its pass.
    fuse_down = (FUSE_DOWN_DEFAULT if fuse_down is None else fuse_down) and per_token and cheap_down
    fuse_down = fuse_down and source_base is None
    dropout = dropout_p > 0.0
    z = None
    if not fuse_down:
        s_t, s_ss = lora_down(x, source if need_src_s else None, lora_A, masks=masks, dropout_p=dropout_p,
                              target=target)
        s_s = s_ss if need_src_s else None
        if not per_token:
            z = _sequence_fuse(s_s, s_t, fusion, params, seq_len, fusion_mask)

    mask_t = _as_u8(masks[0], s_t.view(torch.uint8))
    mask_s = _as_u8(masks[1], mask_t)
    xs = x if source is None else (source if source_base is None else source_base)
    # Split over K, the fused down-projection adds one column of programs (one per row tile and split).
    programs = m_tiles * (n_tiles + (1 if fuse_down and splits > 1 else 0))
    lora = 2 if fuse_down else 1
    s_in_t, s_in_s = (s_t if z is None else z), (s_t if s_s is None else s_s)
    if splits > 1:
        # Contiguous [splits, M, N]: rows are n apart, as in y.
        part_t = torch.empty((splits, m, n), device=x.device, dtype=torch.float32)
        part_s = torch.empty_like(part_t) if source_out else part_t
        q_t = torch.empty((splits, m, r), device=x.device, dtype=torch.float32) if lora == 2 else s_in_t
        q_s = (torch.empty_like(q_t) if need_src_s else q_t) if lora == 2 else s_in_s
        outs, s_ptrs = (part_t, part_s), (q_t, q_s)
    else:
        outs, s_ptrs = (y, y if y_s is None else y_s), (s_in_t, s_in_s)
    submit(Launch(
        flare_fwd_kernel,
        (programs, splits),
        (
            x, *_strides(x), xs, *_strides(xs),
            outs[0], *_strides(y), outs[1], *_strides(y),
            *_weight_pointers(w, row_blocks), y if bias is None else bias,
            lora_A, lora_A.stride(0), lora_A.stride(1),
            lora_B, lora_B.stride(0), lora_B.stride(1),
            *s_ptrs, r,
            mask_t, *_strides(mask_t), mask_s, *_strides(mask_s),
            _keep_scale(dropout_p), scaling,
            m, n, k, r,
            per_split, m * n, m * r,
        ),
        dict(
            LOG2_BS=int(math.log2(w.blocksize)), NESTED=w.nested,
            ROW_BLOCKS=row_blocks,
            HAS_BIAS=bias is not None, SOURCE_OUT=source_out,
            LORA=lora, FUSION=FUSIONS.index(fusion) if z is None else 0,
            NEED_SRC_S=need_src_s and z is None, DROPOUT=dropout and fuse_down,
            LORA_DTYPE=_lora_dtype(lora_A), INTERPRET=target.interpret, STACK=stack, SPLIT_K=splits > 1,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_R=_block_r(r),
            GROUP_M=GROUP_M,
        ),
        _options(tiles),
    ))  # fmt: skip
    if splits > 1:
        s_fin = (s_t, s_t if s_s is None else s_s) if lora == 2 else s_ptrs
        _splitk_epilogue(outs, s_ptrs, s_fin, y, y_s, bias, lora_B, scaling, splits, r, target, dict(
            LORA=lora, FUSION=FUSIONS.index(fusion) if z is None else 0, NEED_SRC_S=need_src_s and z is None,
            LORA_DTYPE=_lora_dtype(lora_A),
        ))  # fmt: skip
    return y, y_s, s_t, s_s


def _epilogue_tiles(m: int, width: int, target: Target) -> tuple[int, int, int]:
    """(block_m, row tiles, column tile width) of a split GEMM's epilogue kernel over [m, width]:
    narrow columns where rows are few, for two programs per SM (M = 16: 4096 / 16 = 256). 16 is a
    tl.dot's narrowest tile: 8-wide ones with a CUDA-core rank-r product were predicted slower with
    bf16 adapters (dX's epilogue at M = 1: 0.33 -> 0.84 us, H200, triton 3.9)."""
    block_m = 16 if m <= 16 else 32
    m_tiles = triton.cdiv(m, block_m)
    block_w = next((bw for bw in (128, 64, 32) if m_tiles * triton.cdiv(width, bw) >= 2 * target.num_sms), 16)
    return block_m, m_tiles, block_w


def _splitk_epilogue(parts, s_parts, s_fin, y, y_s, bias, lora_B, scaling, splits: int, r: int, target: Target,
                     lora_switches: dict) -> None:  # fmt: skip
    """The split-K forward's second kernel: the partial sums (``parts``; with LORA 2 also
    ``s_parts``, written to ``s_fin``) added in order, then the LoRA term and the bias."""
    m, n = y.shape
    block_m, m_tiles, block_n = _epilogue_tiles(m, n, target)
    submit(Launch(
        flare_fwd_splitk_epilogue_kernel,
        (m_tiles, triton.cdiv(n, block_n)),
        (
            parts[0], parts[1], n, m * n,
            s_parts[0], s_parts[1], m * r,
            s_fin[0], s_fin[1], r,
            y, *_strides(y), y if y_s is None else y_s, *_strides(y),
            y if bias is None else bias, lora_B, lora_B.stride(0), lora_B.stride(1), scaling,
            m, n, r, splits,
        ),
        dict(HAS_BIAS=bias is not None, SOURCE_OUT=y_s is not None, **lora_switches, INTERPRET=target.interpret,
             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(r)),
        dict(num_warps=1),
    ))  # fmt: skip


# ------------------------------------------------------------------------------------ backward
def backward(
    call: LoraCall, dy: torch.Tensor, s_t: torch.Tensor, s_s: torch.Tensor | None, needs: tuple[bool, bool, bool, bool],
    *, target: Target | None = None,
) -> Grads:
    """Gradients for x (target rows), A, B and the fusion parameters; none for source or W."""
    (x, source, w, bias, lora_A, lora_B, scaling, fusion, params, dropout_p, masks, seq_len, source_base,
     fusion_mask) = call
    _check_dtype(x)
    need_dx, need_da, need_db, need_dparams = needs
    m, k = x.shape
    r = lora_A.shape[0]
    fusion, need_src_s = _fusion_plan(fusion, source is not None)
    per_token = is_per_token(fusion)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()

    if m == 0:
        return zero_grads(x, lora_A, lora_B, params, needs)
    target = _target(x.device, target)
    # Per-token phi with dX wanted: dZ = dY B and phi' ride along in the dX kernel's N loop.
    # Otherwise dZ comes from a skinny pass and phi' from torch autograd on the reference phi
    # (sequence-level phi mixes rows, so it needs all of dZ first).
    dequant = need_dx and gemm_route(m, target, dx=True) == "dequant"
    fused_dz = per_token and need_dx and lora_B.dtype == dy.dtype and not dequant
    ds_t = torch.empty((m, r), device=x.device, dtype=torch.float32)
    ds_s = torch.empty_like(ds_t) if need_src_s else None
    d_params: list[torch.Tensor] = []
    if fused_dz:
        z = s_t if fusion == "none" else fuse(s_s, s_t, fusion)
    else:
        dz, _ = lora_down(dy, None, lora_B.t(), out_scale=scaling, target=target)  # B^T's dtype: the precision
        g_t, g_s, z, d_params = rank_r_backward(dz, s_s, s_t, fusion, params, seq_len, fusion_mask)
        ds_t.copy_(g_t)
        if need_src_s:
            ds_s.copy_(g_s)

    dx = None
    if dequant:
        dx = torch.empty((m, k), device=x.device, dtype=x.dtype)
        gemm(dy, dequantize(w, dy.dtype, target=target), dx)
        lora_up(dx, ds_t, lora_A, mask=masks[0], dropout_p=dropout_p, target=target)
    elif need_dx:
        dx = torch.empty((m, k), device=x.device, dtype=x.dtype)
        _dx_fused(call, dy, dx, s_t, s_s, ds_t, ds_s, fused_dz, need_src_s, fusion, target)

    d_a = d_b = None
    if need_da:
        d_a = lora_reduce(
            ds_t, x, ds_s, source if need_src_s else None, masks=masks, dropout_p=dropout_p,
            lora_dtype=lora_A.dtype, target=target,
        ).to(lora_A.dtype)
    if need_db:
        d_b = (lora_reduce(z.float(), dy, lora_dtype=lora_B.dtype, target=target).t() * scaling).to(lora_B.dtype)
    return Grads(dx, d_a, d_b, d_params)


def _dx_fused(call: LoraCall, dy, dx, s_t, s_s, ds_t, ds_s, fused_dz: bool, need_src_s: bool, fusion: str,
              target: Target) -> None:  # fmt: skip
    """dX on the "fused" route: flare_dx_kernel (the W tile dequantized in its N loop), split
    over N at decode sizes with flare_dx_splitn_epilogue_kernel adding the splits in order."""
    x, w, lora_A, lora_B, scaling, dropout_p, masks = call.x, call.weight, call.lora_A, call.lora_B, call.scaling, \
        call.dropout_p, call.masks
    m, k = x.shape
    n, r = w.out_features, lora_A.shape[0]
    row_blocks = _row_blocks(w)
    tiles = _gemm_tiles(m, two_streams=False, target=target, row_blocks=row_blocks, wide=x.dtype == torch.float32)
    if m <= 16 and not target.interpret:
        tiles = DX_DECODE_TILES
    elif m <= 64 and row_blocks and not target.interpret:  # across rows: 352,256 B of shared memory at 4 stages
        tiles = DX_SMALL_TILES
    programs = triton.cdiv(m, tiles.block_m) * triton.cdiv(k, tiles.block_k)
    # dX's grid runs over K tiles and its loop over N: N is split as the forward splits K.
    splits, per_split = _k_splits(n, tiles.block_n, programs, target, tiles.num_warps == 1, fill_only=m > 64)
    mask_t = _as_u8(masks[0], ds_t.view(torch.uint8))
    lora = 2 if fused_dz else 1
    switches = dict(
        LORA=lora, FUSION=FUSIONS.index(fusion) if fused_dz else 0,
        NEED_SRC_S=need_src_s and fused_dz, DROPOUT=dropout_p > 0.0,
        LORA_DTYPE=_lora_dtype(lora_A), INTERPRET=target.interpret,
    )
    s_args = (s_t, s_t if s_s is None else s_s, ds_t, ds_t if ds_s is None else ds_s, r)
    tail = (mask_t, *_strides(mask_t), _keep_scale(dropout_p), scaling)
    out, dz_out = dx, ds_t
    if splits > 1:
        out = torch.empty((splits, m, k), device=x.device, dtype=torch.float32)
        dz_out = torch.empty((splits, m, r), device=x.device, dtype=torch.float32) if lora == 2 else ds_t
    submit(Launch(
        flare_dx_kernel,
        (programs, splits),
        (
            dy, *_strides(dy), out, *_strides(dx),
            *_weight_pointers(w, row_blocks),
            lora_A, lora_A.stride(0), lora_A.stride(1),
            lora_B, lora_B.stride(0), lora_B.stride(1),
            s_args[0], s_args[1], dz_out, s_args[3], r,
            *tail,
            m, n, k, r,
            per_split, m * k, m * r,
        ),
        dict(
            LOG2_BS=int(math.log2(w.blocksize)), NESTED=w.nested, ROW_BLOCKS=row_blocks, **switches,
            SPLIT_N=splits > 1,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_R=_block_r(r),
            GROUP_M=GROUP_M,
        ),
        _options(tiles),
    ))  # fmt: skip
    if splits == 1:
        return
    block_m, m_tiles, block_k = _epilogue_tiles(m, k, target)
    submit(Launch(
        flare_dx_splitn_epilogue_kernel,
        (m_tiles, triton.cdiv(k, block_k)),
        (
            out, k, m * k, dz_out, m * r,
            dx, *_strides(dx),
            lora_A, lora_A.stride(0), lora_A.stride(1),
            *s_args,
            *tail,
            m, k, r, splits,
        ),
        dict(**switches, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=_block_r(r)),
        dict(num_warps=1),
    ))  # fmt: skip
