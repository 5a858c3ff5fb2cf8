"""Fused FLARE-LoRA forward over NF4 weights (Triton jit only; launched from ops/launch.py).

One program computes a [BLOCK_M, BLOCK_N] tile of the target output and, with SOURCE_OUT, the
same rows of the source output (with STACK, both streams' rows in one MMA operand). Each W tile is dequantized once in registers and feeds both
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

from .common import (
    apply_keep_mask, fuse_fwd, grouped_tile, lora_mma, mma, nf4_rows, nf4_tile, tile_offsets, to_dtype,
)  # fmt: skip


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
    # split-K: K range of a split; partial outputs' stride between splits (y and s workspaces)
    k_per_split, stride_ysplit, stride_ssplit,
    # switches
    LOG2_BS: tl.constexpr, NESTED: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOURCE_OUT: tl.constexpr,
    LORA: tl.constexpr, FUSION: tl.constexpr, NEED_SRC_S: tl.constexpr, DROPOUT: tl.constexpr,
    LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, STACK: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    split = tl.program_id(1)
    offs_m, offs_n, offs_r, m_valid, n_valid, r_valid = tile_offsets(pid_m, pid_n, M, N, R, BLOCK_M, BLOCK_N, BLOCK_R)
    SRC_X: tl.constexpr = SOURCE_OUT or (LORA == 2 and NEED_SRC_S)

    acc_t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    s_s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if STACK:
        # Both streams as the rows of one MMA ([source; target], 2 * BLOCK_M rows), with one warp
        # per 16 rows. Two dots sharing an operand make Triton lay all warps along M; with 16-row
        # tiles per stream every warp then repeated the whole tile (4x the tensor work and its
        # operand shuffles at 4 warps). Static report, sm_90, M = 16: see launch.py.
        acc2 = tl.zeros((2 * BLOCK_M, BLOCK_N), dtype=tl.float32)
        s2 = tl.zeros((2 * BLOCK_M, BLOCK_R), dtype=tl.float32)
    # k_per_split is a multiple of BLOCK_K, so a tile never straddles two splits.
    for k0 in range(split * k_per_split, tl.minimum((split + 1) * k_per_split, K), BLOCK_K):
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
        if SRC_X:
            xs = tl.load(xs_ptr + offs_m[:, None] * stride_xsm + offs_k[None, :] * stride_xsk, mask=x_mask, other=0.0)
        if STACK:
            x2 = tl.reshape(tl.permute(tl.join(xs, xt), (2, 0, 1)), (2 * BLOCK_M, BLOCK_K))
            acc2 = mma(x2, w, acc2, INTERPRET)
        else:
            acc_t = mma(xt, w, acc_t, INTERPRET)
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
            if STACK:
                xs_l = xs
                if DROPOUT:
                    xs_l = apply_keep_mask(xs.to(tl.float32), ms_ptr, offs_m, offs_k, stride_msm, stride_msk, x_mask, keep_scale)
                x2_l = tl.reshape(tl.permute(tl.join(xs_l, xt_l), (2, 0, 1)), (2 * BLOCK_M, BLOCK_K))
                s2 = lora_mma(x2_l, a, s2, LORA_DTYPE, INTERPRET)
            else:
                s_t = lora_mma(xt_l, a, s_t, LORA_DTYPE, INTERPRET)
                if NEED_SRC_S:
                    xs_l = xs
                    if DROPOUT:
                        xs_l = apply_keep_mask(xs.to(tl.float32), ms_ptr, offs_m, offs_k, stride_msm, stride_msk, x_mask, keep_scale)
                    s_s = lora_mma(xs_l, a, s_s, LORA_DTYPE, INTERPRET)
    if STACK:
        acc_s, acc_t = tl.split(tl.permute(tl.reshape(acc2, (2, BLOCK_M, BLOCK_N)), (1, 2, 0)))
        if LORA == 2:
            s_s, s_t = tl.split(tl.permute(tl.reshape(s2, (2, BLOCK_M, BLOCK_R)), (1, 2, 0)))

    s_mask = m_valid[:, None] & r_valid[None, :]
    s_offs = offs_m[:, None] * stride_sm + offs_r[None, :]
    if LORA == 2:
        # Rank columns past R met zero-padded A rows: an Inf in x made them NaN, not 0.
        s_t = tl.where(s_mask, s_t, 0.0)
        s_s = tl.where(s_mask, s_s, 0.0)
        if pid_n == 0:
            tl.store(st_ptr + split * stride_ssplit + s_offs, s_t, mask=s_mask)
            if NEED_SRC_S:
                tl.store(ss_ptr + split * stride_ssplit + s_offs, s_s, mask=s_mask)
    if SPLIT_K:
        # fp32 partial sums into the split's slice; flare_fwd_splitk_epilogue_kernel adds the
        # splits in order, then the LoRA term and the bias, once.
        y_mask = m_valid[:, None] & n_valid[None, :]
        y_offs = split * stride_ysplit + offs_m[:, None] * stride_ytm + offs_n[None, :] * stride_ytn
        tl.store(yt_ptr + y_offs, acc_t, mask=y_mask)
        if SOURCE_OUT:
            tl.store(ys_ptr + y_offs, acc_s, mask=y_mask)
    else:
        fwd_epilogue(
            acc_t, acc_s, s_t, s_s, offs_m, offs_n, offs_r, m_valid, n_valid, r_valid,
            st_ptr, ss_ptr, stride_sm, b_ptr, stride_bn, stride_br, bias_ptr, scaling,
            yt_ptr, stride_ytm, stride_ytn, ys_ptr, stride_ysm, stride_ysn,
            HAS_BIAS, SOURCE_OUT, LORA, FUSION, NEED_SRC_S, LORA_DTYPE, INTERPRET, BLOCK_M, BLOCK_N,
        )  # fmt: skip


@triton.jit
def fwd_epilogue(
    acc_t, acc_s, s_t, s_s, offs_m, offs_n, offs_r, m_valid, n_valid, r_valid,
    st_ptr, ss_ptr, stride_sm, b_ptr, stride_bn, stride_br, bias_ptr, scaling,
    yt_ptr, stride_ytm, stride_ytn, ys_ptr, stride_ysm, stride_ysn,
    HAS_BIAS: tl.constexpr, SOURCE_OUT: tl.constexpr, LORA: tl.constexpr, FUSION: tl.constexpr,
    NEED_SRC_S: tl.constexpr, LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y_t = acc_t + b + scaling * phi(s_s, s_t) B^T and y_s = acc_s + b, rounded once and stored.
    LORA == 1: s_t, s_s are read here (precomputed); LORA == 2: the given ones (summed in the K loop)."""
    if LORA == 1:
        s_mask = m_valid[:, None] & r_valid[None, :]
        s_offs = offs_m[:, None] * stride_sm + offs_r[None, :]
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
    tl.store(yt_ptr + offs_m[:, None] * stride_ytm + offs_n[None, :] * stride_ytn,
             to_dtype(acc_t, yt_ptr.dtype.element_ty, INTERPRET), mask=y_mask)  # fmt: skip
    if SOURCE_OUT:
        tl.store(ys_ptr + offs_m[:, None] * stride_ysm + offs_n[None, :] * stride_ysn,
                 to_dtype(acc_s, ys_ptr.dtype.element_ty, INTERPRET), mask=y_mask)  # fmt: skip


