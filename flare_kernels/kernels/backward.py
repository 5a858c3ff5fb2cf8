"""Input gradient of the FLARE-LoRA projection for the target rows (Triton jit only).

One program computes a [BLOCK_M, BLOCK_K] tile of dX_t, looping over N::

    acc = dY W                                   (W tile dequantized in registers, never stored)
    LORA == 2 (fused dZ, per-token phi):
        dz  = scaling * dY B                     (same N loop, r extra columns)
        ds_t, ds_s = phi'(dz; s_s, s_t)          (per row; pid_k == 0 writes them for dA)
    LORA == 1: ds_t loaded (sequence-level phi: computed by the launcher)
    dX_t = acc + mask_t * keep_scale * (ds_t A)  (one accumulator: the LoRA term is its epilogue)

SPLIT_N (decode sizes): program (tile, split) walks only its split's N range and writes fp32
partial sums of acc (and of dz) to workspaces; ``flare_dx_splitn_epilogue_kernel`` adds them in
split order, then runs the same epilogue once.

Shapes: dY [M, N], W [N, K] NF4, A [R, K], B [N, R], s and ds [M, R] fp32, dX [M, K].
"""

import triton
import triton.language as tl

from .common import (
    apply_keep_mask, fuse_bwd, grouped_tile, lora_mma, mma, nf4_rows, nf4_tile, tile_offsets, to_dtype,
)  # fmt: skip


