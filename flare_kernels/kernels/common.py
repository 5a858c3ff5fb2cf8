"""Shared ``@triton.jit`` helpers: NF4 tile dequantization, the dot, per-token fusion (fwd/bwd).

Argument order for an NF4 weight, used by every kernel (see ``format/nf4.py`` for the layout)::

    w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset
"""

import triton
import triton.language as tl

# Fusion ids, in the order of reference.fusion.FUSIONS (per-token ones only reach the kernels).
# Written as tl.constexpr(...) objects: compiled Triton rejects a global annotated
# `NAME: tl.constexpr = 1` inside @jit code ("Cannot access global variable"); the interpreter
# accepts both, which is how the annotated form once went unnoticed.
FUSION_NONE = tl.constexpr(0)
FUSION_ADD = tl.constexpr(1)
FUSION_MUL = tl.constexpr(2)
FUSION_ADD_RELU = tl.constexpr(3)


@triton.jit
def nf4_tile(
    w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset,
    n_idx, k_idx, n_valid, mask, k0, K,
    LOG2_BS: tl.constexpr, NESTED: tl.constexpr, BLOCK_ALIGNED: tl.constexpr,
):
    """fp32 values of W[n_idx, k_idx] (index tensors broadcast to the tile's shape; ``n_valid``
    is n_idx < N, ``mask`` the whole tile's bounds).

    BLOCK_ALIGNED: every quantization block of the tile's rows covers the tile's whole k range
    (K % BS == 0, BS % BLOCK_K == 0, k0 % BLOCK_K == 0), so one scale per row is loaded instead of
    one per element.
    """
    row = n_idx.to(tl.int64) * K
    flat = row + k_idx
    byte = tl.load(w_packed + (flat >> 1), mask=mask, other=0).to(tl.int32)
    # The first element of a pair sits in the high nibble.
    q = (byte >> (((flat & 1) ^ 1) * 4).to(tl.int32)) & 0xF
    value = tl.load(w_code + q)
    if BLOCK_ALIGNED:
        block = (row + k0) >> LOG2_BS
        block_mask = n_valid
    else:
        block = flat >> LOG2_BS
        block_mask = mask
    if NESTED:
        qa = tl.load(w_absmax + block, mask=block_mask, other=0).to(tl.int32)
        scale = tl.load(w_nested_code + qa) * tl.load(w_nested_absmax + (block >> 8), mask=block_mask, other=0.0)
        scale = scale + tl.load(w_nested_offset)
    else:
        scale = tl.load(w_absmax + block, mask=block_mask, other=0.0)
    return value * scale


@triton.jit
def to_dtype(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype), rounding to nearest even.

    The interpreter (triton 3.9) truncates fp32 -> bf16 even when asked for "rtne", which biases
    every bf16 result toward zero; there the rounding is done on the bits first.
    """
    if INTERPRET and dtype == tl.bfloat16:
        x = x.to(tl.float32)
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def mma(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulation; operands are already rounded to their dtype.

    Under the interpreter both operands are upcast: there a bf16 x bf16 dot returns garbage.
    fp32 operands use IEEE fp32 products, not TF32, to match torch's default matmul precision.
    """
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def lora_mma(a, b, acc, LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b for a LoRA-branch product, in the adapter's precision (as PEFT computes it).

    16-bit adapters: both operands rounded to that dtype, tensor-core dot. fp32 adapters: fp32
    products, on the GPU as 3xTF32 (about fp32 accuracy on tensor cores, 3 TF32 dots; the
    launchers keep such products out of the base GEMM's inner loop, where they would cost more
    than the base tile itself).
    """
    if LORA_DTYPE == tl.float32:
        if INTERPRET:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    return mma(to_dtype(a, LORA_DTYPE, INTERPRET), to_dtype(b, LORA_DTYPE, INTERPRET), acc, INTERPRET)


@triton.jit
def fuse_fwd(s_src, s_tgt, FUSION: tl.constexpr):
    """Per-token phi(s, t) on fp32 [BLOCK_M, BLOCK_R] tiles."""
    if FUSION == FUSION_ADD:
        return s_src + s_tgt
    elif FUSION == FUSION_MUL:
        return s_src * s_tgt
    elif FUSION == FUSION_ADD_RELU:
        # where(s < 0) rather than maximum: relu(NaN) is NaN in torch.
        return tl.where(s_src < 0, 0.0, s_src) + tl.where(s_tgt < 0, 0.0, s_tgt)
    else:
        return s_tgt


@triton.jit
def fuse_bwd(dz, s_src, s_tgt, FUSION: tl.constexpr):
    """(d s_tgt, d s_src) of per-token phi given dz = d phi; relu'(0) = 0 as in torch."""
    if FUSION == FUSION_ADD:
        return dz, dz
    elif FUSION == FUSION_MUL:
        return dz * s_src, dz * s_tgt
    elif FUSION == FUSION_ADD_RELU:
        return tl.where(s_tgt <= 0, 0.0, dz), tl.where(s_src <= 0, 0.0, dz)
    else:
        return dz, dz * 0.0


@triton.jit
def apply_keep_mask(tile, mask_ptr, offs_m, offs_k, stride_mm, stride_mk, valid, keep_scale):
    """Inverted dropout on an fp32 tile: kept entries times 1/(1-p), dropped entries zero."""
    keep = tl.load(mask_ptr + offs_m[:, None] * stride_mm + offs_k[None, :] * stride_mk, mask=valid, other=0)
    return tl.where(keep != 0, tile * keep_scale, 0.0)


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Row-major tile order swizzled in groups of GROUP_M row tiles, so W tiles are reused in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n
