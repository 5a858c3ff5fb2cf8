"""Fused FLARE-LoRA forward over NF4 weights (Triton jit only; launched from ops/launch.py).

One program computes a [BLOCK_M, BLOCK_N] tile of the target output and, with SOURCE_OUT, the
same rows of the source output (with STACK, both streams as one MMA operand). Each W tile is
dequantized once in registers and feeds both streams' dots, so one pass over the 4-bit weights
serves both streams::

    acc_t = x_t W^T                     acc_s = x_s W^T           (K loop)
    LORA == 2 (FUSE_DOWN): s_t += drop(x_t) A^T, s_s += drop(x_s) A^T in the same K loop, written
                           out by the pid_n == 0 programs for the backward; split over K, by
                           one more column of programs that runs only this loop
    LORA == 1:             s_t, s_s loaded (precomputed; for sequence-level fusions s_t holds
                           phi itself and FUSION is none)
    y_t = acc_t + b + scaling * phi(s_s, s_t) B^T                  y_s = acc_s + b

Shapes: x [M, K] (strided), W [N, K] NF4, A [R, K], B [N, R], s [M, R] fp32, y [M, N].
"""

import triton
import triton.language as tl

from .common import (
    dropped_lora_mma, fuse_fwd, grouped_tile, lora_mma, mma, nf4_rows, nf4_tile, stacked_rows, tile_offsets, to_dtype,
    unstack_rows,
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
    # Split over K with the fused down-projection: one more column of programs computes s (and
    # only s), instead of every N tile repeating it (it needs s only in the epilogue kernel).
    DOWN_PROGRAMS: tl.constexpr = SPLIT_K and LORA == 2
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_n + DOWN_PROGRAMS, GROUP_M)
    split = tl.program_id(1)
    # Stacked 8-row tiles per stream are 16 MMA rows; the one-pass epilogue's rank-r product
    # needs 16 rows of its own.
    tl.static_assert(BLOCK_M >= 16 or (STACK and SPLIT_K))
    offs_m, offs_n, offs_r, m_valid, n_valid, r_valid = tile_offsets(pid_m, pid_n, M, N, R, BLOCK_M, BLOCK_N, BLOCK_R)
    # STACK: the stacked operand's 2 * BLOCK_M rows (stacked_rows: source even, target odd)
    rows2 = pid_m * BLOCK_M + tl.arange(0, 2 * BLOCK_M) // 2
    stacked = (rows2, tl.arange(0, 2 * BLOCK_M) % 2 == 1, rows2 < M)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_args = (xt_ptr, stride_xtm, stride_xtk, xs_ptr, stride_xsm, stride_xsk)
    down_args = (
        a_ptr, stride_ar, stride_ak, mt_ptr, stride_mtm, stride_mtk, ms_ptr, stride_msm, stride_msk, keep_scale,
    )  # fmt: skip
    if DOWN_PROGRAMS:
        down_only = pid_n == num_n
    else:
        down_only = False
    if down_only:
        s_t, s_s = down_loop(
            x_args, down_args, stacked, offs_m, offs_r, m_valid, r_valid, k_lo, k_hi, K,
            NEED_SRC_S, DROPOUT, LORA_DTYPE, INTERPRET, STACK, BLOCK_M, BLOCK_K, BLOCK_R,
        )  # fmt: skip
        s_offs = split * stride_ssplit + offs_m[:, None] * stride_sm + offs_r[None, :]
        store_s(st_ptr, ss_ptr, s_offs, m_valid[:, None] & r_valid[None, :], s_t, s_s, NEED_SRC_S)
    else:
        LORA_IN_LOOP: tl.constexpr = LORA == 2 and not SPLIT_K
        acc_t, acc_s, s_t, s_s = base_loop(
            x_args, down_args,
            (w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset), stacked,
            offs_m, offs_n, offs_r, m_valid, n_valid, r_valid, k_lo, k_hi, K,
            LOG2_BS, NESTED, ROW_BLOCKS, SOURCE_OUT, LORA_IN_LOOP, NEED_SRC_S, DROPOUT, LORA_DTYPE, INTERPRET,
            STACK, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
        )  # fmt: skip
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
                acc_t, acc_s, s_t, s_s, pid_n, offs_m, offs_n, offs_r, m_valid, n_valid, r_valid,
                (st_ptr, ss_ptr, stride_sm, b_ptr, stride_bn, stride_br, bias_ptr, scaling),
                (yt_ptr, stride_ytm, stride_ytn, ys_ptr, stride_ysm, stride_ysn),
                HAS_BIAS, SOURCE_OUT, LORA, FUSION, NEED_SRC_S, LORA_DTYPE, INTERPRET, BLOCK_M, BLOCK_N,
            )  # fmt: skip


