"""Public functional entry point: validate, flatten, draw dropout masks, call the custom op."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..format.nf4 import NF4Weight
from ..reference.flare_lora import draw_dropout_mask
from ..reference.fusion import FUSION_PARAM_COUNT, FUSIONS, check_heads
from .custom_ops import flare_lora_fwd, run_forward

_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Tensor.to returns t itself for its own dtype, but only after ~3 us of dispatch on a CPU;
    # the functional casts up to four tensors a call.
    return t if t.dtype == dtype else t.to(dtype)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _as_nf4(weight) -> NF4Weight:
    if isinstance(weight, NF4Weight):
        return weight
    if hasattr(weight, "quant_state") or hasattr(getattr(weight, "weight", None), "quant_state"):
        return NF4Weight.from_bnb(weight)  # raises for fp4
    raise TypeError(
        f"weight must be an NF4Weight (flare_kernels.quantize_nf4 or NF4Weight.from_bnb) or a "
        f"bitsandbytes 4-bit weight, got {type(weight).__name__}"
    )


def _check_tensor(name: str, t, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}: move all inputs to one device")


def _validate(x, weight, lora_A, lora_B, scaling, source, fusion, bias, dropout_p, fusion_params,
              dropout_mask, source_dropout_mask) -> None:  # fmt: skip
    _check_tensor("x", x, x.device if isinstance(x, torch.Tensor) else None)
    if x.dtype not in _ACTIVATION_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., in_features], got a scalar")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features (shape {_shape(x)}) but the weight expects in_features={k}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        _check_tensor(name, t, x.device)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    r = lora_A.shape[0]
    if r <= 0:
        raise ValueError(f"the LoRA rank r must be > 0, got lora_A of shape {_shape(lora_A)}")
    if lora_A.shape[1] != k:
        raise ValueError(f"lora_A must be [r, in_features] = [r, {k}], got shape {_shape(lora_A)}")
    if _shape(lora_B) != (n, r):
        raise ValueError(f"lora_B must be [out_features, r] = [{n}, {r}], got shape {_shape(lora_B)}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_A and lora_B must share a dtype, got {lora_A.dtype} and {lora_B.dtype}")
    if not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    if source is not None:
        _check_tensor("source", source, x.device)
        if _shape(source) != _shape(x):
            raise ValueError(
                f"source must have the shape of x (positions are fused one to one), got source "
                f"{_shape(source)} and x {_shape(x)}"
            )
        if source.dtype != x.dtype:
            raise TypeError(f"source dtype {source.dtype} differs from x dtype {x.dtype}")
    if bias is not None:
        _check_tensor("bias", bias, x.device)
        if _shape(bias) != (n,):
            raise ValueError(f"bias must be [out_features] = [{n}], got shape {_shape(bias)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if source is not None and len(fusion_params) != FUSION_PARAM_COUNT[fusion]:
        raise ValueError(
            f"fusion {fusion!r} takes {FUSION_PARAM_COUNT[fusion]} parameter tensors, got {len(fusion_params)}"
        )
    if source is not None and fusion == "cross_attention":
        shapes = [_shape(p) for p in fusion_params]
        want = [(r, r), (r,)] * 3
        if shapes != want:
            raise ValueError(
                f"cross_attention parameters must be (Wq, bq, Wk, bk, Wv, bv) with shapes {want}, got {shapes}"
            )
    for name, p in zip(("Wq", "bq", "Wk", "bk", "Wv", "bv"), fusion_params):
        _check_tensor(f"fusion parameter {name}", p, x.device)
    for name, mask, like in (("dropout_mask", dropout_mask, x), ("source_dropout_mask", source_dropout_mask, source)):
        if mask is None:
            continue
        _check_tensor(name, mask, x.device)
        if mask.dtype != torch.bool or like is None or _shape(mask) != _shape(like):
            raise ValueError(f"{name} must be a bool tensor of the shape of its stream {_shape(x)}, got {mask.dtype} {_shape(mask)}")


def _validate_extras(x, source, source_base, fusion_mask) -> None:
    if source_base is not None:
        _check_tensor("source_base", source_base, x.device)
        if source is None:
            raise ValueError("source_base is the source stream's base input: it needs a source")
        if _shape(source_base) != _shape(x) or source_base.dtype != x.dtype:
            raise ValueError(
                f"source_base must match x, got {source_base.dtype} {_shape(source_base)} and {x.dtype} {_shape(x)}"
            )
    if fusion_mask is not None:
        _check_tensor("fusion_mask", fusion_mask, x.device)
        if fusion_mask.dtype != torch.bool or _shape(fusion_mask) != _shape(x)[:-1]:
            raise ValueError(
                f"fusion_mask must be a bool tensor of x's leading shape {_shape(x)[:-1]}, got "
                f"{fusion_mask.dtype} {_shape(fusion_mask)}"
            )


def _attention_keep(x, source, fusion, r, heads, p, keep):
    """Validate the cross-attention settings; the attention-dropout keep-mask [B, heads, L, L]
    (flattened batch) or None. Drawn from torch's RNG, after the LoRA masks, so that a resumed
    run that restores the RNG state redraws the same masks."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"attention_dropout_p must be in [0, 1), got {p!r}")
    if fusion != "cross_attention" or source is None:
        return None  # no attention: heads and attention dropout are unused
    check_heads(heads, r)
    length = x.shape[-2] if x.dim() >= 2 else 1
    shape = (math.prod(x.shape[:-2]), heads, length, length)
    if keep is not None:
        _check_tensor("attention_dropout_mask", keep, x.device)
        if keep.dtype != torch.bool or keep.numel() != math.prod(shape):
            raise ValueError(f"attention_dropout_mask must be bool [..., heads={heads}, L, L], got "
                             f"{keep.dtype} {_shape(keep)}")  # fmt: skip
        return keep.reshape(shape) if p > 0.0 else None
    if p == 0.0:
        return None
    return torch.empty(shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)


