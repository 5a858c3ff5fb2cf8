"""Fused FLARE-LoRA forward over NF4 weights (Triton jit only; launched from ops/launch.py).

One program computes a [BLOCK_M, BLOCK_N] tile of the target output and, with SOURCE_OUT, the
same rows of the source output. Each W tile is dequantized once in registers and feeds both
streams' dots, so one pass over the 4-bit weights serves both streams::

    acc_t = x_t W^T                     acc_s = x_s W^T           (K loop)
    LORA == 2 (FUSE_DOWN): s_t += drop(x_t) A^T, s_s += drop(x_s) A^T inside the same K loop,
                           written out by the pid_n == 0 programs for the backward
    LORA == 1:             s_t, s_s loaded (precomputed; for sequence-level fusions s_t holds
                           phi itself and FUSION is none)
    y_t = acc_t + b + scaling * phi(s_s, s_t) B^T                  y_s = acc_s + b

Shapes: x [M, K] (strided), W [N, K] NF4, A [R, K], B [N, R], s [M, R] fp32, y [M, N].
"""

import triton
import triton.language as tl

from .common import apply_keep_mask, fuse_fwd, grouped_tile, lora_mma, mma, nf4_rows, nf4_tile, to_dtype


@triton.jit
def flare_fwd_kernel(
    # activations [M, K] and outputs [M, N]
    xt_ptr, stride_xtm, stride_xtk,
    xs_ptr, stride_xsm, stride_xsk,
    yt_ptr, stride_ytm, stride_ytn,
    ys_ptr, stride_ysm, stride_ysn,
    # NF4 weight [N, K] and bias [N]
    w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset,
    bias_ptr,
    # LoRA: A [R, K], B [N, R], rank-r intermediates [M, R] fp32, dropout keep-masks [M, K]
    a_ptr, stride_ar, stride_ak,
    b_ptr, stride_bn, stride_br,
    st_ptr, ss_ptr, stride_sm,
    mt_ptr, stride_mtm, stride_mtk,
    ms_ptr, stride_msm, stride_msk,
    keep_scale, scaling,
    M, N, K, R,
    # switches
    LOG2_BS: tl.constexpr, NESTED: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOURCE_OUT: tl.constexpr,
    LORA: tl.constexpr, FUSION: tl.constexpr, NEED_SRC_S: tl.constexpr, DROPOUT: tl.constexpr,
    LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_valid = offs_m < M
    n_valid = offs_n < N
    r_valid = offs_r < R
    SRC_X: tl.constexpr = SOURCE_OUT or (LORA == 2 and NEED_SRC_S)

    acc_t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    s_s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < K
        x_mask = m_valid[:, None] & k_valid[None, :]
        xt = tl.load(xt_ptr + offs_m[:, None] * stride_xtm + offs_k[None, :] * stride_xtk, mask=x_mask, other=0.0)
        # W^T tile [BLOCK_K, BLOCK_N], rounded to the activation dtype as bitsandbytes does.
        if ROW_BLOCKS:
            w = tl.trans(nf4_rows(
                w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset,
                offs_n, n_valid, k0, K, LOG2_BS, NESTED, BLOCK_N, BLOCK_K,
            ))  # fmt: skip
        else:
            w = nf4_tile(
                w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset,
                offs_n[None, :], offs_k[:, None], k_valid[:, None] & n_valid[None, :], K, LOG2_BS, NESTED,
            )
        w = to_dtype(w, xt.dtype, INTERPRET)
        acc_t = mma(xt, w, acc_t, INTERPRET)
        if SRC_X:
            xs = tl.load(xs_ptr + offs_m[:, None] * stride_xsm + offs_k[None, :] * stride_xsk, mask=x_mask, other=0.0)
            if SOURCE_OUT:
                acc_s = mma(xs, w, acc_s, INTERPRET)
        if LORA == 2:
            a = tl.load(
                a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                mask=r_valid[None, :] & k_valid[:, None], other=0.0,
            )
            xt_l = xt
            if DROPOUT:
                xt_l = apply_keep_mask(xt.to(tl.float32), mt_ptr, offs_m, offs_k, stride_mtm, stride_mtk, x_mask, keep_scale)
            s_t = lora_mma(xt_l, a, s_t, LORA_DTYPE, INTERPRET)
            if NEED_SRC_S:
                xs_l = xs
                if DROPOUT:
                    xs_l = apply_keep_mask(xs.to(tl.float32), ms_ptr, offs_m, offs_k, stride_msm, stride_msk, x_mask, keep_scale)
                s_s = lora_mma(xs_l, a, s_s, LORA_DTYPE, INTERPRET)

    s_mask = m_valid[:, None] & r_valid[None, :]
    s_offs = offs_m[:, None] * stride_sm + offs_r[None, :]
    if LORA == 2:
        # Rank columns past R met zero-padded A rows: an Inf in x made them NaN, not 0.
        s_t = tl.where(s_mask, s_t, 0.0)
        s_s = tl.where(s_mask, s_s, 0.0)
        if pid_n == 0:
            tl.store(st_ptr + s_offs, s_t, mask=s_mask)
            if NEED_SRC_S:
                tl.store(ss_ptr + s_offs, s_s, mask=s_mask)
    elif LORA == 1:
        s_t = tl.load(st_ptr + s_offs, mask=s_mask, other=0.0)
        if NEED_SRC_S:
            s_s = tl.load(ss_ptr + s_offs, mask=s_mask, other=0.0)
    if LORA != 0:
        z = fuse_fwd(s_s, s_t, FUSION)
        # B^T tile [BLOCK_R, BLOCK_N]
        b = tl.load(
            b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
            mask=n_valid[None, :] & r_valid[:, None], other=0.0,
        )
        up = lora_mma(z, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LORA_DTYPE, INTERPRET)
        acc_t += up * scaling

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)
        acc_t += bias[None, :]
        acc_s += bias[None, :]
    y_mask = m_valid[:, None] & n_valid[None, :]
    tl.store(yt_ptr + offs_m[:, None] * stride_ytm + offs_n[None, :] * stride_ytn, to_dtype(acc_t, yt_ptr.dtype.element_ty, INTERPRET), mask=y_mask)
    if SOURCE_OUT:
        tl.store(ys_ptr + offs_m[:, None] * stride_ysm + offs_n[None, :] * stride_ysn, to_dtype(acc_s, ys_ptr.dtype.element_ty, INTERPRET), mask=y_mask)