@triton.jit
def base_loop(
    x_args, down_args, w_args, stacked, offs_m, offs_n, offs_r, m_valid, n_valid, r_valid, k_lo, k_hi, K,
    LOG2_BS: tl.constexpr, NESTED: tl.constexpr, ROW_BLOCKS: tl.constexpr, SOURCE_OUT: tl.constexpr,
    LORA_IN_LOOP: tl.constexpr, NEED_SRC_S: tl.constexpr, DROPOUT: tl.constexpr, LORA_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr, STACK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The K loop over [k_lo, k_hi): (acc_t, acc_s) = x W^T per stream, and with LORA_IN_LOOP
    (s_t, s_s) = drop(x) A^T; fp32 [BLOCK_M, BLOCK_N] and [BLOCK_M, BLOCK_R]."""
    xt_ptr, stride_xtm, stride_xtk, xs_ptr, stride_xsm, stride_xsk = x_args
    w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset = w_args
    SRC_X: tl.constexpr = SOURCE_OUT or (LORA_IN_LOOP and NEED_SRC_S)
    acc_t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    s_s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # STACK: both streams' rows as one MMA operand ([x_s; x_t] interleaved by stacked_rows,
    # 2 * BLOCK_M rows), so one warp does the tile's tensor work once: two dots sharing W made
    # Triton lay all warps along M, each repeating the whole tile. Static report: see launch.py.
    acc2 = tl.zeros((2 * BLOCK_M, BLOCK_N), dtype=tl.float32)
    s2 = tl.zeros((2 * BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):  # k_per_split is a multiple of BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < K
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
        w = to_dtype(w, xt_ptr.dtype.element_ty, INTERPRET)
        xt, xs, x_mask = load_x(x_args, stacked, offs_m, m_valid, offs_k, k_valid, SRC_X, STACK)
        if STACK:
            acc2 = mma(xt, w, acc2, INTERPRET)
        else:
            acc_t = mma(xt, w, acc_t, INTERPRET)
            if SOURCE_OUT:
                acc_s = mma(xs, w, acc_s, INTERPRET)
        if LORA_IN_LOOP:
            s_t, s_s, s2 = down_step(
                xt, xs, down_args, stacked, offs_m, offs_k, offs_r, r_valid, k_valid, x_mask, s_t, s_s, s2,
                NEED_SRC_S, DROPOUT, LORA_DTYPE, INTERPRET, STACK,
            )  # fmt: skip
    if STACK:
        acc_s, acc_t = unstack_rows(acc2, BLOCK_M, BLOCK_N)
    if LORA_IN_LOOP:
        s_t, s_s = finish_s(s_t, s_s, s2, m_valid, r_valid, STACK, BLOCK_M, BLOCK_R)
    return acc_t, acc_s, s_t, s_s


@triton.jit
def load_x(x_args, stacked, offs_m, m_valid, offs_k, k_valid, SRC_X: tl.constexpr, STACK: tl.constexpr):
    """One K step's activations (xt, xs, mask): STACK, the stacked [2 * BLOCK_M, BLOCK_K] operand
    as xt (and xs); otherwise the [BLOCK_M, BLOCK_K] tiles (xs only with SRC_X, else xt)."""
    xt_ptr, stride_xtm, stride_xtk, xs_ptr, stride_xsm, stride_xsk = x_args
    if STACK:
        rows2, is_t2, valid2 = stacked
        x_mask = valid2[:, None] & k_valid[None, :]
        xt = stacked_rows(xt_ptr, stride_xtm, stride_xtk, xs_ptr, stride_xsm, stride_xsk, rows2, is_t2, offs_k, x_mask)
        xs = xt
    else:
        x_mask = m_valid[:, None] & k_valid[None, :]
        xt = tl.load(xt_ptr + offs_m[:, None] * stride_xtm + offs_k[None, :] * stride_xtk, mask=x_mask, other=0.0)
        xs = xt
        if SRC_X:
            xs = tl.load(xs_ptr + offs_m[:, None] * stride_xsm + offs_k[None, :] * stride_xsk, mask=x_mask, other=0.0)
    return xt, xs, x_mask


@triton.jit
def down_loop(
    x_args, down_args, stacked, offs_m, offs_r, m_valid, r_valid, k_lo, k_hi, K,
    NEED_SRC_S: tl.constexpr, DROPOUT: tl.constexpr, LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
    STACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """(s_t, s_s) = drop(x) A^T over [k_lo, k_hi), fp32 [BLOCK_M, BLOCK_R]: the down programs of a
    split-K forward. Their loop reads no weight, so it is shorter than the base loop, also with
    fp32 adapters (two TF32 dots per product, lora_mma): the base programs stay the busiest
    (static report, sm_90, M = 1: 258 against 482 instructions per K step, triton 3.9)."""
    s_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    s_s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    s2 = tl.zeros((2 * BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < K
        xt, xs, x_mask = load_x(x_args, stacked, offs_m, m_valid, offs_k, k_valid, NEED_SRC_S, STACK)
        s_t, s_s, s2 = down_step(
            xt, xs, down_args, stacked, offs_m, offs_k, offs_r, r_valid, k_valid, x_mask, s_t, s_s, s2,
            NEED_SRC_S, DROPOUT, LORA_DTYPE, INTERPRET, STACK,
        )  # fmt: skip
    return finish_s(s_t, s_s, s2, m_valid, r_valid, STACK, BLOCK_M, BLOCK_R)


@triton.jit
def down_step(
    xt, xs, down_args, stacked, offs_m, offs_k, offs_r, r_valid, k_valid, x_mask, s_t, s_s, s2,
    NEED_SRC_S: tl.constexpr, DROPOUT: tl.constexpr, LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
    STACK: tl.constexpr,
):
    """One K step of the down-projection. STACK: xt is the stacked [2 * BLOCK_M, BLOCK_K] operand
    (stacked_rows) and s2 += [x_s; x_t] A^T; otherwise xt, xs are [BLOCK_M, BLOCK_K] and s += x A^T."""
    a_ptr, stride_ar, stride_ak, mt_ptr, stride_mtm, stride_mtk, ms_ptr, stride_msm, stride_msk, keep_scale = down_args
    a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                mask=r_valid[None, :] & k_valid[:, None], other=0.0)  # fmt: skip
    if STACK:
        if DROPOUT:
            rows2, is_t2, valid2 = stacked
            keep = stacked_rows(
                mt_ptr, stride_mtm, stride_mtk, ms_ptr, stride_msm, stride_msk, rows2, is_t2, offs_k, x_mask,
            )  # fmt: skip
            s2 = dropped_lora_mma(xt, keep, a, s2, keep_scale, LORA_DTYPE, INTERPRET)
        else:
            s2 = lora_mma(xt, a, s2, LORA_DTYPE, INTERPRET)
    else:
        if DROPOUT:
            keep = tl.load(mt_ptr + offs_m[:, None] * stride_mtm + offs_k[None, :] * stride_mtk, mask=x_mask, other=0)
            s_t = dropped_lora_mma(xt, keep, a, s_t, keep_scale, LORA_DTYPE, INTERPRET)
        else:
            s_t = lora_mma(xt, a, s_t, LORA_DTYPE, INTERPRET)
        if NEED_SRC_S:
            if DROPOUT:
                keep = tl.load(ms_ptr + offs_m[:, None] * stride_msm + offs_k[None, :] * stride_msk,
                               mask=x_mask, other=0)  # fmt: skip
                s_s = dropped_lora_mma(xs, keep, a, s_s, keep_scale, LORA_DTYPE, INTERPRET)
            else:
                s_s = lora_mma(xs, a, s_s, LORA_DTYPE, INTERPRET)
    return s_t, s_s, s2


@triton.jit
def finish_s(s_t, s_s, s2, m_valid, r_valid, STACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """The down-projection's (s_t, s_s) as [BLOCK_M, BLOCK_R] tiles, rank columns past R zeroed:
    they met zero-padded A rows, and an Inf in x made them NaN, not 0."""
    if STACK:
        s_s, s_t = unstack_rows(s2, BLOCK_M, BLOCK_R)
    s_mask = m_valid[:, None] & r_valid[None, :]
    return tl.where(s_mask, s_t, 0.0), tl.where(s_mask, s_s, 0.0)


@triton.jit
def store_s(st_ptr, ss_ptr, s_offs, s_mask, s_t, s_s, NEED_SRC_S: tl.constexpr):
    tl.store(st_ptr + s_offs, s_t, mask=s_mask)
    if NEED_SRC_S:
        tl.store(ss_ptr + s_offs, s_s, mask=s_mask)


@triton.jit
def fwd_epilogue(
    acc_t, acc_s, s_t, s_s, pid_n, offs_m, offs_n, offs_r, m_valid, n_valid, r_valid, lora_args, y_args,
    HAS_BIAS: tl.constexpr, SOURCE_OUT: tl.constexpr, LORA: tl.constexpr, FUSION: tl.constexpr,
    NEED_SRC_S: tl.constexpr, LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y_t = acc_t + b + scaling * phi(s_s, s_t) B^T and y_s = acc_s + b, rounded once and stored.
    LORA == 1: s_t, s_s are read here (precomputed); LORA == 2: the given ones (summed in the K
    loop), stored by the pid_n == 0 programs for the backward."""
    st_ptr, ss_ptr, stride_sm, b_ptr, stride_bn, stride_br, bias_ptr, scaling = lora_args
    yt_ptr, stride_ytm, stride_ytn, ys_ptr, stride_ysm, stride_ysn = y_args
    s_mask = m_valid[:, None] & r_valid[None, :]
    s_offs = offs_m[:, None] * stride_sm + offs_r[None, :]
    if LORA == 1:
        s_t = tl.load(st_ptr + s_offs, mask=s_mask, other=0.0)
        if NEED_SRC_S:
            s_s = tl.load(ss_ptr + s_offs, mask=s_mask, other=0.0)
    elif LORA == 2:
        if pid_n == 0:
            store_s(st_ptr, ss_ptr, s_offs, s_mask, s_t, s_s, NEED_SRC_S)
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
    fwd_epilogue(
        acc_t, acc_s, s_t, s_s, pid_n, offs_m, offs_n, offs_r, m_valid, n_valid, r_valid,
        (st_ptr, ss_ptr, stride_sm, b_ptr, stride_bn, stride_br, bias_ptr, scaling),
        (yt_ptr, stride_ytm, stride_ytn, ys_ptr, stride_ysm, stride_ysn),
        HAS_BIAS, SOURCE_OUT, LORA, FUSION, NEED_SRC_S, LORA_DTYPE, INTERPRET, BLOCK_M, BLOCK_N,
    )  # fmt: skip
