"""The native CPU backend's launchers: ``forward`` / ``backward`` with the signatures and return
types of ``flare_kernels.ops.launch`` (the Triton launchers), over ``torch.ops.flare_kernels_cpu``.

Forward, per call:
    s_t = drop(x) A^T, s_s = drop(source) A^T      lora_down (fp32 [M, r]; a pass over x is ~0.2%
                                                   of the base GEMM's work at r = 8)
    z = phi(s_s, s_t)                              per-token: inside linear; sequence-level: torch
                                                   (fusion_glue), [M, r]
    y = x W^T + b + scaling * z B^T,               linear: one pass over W for both streams, each
    y_s = source W^T + b                           dequantized tile serves every row of both
Backward:
    dz = scaling * dy B                            lora_down over dy
    ds_t, ds_s, z = phi'(dz), phi                  torch (fusion_glue)
    dx = dy W + drop(ds_t A)                       linear_dx, W dequantized on the fly
    dA = ds_t^T drop(x) + ds_s^T drop(source)      rank_reduce
    dB = scaling * dy^T z                          rank_reduce

The kernels take float32, float16 and bfloat16 activations and accumulate in fp32. float64 (only
the reference's gradient checks use it) has no kernel: it runs the reference, as backend "torch"
would.
"""

from __future__ import annotations


import torch

from ..format.nf4 import NF4Tensors, NF4Weight
from ..ops import torch_backend
from ..ops.fusion_glue import Grads, LoraCall, fusion_plan, keep_scale, rank_r_backward, sequence_fuse, zero_grads
from ..reference.fusion import FUSIONS, is_per_token
from ._library import load_error, ops

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _lib():
    lib = ops()
    if lib is None:
        raise RuntimeError(load_error())
    return lib


def _weight(w: NF4Tensors) -> tuple:
    return (w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.nested_offset)


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"the native CPU backend takes float16, bfloat16 or float32 activations, got {x.dtype}; "
            "use FLARE_KERNELS_BACKEND=torch for other dtypes"
        )


def _needs_reference(x: torch.Tensor, lora_A: torch.Tensor) -> bool:
    return torch.float64 in (x.dtype, lora_A.dtype)


def _masks(masks, dropout_p: float, need_src_s: bool):
    if dropout_p <= 0.0:
        return None, None
    mask_t, mask_s = masks
    if mask_t is None or (need_src_s and mask_s is None):
        raise ValueError("dropout_p > 0 needs the keep-masks of both streams (flare_lora_linear draws them)")
    return mask_t, mask_s if need_src_s else None


# ------------------------------------------------------------------------------------ forward
def forward(
    call: LoraCall, source_out: bool, fuse_down: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(y_t [M, N], y_s [M, N] or None, s_t [M, R] fp32, s_s [M, R] fp32 or None).

    ``fuse_down`` is accepted for signature parity with the Triton launcher; on the CPU the
    down-projection is always its own pass.
    """
    (x, source, w, bias, lora_A, lora_B, scaling, fusion, params, dropout_p, masks, seq_len, source_base,
     fusion_mask) = call
    if _needs_reference(x, lora_A):
        return torch_backend.forward(call, source_out)
    _check_dtype(x)
    lib = _lib()
    m, k = x.shape
    n, r = w.out_features, lora_A.shape[0]
    fusion, need_src_s = fusion_plan(fusion, source is not None)
    source_out = source_out and source is not None
    if m == 0:
        def empty(cols: int, dtype: torch.dtype = x.dtype) -> torch.Tensor:
            return x.new_empty((0, cols), dtype=dtype)

        return empty(n), (empty(n) if source_out else None), empty(r, torch.float32), (
            empty(r, torch.float32) if need_src_s else None
        )
    mask_t, mask_s = _masks(masks, dropout_p, need_src_s)
    keep = keep_scale(dropout_p)
    s_t, s_s = lib.lora_down(x, lora_A, mask_t, source if need_src_s else None, mask_s, keep, 1.0)
    s_s = s_s if need_src_s else None
    base_rows = source if source_base is None else source_base  # y_s: the source rows' own base product
    rows = (x, base_rows if source_out else None, *_weight(w), n, w.blocksize, bias)
    if is_per_token(fusion):  # phi computed inside the op (saves the torch calls at decode sizes)
        y, y_s = lib.linear(*rows, s_t, lora_B, scaling, s_s, FUSIONS.index(fusion))
    else:
        y, y_s = lib.linear(*rows, sequence_fuse(s_s, s_t, fusion, params, seq_len, fusion_mask), lora_B, scaling)
    return y, (y_s if source_out else None), s_t, s_s


# ------------------------------------------------------------------------------------ backward
def backward(
    call: LoraCall, dy: torch.Tensor, s_t: torch.Tensor, s_s: torch.Tensor | None, needs: tuple[bool, bool, bool, bool]
) -> Grads:
    """Gradients for x (target rows), A, B and the fusion parameters; none for source or W."""
    (x, source, w, bias, lora_A, lora_B, scaling, fusion, params, dropout_p, masks, seq_len, source_base,
     fusion_mask) = call
    if _needs_reference(x, lora_A):
        return torch_backend.backward(call, dy, s_t, s_s, needs)
    _check_dtype(x)
    lib = _lib()
    need_dx, need_da, need_db, _ = needs
    m, k = x.shape
    n = w.out_features
    fusion, need_src_s = fusion_plan(fusion, source is not None)
    if m == 0:
        return zero_grads(x, lora_A, lora_B, params, needs)
    dy = dy.to(x.dtype)
    mask_t, mask_s = _masks(masks, dropout_p, need_src_s)
    keep = keep_scale(dropout_p)
    s_t = s_t.float()
    s_s = s_s.float() if need_src_s else None
    dz, _ = lib.lora_down(dy, lora_B.t(), None, None, None, 1.0, scaling)  # scaling * dy B, fp32 [M, r]
    ds_t, ds_s, z, d_params = rank_r_backward(dz, s_s, s_t, fusion, params, seq_len, fusion_mask)
    dx = None
    if need_dx:
        dx = lib.linear_dx(dy, *_weight(w), n, k, w.blocksize, ds_t, lora_A, mask_t, keep)
    d_a = d_b = None
    if need_da:
        src = source if need_src_s else None
        d_a = lib.rank_reduce(ds_t, x, mask_t, ds_s, src, mask_s, keep).to(lora_A.dtype)
    if need_db:
        d_b = (lib.rank_reduce(z, dy, None, None, None, None, 1.0).t() * scaling).to(lora_B.dtype)
    return Grads(dx, d_a, d_b, d_params)


# ------------------------------------------------------------------------------------ testing aid
def dequantize(weight: NF4Weight | NF4Tensors, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W as a dense [N, K] tensor computed by the native kernels of the current instruction set
    (the same code paths the GEMMs use); bit-identical to bitsandbytes' ``dequantize_4bit``."""
    w = weight.tensors() if isinstance(weight, NF4Weight) else weight
    return _lib().dequantize(*_weight(w), w.out_features, w.in_features, w.blocksize, dtype)