def flare_lora_linear(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    source: torch.Tensor | None = None,
    fusion: str = "add_relu",
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_source_output: bool = False,
    fusion_params: Sequence[torch.Tensor] = (),
    dropout_mask: torch.Tensor | None = None,
    source_dropout_mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    source_base: torch.Tensor | None = None,
    fusion_mask: torch.Tensor | None = None,
    heads: int = 1,
    attention_dropout_p: float = 0.0,
    attention_dropout_mask: torch.Tensor | None = None,
):
    """FLARE-LoRA projection over a 4-bit NF4 base weight, forward and backward.

    ``y = x W0^T + b + scaling * phi(drop(source) A^T, drop(x) A^T) B^T``; without ``source`` it is
    plain (Q)LoRA. Shapes: x and source [..., L, in] (sequence-level fusions mix the L positions of
    each sequence), weight [out, in] NF4, lora_A [r, in], lora_B [out, r], bias [out],
    fusion_params for ``cross_attention``: (Wq [r, r], bq [r], Wk, bk, Wv, bv).

    Dropout (``dropout_p > 0``) draws an independent keep-mask per stream unless
    ``dropout_mask`` / ``source_dropout_mask`` (bool, True = kept) are given. The source stream
    gets no gradient; A, B, x, bias (if it requires grad) and the fusion parameters do.
    ``compute_dtype`` (default: the weight's, else x's) is the dtype of the base product, as in
    bitsandbytes; the result is returned in x's dtype.

    Returns y [..., out], or (y, y_source) with ``return_source_output`` (y_source = source W0^T + b,
    no gradient; None without a source).

    ``source_base`` (shape of x): the rows whose base product is y_source when they are not the
    fused ``source`` rows (the paper's residual variant fuses the block input): still one pass
    over W0 for both streams. ``fusion_mask`` (bool [..., L], True = real token): key-padding mask
    of the sequence-level fusions, so padded positions do not enter t^T t or the attention.

    Cross-attention only: ``heads`` (dividing r) splits it into heads of r / heads dims;
    ``attention_dropout_p`` drops attention probabilities with a keep-mask drawn here (or
    ``attention_dropout_mask``, bool [..., heads, L, L], True = kept), reused by the backward.
    """
    weight = _as_nf4(weight)
    fusion_params = tuple(fusion_params)
    _validate(x, weight, lora_A, lora_B, scaling, source, fusion, bias, dropout_p, fusion_params,
              dropout_mask, source_dropout_mask)  # fmt: skip
    _validate_extras(x, source, source_base, fusion_mask)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"heads must be a positive integer, got {heads!r}")
    if source is None:
        fusion_params = ()
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # As PEFT under autocast: the adapter's products run in the autocast dtype. (The ops
        # themselves run with autocast off; the casts here carry gradients back to fp32 params.)
        adt = torch.get_autocast_dtype(device_type)
        lora_A, lora_B = lora_A.to(adt), lora_B.to(adt)
        fusion_params = tuple(p.to(adt) for p in fusion_params)
    reads_source = source is not None and fusion != "none"
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = draw_dropout_mask(x, dropout_p)
        if reads_source and source_dropout_mask is None:
            source_dropout_mask = draw_dropout_mask(x, dropout_p)
    else:
        dropout_mask = source_dropout_mask = None
    if not reads_source:
        source_dropout_mask = None  # fusion "none" never reads the source stream's adapter input
    attn_keep = _attention_keep(x, source, fusion, lora_A.shape[0], heads, attention_dropout_p,
                                attention_dropout_mask)  # fmt: skip
    attn_p = float(attention_dropout_p) if attn_keep is not None else 0.0

    in_dtype = x.dtype
    cdt = compute_dtype or weight.compute_dtype or x.dtype
    lead, k = x.shape[:-1], x.shape[-1]
    seq_len = x.shape[-2] if x.dim() >= 2 and x.shape[-2] > 0 else 1
    x2 = _cast(x, cdt).reshape(-1, k)
    s2 = None if source is None else _cast(source, cdt).reshape(-1, k)
    m2 = None if dropout_mask is None else dropout_mask.reshape(-1, k)
    ms2 = None if source_dropout_mask is None else source_dropout_mask.reshape(-1, k)
    sb2 = None if source_base is None or source is None else _cast(source_base, cdt).reshape(-1, k)
    fm2 = None if fusion_mask is None or source is None else fusion_mask.reshape(-1)
    w = weight.tensors()
    source_out = bool(return_source_output and source is not None)
    differentiable = (x, bias, lora_A, lora_B, *fusion_params)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable) or (
        torch.compiler.is_compiling()
    ):
        y, y_s, _, _ = flare_lora_fwd(
            x2, s2, w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.nested_offset,
            w.out_features, w.blocksize, bias, lora_A, lora_B, float(scaling), fusion, list(fusion_params),
            float(dropout_p), m2, ms2, seq_len, source_out, sb2, fm2, heads, attn_p, attn_keep,
        )  # fmt: skip
    else:  # nothing to differentiate: the op's body without the dispatcher (inference, decoding)
        y, y_s, _, _ = run_forward(x2, s2, w, bias, lora_A, lora_B, float(scaling), fusion, list(fusion_params),
                                   float(dropout_p), m2, ms2, seq_len, source_out, sb2, fm2, heads, attn_p,
                                   attn_keep)  # fmt: skip
    y = _cast(y.view(*lead, w.out_features), in_dtype)
    if not return_source_output:
        return y
    y_source = None if source is None else _cast(y_s.view(*lead, w.out_features), in_dtype)
    return y, y_source
