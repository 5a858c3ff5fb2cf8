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
def block_scale(w_absmax, w_nested_absmax, w_nested_code, w_nested_offset, block, mask, NESTED: tl.constexpr):
    """fp32 absmax of quantization blocks ``block`` (any shape), double quantization expanded as
    bitsandbytes does it: code2[qa] * absmax2[block // 256] + offset, two roundings (the launchers
    turn FMA contraction off)."""
    # One return after the branch: compiled Triton type-checks every return of a function, also
    # those behind a constexpr if, and the plain absmax pointer is uint8 when NESTED.
    if NESTED:
        qa = tl.load(w_absmax + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(w_nested_code + qa) * tl.load(w_nested_absmax + (block >> 8), mask=mask, other=0.0)
        scale = scale + tl.load(w_nested_offset)
    else:
        scale = tl.load(w_absmax + block, mask=mask, other=0.0)
    return scale


@triton.jit
def nf4_rows(
    w_packed, w_absmax, w_pairs, w_nested_absmax, w_nested_code, w_nested_offset,
    offs_n, n_valid, k0, K,
    LOG2_BS: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 W[offs_n, k0 : k0 + BLOCK_K] as a [BLOCK_N, BLOCK_K] tile, when every quantization
    block lies inside one row (K % BS == 0: K is even, so each row starts on a byte boundary).

    Each packed byte is loaded once (a row's BLOCK_K / 2 bytes are contiguous: wide loads) and
    split into nibbles in registers; the scale is expanded once per (row, block) and
    broadcast, not once per element. Offsets are 32-bit: the launchers refuse weights of 2**31
    bytes or more (a 70B-class projection is 117 MB).
    """
    # Packed bytes read as 32-bit words (4 bytes, 8 weights; rows and k0 sit on 16-byte
    # boundaries since K % BS == 0 and BS >= 32): a shift and a mask per byte, no byte unpacking.
    WORDS: tl.constexpr = BLOCK_K // 8
    row_words = K // 8
    offs_w = k0 // 8 + tl.arange(0, WORDS)
    word = tl.load(
        w_packed.to(tl.pointer_type(tl.int32)) + (offs_n * row_words)[:, None] + offs_w[None, :],
        mask=n_valid[:, None] & (offs_w < row_words)[None, :], other=0,
    )
    byte = (word[:, :, None] >> (8 * tl.arange(0, 4))[None, None, :]) & 0xFF  # little-endian bytes
    # ``w_pairs`` [256] int64: byte b -> the fp32 pair (code[b >> 4], code[b & 15]), first weight
    # (high nibble) in the low half. One 8-byte gather per two weights, instead of a nibble split,
    # a 64-bit address and a 4-byte gather per weight (static report: 750 -> 594 -> see launch.py).
    pair = tl.load(w_pairs + byte)
    first = pair.to(tl.int32).to(tl.float32, bitcast=True)
    second = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    value = tl.reshape(tl.join(first, second), (BLOCK_N, BLOCK_K))
    BS: tl.constexpr = 1 << LOG2_BS
    blocks_per_row = K >> LOG2_BS
    if BS >= BLOCK_K:
        # The tile's k range of a row lies in one block (launchers keep k0 on a BLOCK_K boundary).
        block = offs_n * blocks_per_row + (k0 >> LOG2_BS)
        scale = block_scale(w_absmax, w_nested_absmax, w_nested_code, w_nested_offset, block, n_valid, NESTED)
        w = value * scale[:, None]
    else:
        NB: tl.constexpr = BLOCK_K // BS
        kb = (k0 >> LOG2_BS) + tl.arange(0, NB)
        block = offs_n[:, None] * blocks_per_row + kb[None, :]
        scale = block_scale(w_absmax, w_nested_absmax, w_nested_code, w_nested_offset, block,
                            n_valid[:, None] & (kb < blocks_per_row)[None, :], NESTED)  # fmt: skip
        w = tl.reshape(tl.reshape(value, (BLOCK_N, NB, BS)) * scale[:, :, None], (BLOCK_N, BLOCK_K))
    return w


@triton.jit
def nf4_tile(
    w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset,
    n_idx, k_idx, mask, K,
    LOG2_BS: tl.constexpr, NESTED: tl.constexpr,
):
    """fp32 values of W[n_idx, k_idx], element by element (index tensors broadcast to the tile's
    shape, ``mask`` its bounds): the general layout, where blocks run across rows (K % BS != 0)
    and a row may start in the middle of a byte. ``nf4_rows`` is the fast path."""
    flat = n_idx.to(tl.int64) * K + k_idx
    byte = tl.load(w_packed + (flat >> 1), mask=mask, other=0).to(tl.int32)
    # The first element of a pair sits in the high nibble.
    q = (byte >> (((flat & 1) ^ 1) * 4).to(tl.int32)) & 0xF
    value = tl.load(w_code + q)
    scale = block_scale(w_absmax, w_nested_absmax, w_nested_code, w_nested_offset, flat >> LOG2_BS, mask, NESTED)
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
def tf32_hi(v):
    """fp32 v truncated to TF32 (its 10 high mantissa bits): v - tf32_hi(v) is exact in fp32 and at
    most 2**-10 |v|."""
    return (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def lora_mma(a, b, acc, LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b for a LoRA-branch product, in the adapter's precision (as PEFT computes it).

    16-bit adapters: both operands rounded to that dtype, tensor-core dot. fp32 adapters: fp32
    products, on the GPU as 3xTF32 (about fp32 accuracy on tensor cores, 3 TF32 dots, 2 where a is
    16-bit; the launchers keep such products out of the base GEMM's inner loop, where
    they would cost more than the base tile itself).
    """
    if LORA_DTYPE == tl.float32:
        if INTERPRET:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        a32, b32 = a.to(tl.float32), b.to(tl.float32)
        if a.dtype != tl.float32:
            # A 16-bit a (activations) is exact in TF32 (10 mantissa bits), so of 3xTF32's three
            # dots (a_hi b_hi + a_hi b_lo + a_lo b_hi) one is zero and a needs no split: two dots.
            # The split-K forward's down programs with fp32 adapters: 544 -> 258 loop instructions
            # (sm_90, triton 3.9, M = 1); the error stays 3xTF32's, about 2**-21 |a b|. (Not for
            # a 16-bit b: lora_reduce_kernel's dA then spilled 8 to 12 bytes.)
            b_hi = tf32_hi(b32)
            acc = tl.dot(a32, b32 - b_hi, acc, input_precision="tf32")
            return tl.dot(a32, b_hi, acc, input_precision="tf32")
        return tl.dot(a32, b32, acc, input_precision="tf32x3")
    return mma(to_dtype(a, LORA_DTYPE, INTERPRET), to_dtype(b, LORA_DTYPE, INTERPRET), acc, INTERPRET)


@triton.jit
def dropped_lora_mma(x, keep, a, acc, keep_scale, LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + drop(x) @ a, inverted dropout by the keep-mask tile ``keep``. fp32 adapters: dropped
    entries zeroed in x's dtype and the scale applied to the product, so 16-bit activations stay
    exact in TF32 and the product takes lora_mma's two dots, not 3xTF32's three. 16-bit adapters:
    x * scale rounded to the adapter dtype first, as PEFT's dropout output is."""
    if LORA_DTYPE == tl.float32:
        kept = tl.where(keep != 0, x, tl.zeros_like(x))
        return acc + lora_mma(kept, a, tl.zeros_like(acc), LORA_DTYPE, INTERPRET) * keep_scale
    return lora_mma(tl.where(keep != 0, x.to(tl.float32) * keep_scale, 0.0), a, acc, LORA_DTYPE, INTERPRET)


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
def stacked_rows(t_ptr, stride_tm, stride_tk, s_ptr, stride_sm, stride_sk, rows, is_t, offs_k, mask):
    """Two [M, K] tensors read as one [2 * BLOCK_M, BLOCK_K] MMA operand: row j holds row rows[j] of
    the target (is_t[j], the odd rows) or of the source (the even ones). One load through selected
    pointers, which the pipeliner copies straight into shared memory (two loads and a join cost
    16 shared-memory stores and 16 byte permutes more per step: sm_90, triton 3.9, M = 1)."""
    t = t_ptr + rows[:, None] * stride_tm + offs_k[None, :] * stride_tk
    s = s_ptr + rows[:, None] * stride_sm + offs_k[None, :] * stride_sk
    return tl.load(tl.where(is_t[:, None], t, s), mask=mask, other=0)


@triton.jit
def unstack_rows(t, BLOCK_M: tl.constexpr, COLS: tl.constexpr):
    """(source, target) [BLOCK_M, COLS] tiles of an MMA result over stacked_rows' rows."""
    return tl.split(tl.permute(tl.reshape(t, (BLOCK_M, 2, COLS)), (0, 2, 1)))


@triton.jit
def apply_keep_mask(tile, mask_ptr, offs_m, offs_k, stride_mm, stride_mk, valid, keep_scale):
    """Inverted dropout on an fp32 tile: kept entries times 1/(1-p), dropped entries zero."""
    keep = tl.load(mask_ptr + offs_m[:, None] * stride_mm + offs_k[None, :] * stride_mk, mask=valid, other=0)
    return tl.where(keep != 0, tile * keep_scale, 0.0)


@triton.jit
def tile_offsets(pid_a, pid_b, A, B, R, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
    """Offsets and in-bounds masks of an output tile (rows pid_a, columns pid_b) and of the rank axis:
    (offs_a, offs_b, offs_r, a_valid, b_valid, r_valid)."""
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_r = tl.arange(0, BLOCK_R)
    return offs_a, offs_b, offs_r, offs_a < A, offs_b < B, offs_r < R


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
