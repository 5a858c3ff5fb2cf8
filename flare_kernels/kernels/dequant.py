"""NF4 weight -> a dense [N, K] matrix in the activation dtype (Triton jit only).

The large-M route (``ops/launch.py``, ``gemm_route``): at 512 rows and more a GEMM is bound by
tensor-core throughput, which cuBLAS reaches and a loop that dequantizes in registers does not
(the static report prices both). This kernel writes the dequantized weight once per call, with
values bit-identical to bitsandbytes' ``dequantize_4bit`` (fp32 code * absmax, rounded once to
the activation dtype), and the GEMMs read it like any dense weight.

One program converts a [BLOCK_N, BLOCK_K] tile through the same helpers as the fused kernels.
"""

import triton
import triton.language as tl

from .common import nf4_rows, nf4_tile, to_dtype


@triton.jit
def nf4_dequant_kernel(
    w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset,
    out_ptr, stride_on,
    N, K,
    LOG2_BS: tl.constexpr, NESTED: tl.constexpr, ROW_BLOCKS: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_valid = offs_n < N
    k_valid = offs_k < K
    if ROW_BLOCKS:
        w = nf4_rows(
            w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset,
            offs_n, n_valid, k0, K, LOG2_BS, NESTED, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    else:
        w = nf4_tile(
            w_packed, w_absmax, w_code, w_nested_absmax, w_nested_code, w_nested_offset,
            offs_n[:, None], offs_k[None, :], n_valid[:, None] & k_valid[None, :], K, LOG2_BS, NESTED,
        )
    tl.store(
        out_ptr + offs_n[:, None] * stride_on + offs_k[None, :],
        to_dtype(w, out_ptr.dtype.element_ty, INTERPRET),
        mask=n_valid[:, None] & k_valid[None, :],
    )