@triton.jit
def flare_fwd_splitk_epilogue_kernel(
    # fp32 partial outputs [splits, M, N] (contiguous) of flare_fwd_kernel's SPLIT_K launch
    pt_ptr, ps_ptr, stride_pm, stride_psplit,
    # LORA == 2: partial s [splits, M, R] (contiguous) in, final s [M, R] out; LORA == 1: s in
    qt_ptr, qs_ptr, stride_qsplit,
    st_ptr, ss_ptr, stride_sm,
    yt_ptr, stride_ytm, stride_ytn,
    ys_ptr, stride_ysm, stride_ysn,
    bias_ptr, b_ptr, stride_bn, stride_br, scaling,
    M, N, R, splits,
    HAS_BIAS: tl.constexpr, SOURCE_OUT: tl.constexpr,
    LORA: tl.constexpr, FUSION: tl.constexpr, NEED_SRC_S: tl.constexpr,
    LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The split-K forward's second pass: the splits' partial sums added in split order (the
    result does not depend on scheduling), then the epilogue of the one-pass kernel."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m, offs_n, offs_r, m_valid, n_valid, r_valid = tile_offsets(pid_m, pid_n, M, N, R, BLOCK_M, BLOCK_N, BLOCK_R)
    y_mask = m_valid[:, None] & n_valid[None, :]
    p_offs = offs_m[:, None] * stride_pm + offs_n[None, :]
    s_mask = m_valid[:, None] & r_valid[None, :]
    q_offs = offs_m[:, None] * R + offs_r[None, :]
    acc_t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    s_s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for split in range(0, splits):
        acc_t += tl.load(pt_ptr + split * stride_psplit + p_offs, mask=y_mask, other=0.0)
        if SOURCE_OUT:
            acc_s += tl.load(ps_ptr + split * stride_psplit + p_offs, mask=y_mask, other=0.0)
        if LORA == 2:
            s_t += tl.load(qt_ptr + split * stride_qsplit + q_offs, mask=s_mask, other=0.0)
            if NEED_SRC_S:
                s_s += tl.load(qs_ptr + split * stride_qsplit + q_offs, mask=s_mask, other=0.0)
    s_offs = offs_m[:, None] * stride_sm + offs_r[None, :]
    if LORA == 2:
        if pid_n == 0:
            tl.store(st_ptr + s_offs, s_t, mask=s_mask)
            if NEED_SRC_S:
                tl.store(ss_ptr + s_offs, s_s, mask=s_mask)
    fwd_epilogue(
        acc_t, acc_s, s_t, s_s, offs_m, offs_n, offs_r, m_valid, n_valid, r_valid,
        st_ptr, ss_ptr, stride_sm, b_ptr, stride_bn, stride_br, bias_ptr, scaling,
        yt_ptr, stride_ytm, stride_ytn, ys_ptr, stride_ysm, stride_ysn,
        HAS_BIAS, SOURCE_OUT, LORA, FUSION, NEED_SRC_S, LORA_DTYPE, INTERPRET, BLOCK_M, BLOCK_N,
    )  # fmt: skip
