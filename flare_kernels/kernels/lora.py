"""Skinny rank-r GEMMs of the LoRA branch (Triton jit only).

``lora_down_kernel``   S[M, R] = out_scale * drop(X)[M, K] @ A^T   for one or two streams
                       (grid axis 1 picks the stream), split over K (grid axis 2: each split
                       writes its partial sum to its own slice; the launcher adds them). Also
                       gives dZ = scaling * dY B with X = dY and A = B^T (a strided view).
``lora_reduce_kernel`` P[split, R, C] = sum over the split's rows m and the streams of
                       L[m, R]^T drop(X)[m, C]; the launcher sums the splits. Gives
                       dA = dS_t^T drop(x_t) + dS_s^T drop(x_s) and dB^T = Z^T dY.
``lora_up_kernel``     Y[M, C] += out_scale * drop(L[M, R] @ U[R, C]), in place, Y in its own
                       dtype (rounded once). The large-M route's LoRA epilogue after a cuBLAS
                       GEMM: Y = y_t, L = phi, U = B^T (forward); Y = dX, L = dS_t, U = A,
                       with the target's dropout mask (backward).
"""

import triton
import triton.language as tl

from .common import apply_keep_mask, lora_mma, to_dtype


@triton.jit
def lora_down_kernel(
    x0_ptr, stride_x0m, stride_x0k,
    x1_ptr, stride_x1m, stride_x1k,
    m0_ptr, stride_m0m, stride_m0k,
    m1_ptr, stride_m1m, stride_m1k,
    a_ptr, stride_ar, stride_ak,
    s0_ptr, s1_ptr, stride_ss, stride_sm,
    keep_scale, out_scale,
    M, K, R, k_per_split,
    DROPOUT: tl.constexpr, LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(2)
    if tl.program_id(1) == 0:
        x_ptr, stride_xm, stride_xk = x0_ptr, stride_x0m, stride_x0k
        mask_ptr, stride_mm, stride_mk = m0_ptr, stride_m0m, stride_m0k
        s_ptr = s0_ptr
    else:
        x_ptr, stride_xm, stride_xk = x1_ptr, stride_x1m, stride_x1k
        mask_ptr, stride_mm, stride_mk = m1_ptr, stride_m1m, stride_m1k
        s_ptr = s1_ptr
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_valid = offs_m < M
    r_valid = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_end = tl.minimum((split + 1) * k_per_split, K)
    for k0 in range(split * k_per_split, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < k_end
        x_mask = m_valid[:, None] & k_valid[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=x_mask, other=0.0)
        if DROPOUT:
            x = apply_keep_mask(x.to(tl.float32), mask_ptr, offs_m, offs_k, stride_mm, stride_mk, x_mask, keep_scale)
        # A^T tile [BLOCK_K, BLOCK_R]
        a = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=r_valid[None, :] & k_valid[:, None], other=0.0,
        )
        acc = lora_mma(x, a, acc, LORA_DTYPE, INTERPRET)
    tl.store(s_ptr + split * stride_ss + offs_m[:, None] * stride_sm + offs_r[None, :], acc * out_scale,
             mask=m_valid[:, None] & r_valid[None, :])  # fmt: skip


@triton.jit
def lora_reduce_kernel(
    l0_ptr, l1_ptr, stride_lm,
    x0_ptr, stride_x0m, stride_x0c,
    x1_ptr, stride_x1m, stride_x1c,
    m0_ptr, stride_m0m, stride_m0c,
    m1_ptr, stride_m1m, stride_m1c,
    p_ptr, stride_ps, stride_pr,
    keep_scale,
    M, C, R, rows_per_split,
    TWO_STREAMS: tl.constexpr, DROPOUT: tl.constexpr, LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_valid = offs_c < C
    r_valid = offs_r < R
    row_end = tl.minimum((pid_s + 1) * rows_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(pid_s * rows_per_split, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_valid = offs_m < row_end
        x_mask = m_valid[:, None] & c_valid[None, :]
        # L^T tile [BLOCK_R, BLOCK_M]
        l_offs = offs_m[None, :] * stride_lm + offs_r[:, None]
        l_mask = m_valid[None, :] & r_valid[:, None]
        x = tl.load(x0_ptr + offs_m[:, None] * stride_x0m + offs_c[None, :] * stride_x0c, mask=x_mask, other=0.0)
        if DROPOUT:
            x = apply_keep_mask(x.to(tl.float32), m0_ptr, offs_m, offs_c, stride_m0m, stride_m0c, x_mask, keep_scale)
        lt = tl.load(l0_ptr + l_offs, mask=l_mask, other=0.0)
        acc = lora_mma(lt, x, acc, LORA_DTYPE, INTERPRET)
        if TWO_STREAMS:
            x = tl.load(x1_ptr + offs_m[:, None] * stride_x1m + offs_c[None, :] * stride_x1c, mask=x_mask, other=0.0)
            if DROPOUT:
                x = apply_keep_mask(x.to(tl.float32), m1_ptr, offs_m, offs_c, stride_m1m, stride_m1c, x_mask, keep_scale)
            lt = tl.load(l1_ptr + l_offs, mask=l_mask, other=0.0)
            acc = lora_mma(lt, x, acc, LORA_DTYPE, INTERPRET)
    tl.store(
        p_ptr + pid_s * stride_ps + offs_r[:, None] * stride_pr + offs_c[None, :],
        acc,
        mask=r_valid[:, None] & c_valid[None, :],
    )


@triton.jit
def lora_up_kernel(
    y_ptr, stride_ym, stride_yc,
    l_ptr, stride_lm,
    u_ptr, stride_ur, stride_uc,
    mask_ptr, stride_mm, stride_mc,
    keep_scale, out_scale,
    M, C, R,
    DROPOUT: tl.constexpr, LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    m_valid = offs_m < M
    c_valid = offs_c < C
    r_valid = offs_r < R
    # One rank-r step: R <= BLOCK_R (the launchers round R up to a power of two, at least 16).
    lt = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :], mask=m_valid[:, None] & r_valid[None, :],
                 other=0.0)  # fmt: skip
    u = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_c[None, :] * stride_uc,
                mask=r_valid[:, None] & c_valid[None, :], other=0.0)  # fmt: skip
    up = lora_mma(lt, u, tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32), LORA_DTYPE, INTERPRET)
    y_mask = m_valid[:, None] & c_valid[None, :]
    if DROPOUT:
        up = apply_keep_mask(up, mask_ptr, offs_m, offs_c, stride_mm, stride_mc, y_mask, keep_scale)
    y_offs = offs_m[:, None] * stride_ym + offs_c[None, :] * stride_yc
    y = tl.load(y_ptr + y_offs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_offs, to_dtype(y + up * out_scale, y_ptr.dtype.element_ty, INTERPRET), mask=y_mask)
