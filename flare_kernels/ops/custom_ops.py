"""``torch.library`` registration of the FLARE-LoRA projection: forward op, backward op, autograd.

Both ops take flattened 2-D activations (rows = tokens) and an NF4 weight as flat tensors, and run
on the backend ``backend.resolve`` picks: the Triton launchers (``ops/launch.py``), the native CPU
kernels (``native/``) or the reference (``ops/torch_backend.py``); the three share one signature.
Fake implementations make them traceable by ``torch.compile(fullgraph=True)``.

``flare_kernels::flare_lora_fwd`` -> (y [M, N], y_source [M, N] or [0], s_t [M, r], s_s [M, r] or [0])
``flare_kernels::flare_lora_bwd`` -> [dx or [0], dA or [0], dB or [0], *d_fusion_params]

s_t and s_s are the rank-r intermediates saved for the backward (fp32; fp64 for fp64 inputs).
The last three inputs of each op (``heads``, ``attn_dropout_p``, ``attn_keep`` [B, heads, L, L])
configure the cross-attention fusion; their defaults (one head, no dropout) keep older callers.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..format.nf4 import NF4Tensors
from ..reference.fusion import AttentionParams
from . import backend
from .fusion_glue import LoraCall

Tensor = torch.Tensor


def intermediate_dtype(x: Tensor, lora_A: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, lora_A.dtype) else torch.float32


def needs_source_s(fusion: str, source: Optional[Tensor]) -> bool:
    """Whether the fusion reads the source stream (fusion "none" only passes its base product)."""
    return source is not None and fusion != "none"


def _fusion_params(fusion: str, params, heads: int, attn_dropout_p: float, attn_keep: Optional[Tensor]):
    # The launchers hand the fusion's parameters to the glue untouched: the attention's settings
    # ride along on them (reference.fusion.AttentionParams), so no launcher signature changes.
    if fusion != "cross_attention" or (heads == 1 and attn_keep is None):
        return params
    return AttentionParams(params, heads, attn_keep, attn_dropout_p)


def _empty(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


_LAUNCHERS: dict = {}


def _launcher(name: str):
    """The module with ``forward`` / ``backward`` (one signature) for a backend."""
    mod = _LAUNCHERS.get(name)
    if mod is None:
        mod = _LAUNCHERS[name] = _import_launcher(name)
    return mod


def _import_launcher(name: str):
    if name == "cpu":
        from .. import native

        return native
    if name == "triton":
        from . import launch

        return launch
    from . import torch_backend

    return torch_backend


def _autocast_off(device_type: str, fn, *args):
    # The ops compute in the dtypes they are given, as PEFT's casts arrange; entering the context
    # only when autocast is on saves its cost on every other call.
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return fn(*args)
    return fn(*args)


# ------------------------------------------------------------------------------ forward
@torch.library.custom_op("flare_kernels::flare_lora_fwd", mutates_args=())
def flare_lora_fwd(
    x: Tensor,
    source: Optional[Tensor],
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    nested_offset: Optional[Tensor],
    out_features: int,
    blocksize: int,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    fusion: str,
    fusion_params: list[Tensor],
    dropout_p: float,
    mask_t: Optional[Tensor],
    mask_s: Optional[Tensor],
    seq_len: int,
    source_out: bool,
    source_base: Optional[Tensor],
    fusion_mask: Optional[Tensor],
    heads: int = 1,
    attn_dropout_p: float = 0.0,
    attn_keep: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = NF4Tensors(packed, absmax, code, nested_absmax, nested_code, nested_offset, out_features, x.shape[1], blocksize)
    return run_forward(x, source, w, bias, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, mask_t, mask_s,
                       seq_len, source_out, source_base, fusion_mask, heads, attn_dropout_p, attn_keep)  # fmt: skip


def run_forward(x, source, w: NF4Tensors, bias, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, mask_t,
                mask_s, seq_len, source_out, source_base=None, fusion_mask=None, heads=1, attn_dropout_p=0.0,
                attn_keep=None):  # fmt: skip
    """The forward op's body. Called directly (no dispatcher, no autograd node) by the functional
    when no gradient is wanted, which saves about 80 us a call (a third of a decode step's layer
    time on a CPU); it runs with autocast off, as the op does."""
    return _autocast_off(x.device.type, _forward_impl, x, source, w, bias, lora_A, lora_B, scaling, fusion,
                         _fusion_params(fusion, fusion_params, heads, attn_dropout_p, attn_keep), dropout_p, mask_t,
                         mask_s, seq_len, source_out, source_base, fusion_mask)  # fmt: skip


def _forward_impl(x, source, w, bias, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, mask_t, mask_s,
                  seq_len, source_out, source_base, fusion_mask):  # fmt: skip
    name = backend.resolve(x.device, x.dtype)
    backend.record(name)
    acc = intermediate_dtype(x, lora_A)
    call = LoraCall(x, source, w, bias, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, (mask_t, mask_s),
                    seq_len, source_base, fusion_mask)  # fmt: skip
    y, y_s, s_t, s_s = _launcher(name).forward(call, source_out)
    # Outputs are contiguous whatever the backend computed, as the fake implementation promises.
    return (
        y.contiguous(),
        _empty(x) if y_s is None else y_s.contiguous(),
        (s_t if s_t.dtype == acc else s_t.to(acc)).contiguous(),
        _empty(x, acc) if s_s is None else (s_s if s_s.dtype == acc else s_s.to(acc)).contiguous(),
    )


@flare_lora_fwd.register_fake
def _(x, source, packed, absmax, code, nested_absmax, nested_code, nested_offset, out_features,
      blocksize, bias, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, mask_t, mask_s,
      seq_len, source_out, source_base, fusion_mask, heads=1, attn_dropout_p=0.0, attn_keep=None):  # fmt: skip
    m, r = x.shape[0], lora_A.shape[0]
    acc = intermediate_dtype(x, lora_A)
    y_s = x.new_empty((m, out_features)) if source_out and source is not None else _empty(x)
    s_s = x.new_empty((m, r), dtype=acc) if needs_source_s(fusion, source) else _empty(x, acc)
    return x.new_empty((m, out_features)), y_s, x.new_empty((m, r), dtype=acc), s_s


# ------------------------------------------------------------------------------ backward
@torch.library.custom_op("flare_kernels::flare_lora_bwd", mutates_args=())
def flare_lora_bwd(
    dy: Tensor,
    x: Tensor,
    source: Optional[Tensor],
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    nested_offset: Optional[Tensor],
    out_features: int,
    blocksize: int,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    fusion: str,
    fusion_params: list[Tensor],
    dropout_p: float,
    mask_t: Optional[Tensor],
    mask_s: Optional[Tensor],
    s_t: Tensor,
    s_s: Tensor,
    seq_len: int,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
    need_dparams: bool,
    fusion_mask: Optional[Tensor],
    heads: int = 1,
    attn_dropout_p: float = 0.0,
    attn_keep: Optional[Tensor] = None,
) -> list[Tensor]:
    w = NF4Tensors(packed, absmax, code, nested_absmax, nested_code, nested_offset, out_features, x.shape[1], blocksize)
    return _autocast_off(x.device.type, _backward_impl, dy, x, source, w, lora_A, lora_B, scaling, fusion,
                         _fusion_params(fusion, fusion_params, heads, attn_dropout_p, attn_keep), dropout_p, mask_t, mask_s, s_t, s_s, seq_len,
                         (need_dx, need_da, need_db, need_dparams), fusion_mask)  # fmt: skip


def _backward_impl(dy, x, source, w, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, mask_t, mask_s,
                   s_t, s_s, seq_len, needs, fusion_mask):  # fmt: skip
    name = backend.resolve(x.device, x.dtype)
    backend.record(name)
    call = LoraCall(x, source, w, None, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, (mask_t, mask_s),
                    seq_len, None, fusion_mask)  # fmt: skip
    g = _launcher(name).backward(call, dy, s_t, s_s if needs_source_s(fusion, source) else None, needs)
    return [
        _empty(x) if g.dx is None else g.dx.contiguous(),
        _empty(lora_A) if g.d_lora_A is None else g.d_lora_A.contiguous(),
        _empty(lora_B) if g.d_lora_B is None else g.d_lora_B.contiguous(),
        *([p.contiguous() for p in g.d_params] if needs[3] else []),
    ]


@flare_lora_bwd.register_fake
def _(dy, x, source, packed, absmax, code, nested_absmax, nested_code, nested_offset, out_features,
      blocksize, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, mask_t, mask_s, s_t, s_s,
      seq_len, need_dx, need_da, need_db, need_dparams, fusion_mask, heads=1, attn_dropout_p=0.0,
      attn_keep=None):  # fmt: skip
    return [
        x.new_empty(x.shape) if need_dx else _empty(x),
        lora_A.new_empty(lora_A.shape) if need_da else _empty(lora_A),
        lora_B.new_empty(lora_B.shape) if need_db else _empty(lora_B),
        *([p.new_empty(p.shape) for p in fusion_params] if need_dparams else []),
    ]


# ------------------------------------------------------------------------------ autograd
# Positions of the differentiable inputs of flare_lora_fwd; it has 26 inputs, the last three
# with defaults. The backward returns one entry per argument the caller passed, trailing
# arguments at their defaults not counted: as many as ctx.needs_input_grad has.
_X, _BIAS, _A, _B, _PARAMS, _N_INPUTS = 0, 10, 11, 12, 15, 26
_DEFAULTS = (1, 0.0, None)  # heads, attn_dropout_p, attn_keep


def _setup_context(ctx, inputs, output):
    inputs = (*inputs, *_DEFAULTS[len(_DEFAULTS) - (_N_INPUTS - len(inputs)):])  # defaults left out, if any
    (x, source, packed, absmax, code, nested_absmax, nested_code, nested_offset, out_features,
     blocksize, bias, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, mask_t, mask_s,
     seq_len, source_out, source_base, fusion_mask, heads, attn_dropout_p,
     attn_keep) = inputs  # fmt: skip
    _, y_s, s_t, s_s = output
    # Saved: activations, masks, the rank-r intermediates and the 4-bit weight as stored; never a
    # dequantized weight. A fusion that does not read the source (fusion "none": the source rows
    # only get their base product) keeps neither the source rows nor their mask.
    reads_source = needs_source_s(fusion, source)
    ctx.save_for_backward(
        x, source if reads_source else None, packed, absmax, code, nested_absmax, nested_code, nested_offset,
        lora_A, lora_B, mask_t, mask_s if reads_source else None, s_t, s_s, fusion_mask,
        attn_keep if reads_source else None, *fusion_params,
    )  # fmt: skip
    ctx.meta = (out_features, blocksize, scaling, fusion, dropout_p, seq_len, None if bias is None else bias.dtype,
                heads, attn_dropout_p)  # fmt: skip
    ctx.mark_non_differentiable(y_s, s_t, s_s)


def _backward(ctx, dy, dy_source, ds_t, ds_s):
    (x, source, packed, absmax, code, nested_absmax, nested_code, nested_offset,
     lora_A, lora_B, mask_t, mask_s, s_t, s_s, fusion_mask, attn_keep, *params) = ctx.saved_tensors  # fmt: skip
    out_features, blocksize, scaling, fusion, dropout_p, seq_len, bias_dtype, heads, attn_dropout_p = ctx.meta
    needs = ctx.needs_input_grad
    need_dparams = bool(needs[_PARAMS]) and any(needs[_PARAMS])
    grads = flare_lora_bwd(
        dy, x, source, packed, absmax, code, nested_absmax, nested_code, nested_offset,
        out_features, blocksize, lora_A, lora_B, scaling, fusion, params, dropout_p,
        mask_t, mask_s, s_t, s_s, seq_len,
        needs[_X], needs[_A], needs[_B], need_dparams, fusion_mask, heads, attn_dropout_p, attn_keep,
    )  # fmt: skip
    result: list = [None] * len(needs)
    result[_X] = grads[0] if needs[_X] else None
    result[_A] = grads[1] if needs[_A] else None
    result[_B] = grads[2] if needs[_B] else None
    result[_PARAMS] = list(grads[3:]) if need_dparams else [None] * len(params)
    if bias_dtype is not None and needs[_BIAS]:
        result[_BIAS] = dy.sum(dim=0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(bias_dtype)
    return tuple(result)


torch.library.register_autograd("flare_kernels::flare_lora_fwd", _backward, setup_context=_setup_context)