@triton.jit
def flare_dx_kernel(
    dy_ptr, stride_dym, stride_dyn,
    dx_ptr, stride_dxm, stride_dxk,
    w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset,
    a_ptr, stride_ar, stride_ak,
    b_ptr, stride_bn, stride_br,
    st_ptr, ss_ptr, dst_ptr, dss_ptr, stride_sm,
    mt_ptr, stride_mtm, stride_mtk,
    keep_scale, scaling,
    M, N, K, R,
    # split-N: N range of a split; workspaces' stride between splits (dX partials; dz partials in dst_ptr)
    n_per_split, stride_dxsplit, stride_dzsplit,
    LOG2_BS: tl.constexpr, NESTED: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    LORA: tl.constexpr, FUSION: tl.constexpr, NEED_SRC_S: tl.constexpr, DROPOUT: tl.constexpr,
    LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, SPLIT_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    split = tl.program_id(1)
    offs_m, offs_k, offs_r, m_valid, k_valid, r_valid = tile_offsets(pid_m, pid_k, M, K, R, BLOCK_M, BLOCK_K, BLOCK_R)
    k0 = pid_k * BLOCK_K

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    dz = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # n_per_split is a multiple of BLOCK_N, so a tile never straddles two splits.
    for n0 in range(split * n_per_split, tl.minimum((split + 1) * n_per_split, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=m_valid[:, None] & n_valid[None, :], other=0.0,
        )
        # W tile [BLOCK_N, BLOCK_K]
        if ROW_BLOCKS:
            w = nf4_rows(
                w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset,
                offs_n, n_valid, k0, K, LOG2_BS, NESTED, BLOCK_N, BLOCK_K,
            )
        else:
            w = nf4_tile(
                w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset,
                offs_n[:, None], offs_k[None, :], n_valid[:, None] & k_valid[None, :], K, LOG2_BS, NESTED,
            )
        w = to_dtype(w, dy.dtype, INTERPRET)
        acc = mma(dy, w, acc, INTERPRET)
        if LORA == 2:
            b = tl.load(
                b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_valid[:, None] & r_valid[None, :], other=0.0,
            )
            dz = lora_mma(dy, b, dz, LORA_DTYPE, INTERPRET)

    s_mask = m_valid[:, None] & r_valid[None, :]
    if LORA == 2:
        dz = tl.where(s_mask, dz, 0.0)  # padded rank columns: Inf in dY times zero-padded B gives NaN
    if SPLIT_N:
        x_mask = m_valid[:, None] & k_valid[None, :]
        tl.store(dx_ptr + split * stride_dxsplit + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                 acc, mask=x_mask)  # fmt: skip
        if LORA == 2:
            if pid_k == 0:
                tl.store(dst_ptr + split * stride_dzsplit + offs_m[:, None] * stride_sm + offs_r[None, :], dz,
                         mask=s_mask)  # fmt: skip
    else:
        dx_epilogue(
            acc, dz, pid_k, offs_m, offs_k, offs_r, m_valid, k_valid, r_valid,
            dx_ptr, stride_dxm, stride_dxk, a_ptr, stride_ar, stride_ak,
            st_ptr, ss_ptr, dst_ptr, dss_ptr, stride_sm, mt_ptr, stride_mtm, stride_mtk, keep_scale, scaling,
            LORA, FUSION, NEED_SRC_S, DROPOUT, LORA_DTYPE, INTERPRET, BLOCK_M, BLOCK_K,
        )  # fmt: skip


@triton.jit
def dx_epilogue(
    acc, dz, pid_k, offs_m, offs_k, offs_r, m_valid, k_valid, r_valid,
    dx_ptr, stride_dxm, stride_dxk, a_ptr, stride_ar, stride_ak,
    st_ptr, ss_ptr, dst_ptr, dss_ptr, stride_sm, mt_ptr, stride_mtm, stride_mtk, keep_scale, scaling,
    LORA: tl.constexpr, FUSION: tl.constexpr, NEED_SRC_S: tl.constexpr, DROPOUT: tl.constexpr,
    LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dX = acc + drop(ds_t A), rounded once and stored; with LORA == 2, ds from the whole dz
    (the pid_k == 0 programs store ds_t and ds_s for dA)."""
    s_mask = m_valid[:, None] & r_valid[None, :]
    s_offs = offs_m[:, None] * stride_sm + offs_r[None, :]
    if LORA == 2:
        s_t = tl.load(st_ptr + s_offs, mask=s_mask, other=0.0)
        s_s = tl.zeros_like(dz)
        if NEED_SRC_S:
            s_s = tl.load(ss_ptr + s_offs, mask=s_mask, other=0.0)
        ds_t, ds_s = fuse_bwd(dz * scaling, s_s, s_t, FUSION)
        if pid_k == 0:
            tl.store(dst_ptr + s_offs, ds_t, mask=s_mask)
            if NEED_SRC_S:
                tl.store(dss_ptr + s_offs, ds_s, mask=s_mask)
    else:
        ds_t = tl.load(dst_ptr + s_offs, mask=s_mask, other=0.0)
    x_mask = m_valid[:, None] & k_valid[None, :]
    if LORA != 0:
        # A tile [BLOCK_R, BLOCK_K]
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=r_valid[:, None] & k_valid[None, :], other=0.0,
        )
        lora = lora_mma(ds_t, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), LORA_DTYPE, INTERPRET)
        if DROPOUT:
            lora = apply_keep_mask(lora, mt_ptr, offs_m, offs_k, stride_mtm, stride_mtk, x_mask, keep_scale)
        acc += lora
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
        to_dtype(acc, dx_ptr.dtype.element_ty, INTERPRET),
        mask=x_mask,
    )


@triton.jit
def flare_dx_splitn_epilogue_kernel(
    # fp32 partial dX [splits, M, K] and, with LORA == 2, partial dz [splits, M, R] (contiguous)
    p_ptr, stride_pm, stride_psplit, q_ptr, stride_qsplit,
    dx_ptr, stride_dxm, stride_dxk,
    a_ptr, stride_ar, stride_ak,
    st_ptr, ss_ptr, dst_ptr, dss_ptr, stride_sm,
    mt_ptr, stride_mtm, stride_mtk,
    keep_scale, scaling,
    M, K, R, splits,
    LORA: tl.constexpr, FUSION: tl.constexpr, NEED_SRC_S: tl.constexpr, DROPOUT: tl.constexpr,
    LORA_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The split-N dX's second pass: partial sums added in split order (the result does not
    depend on scheduling), then the epilogue of the one-pass kernel."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m, offs_k, offs_r, m_valid, k_valid, r_valid = tile_offsets(pid_m, pid_k, M, K, R, BLOCK_M, BLOCK_K, BLOCK_R)
    x_mask = m_valid[:, None] & k_valid[None, :]
    s_mask = m_valid[:, None] & r_valid[None, :]
    p_offs = offs_m[:, None] * stride_pm + offs_k[None, :]
    q_offs = offs_m[:, None] * R + offs_r[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    dz = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for split in range(0, splits):
        acc += tl.load(p_ptr + split * stride_psplit + p_offs, mask=x_mask, other=0.0)
        if LORA == 2:
            dz += tl.load(q_ptr + split * stride_qsplit + q_offs, mask=s_mask, other=0.0)
    dx_epilogue(
        acc, dz, pid_k, offs_m, offs_k, offs_r, m_valid, k_valid, r_valid,
        dx_ptr, stride_dxm, stride_dxk, a_ptr, stride_ar, stride_ak,
        st_ptr, ss_ptr, dst_ptr, dss_ptr, stride_sm, mt_ptr, stride_mtm, stride_mtk, keep_scale, scaling,
        LORA, FUSION, NEED_SRC_S, DROPOUT, LORA_DTYPE, INTERPRET, BLOCK_M, BLOCK_K,
    )  # fmt: skip
