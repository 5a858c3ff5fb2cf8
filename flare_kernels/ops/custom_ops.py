"""``torch.library`` registration of the FLARE-LoRA projection: forward op, backward op, autograd.

Both ops take flattened 2-D activations (rows = tokens) and an NF4 weight as flat tensors; they
route to the Triton launchers or the reference by ``backend.resolve`` (CPU: the reference; CUDA:
Triton). Fake implementations make them traceable by ``torch.compile(fullgraph=True)``.

``flare_kernels::flare_lora_fwd`` -> (y [M, N], y_source [M, N] or [0], s_t [M, r], s_s [M, r] or [0])
``flare_kernels::flare_lora_bwd`` -> [dx or [0], dA or [0], dB or [0], *d_fusion_params]

s_t and s_s are the rank-r intermediates saved for the backward (fp32; fp64 for fp64 inputs).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..format.nf4 import NF4Tensors
from ..reference.flare_lora import flare_lora_backward, flare_lora_reference
from . import backend

Tensor = torch.Tensor


def intermediate_dtype(x: Tensor, lora_A: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, lora_A.dtype) else torch.float32


def needs_source_s(fusion: str, source: Optional[Tensor]) -> bool:
    return source is not None and fusion != "none"


def _empty(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


def _seq_view(t: Tensor | None, seq_len: int) -> Tensor | None:
    return None if t is None else t.reshape(-1, seq_len, t.shape[-1])


def _launcher(name: str):
    """The module with ``forward`` / ``backward`` for a kernel backend."""
    if name == "cpu":
        from .. import native

        return native
    from . import launch

    return launch


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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        return _forward_impl(
            x, source, NF4Tensors(packed, absmax, code, nested_absmax, nested_code, nested_offset, out_features,
                                  x.shape[1], blocksize),
            bias, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, mask_t, mask_s, seq_len, source_out,
        )  # fmt: skip


def _forward_impl(x, source, w, bias, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, mask_t, mask_s,
                  seq_len, source_out):  # fmt: skip
    out_features = w.out_features
    name = backend.resolve(x.device)
    backend.record(name)
    acc = intermediate_dtype(x, lora_A)
    if name in ("triton", "cpu"):
        launch = _launcher(name)
        y, y_s, s_t, s_s = launch.forward(
            x, source, w, bias, lora_A, lora_B, scaling, fusion, fusion_params,
            dropout_p, (mask_t, mask_s), seq_len, source_out,
        )
    else:
        out = flare_lora_reference(
            _seq_view(x, seq_len), w, lora_A, lora_B, scaling,
            source=_seq_view(source, seq_len), fusion=fusion, bias=bias, dropout_p=dropout_p,
            dropout_mask=_seq_view(mask_t, seq_len), source_dropout_mask=_seq_view(mask_s, seq_len),
            fusion_params=fusion_params, return_source_output=source_out,
        )
        m, n, r = x.shape[0], out_features, lora_A.shape[0]
        y = out.y.reshape(m, n)
        y_s = None if out.y_source is None else out.y_source.reshape(m, n)
        s_t = out.s_target.reshape(m, r)
        s_s = out.s_source.reshape(m, r) if needs_source_s(fusion, source) else None
    # Outputs are contiguous whatever the backend computed, as the fake implementation promises.
    return (
        y.contiguous(),
        _empty(x) if y_s is None else y_s.contiguous(),
        s_t.to(acc).contiguous(),
        _empty(x, acc) if s_s is None else s_s.to(acc).contiguous(),
    )


@flare_lora_fwd.register_fake
def _(x, source, packed, absmax, code, nested_absmax, nested_code, nested_offset, out_features,
      blocksize, bias, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, mask_t, mask_s,
      seq_len, source_out):  # fmt: skip
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
) -> list[Tensor]:
    w = NF4Tensors(packed, absmax, code, nested_absmax, nested_code, nested_offset, out_features, x.shape[1], blocksize)
    with torch.autocast(x.device.type, enabled=False):
        return _backward_impl(dy, x, source, w, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p,
                              mask_t, mask_s, s_t, s_s, seq_len, need_dx, need_da, need_db, need_dparams)  # fmt: skip


def _backward_impl(dy, x, source, w, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, mask_t, mask_s,
                   s_t, s_s, seq_len, need_dx, need_da, need_db, need_dparams):  # fmt: skip
    name = backend.resolve(x.device)
    backend.record(name)
    needs = (need_dx, need_da, need_db, need_dparams)
    if name in ("triton", "cpu"):
        launch = _launcher(name)
        s_src = s_s if needs_source_s(fusion, source) else None
        g = launch.backward(
            dy, x, source, w, lora_A, lora_B, scaling, fusion, fusion_params,
            dropout_p, (mask_t, mask_s), s_t, s_src, seq_len, needs,
        )
        dx, da, db, dparams = g.dx, g.d_lora_A, g.d_lora_B, g.d_params
    else:
        g = flare_lora_backward(
            _seq_view(dy, seq_len), _seq_view(x, seq_len), _seq_view(source, seq_len), w,
            lora_A, lora_B, scaling, fusion=fusion,
            s_target=_seq_view(s_t, seq_len),
            s_source=_seq_view(s_s, seq_len) if needs_source_s(fusion, source) else None,
            dropout_p=dropout_p, dropout_mask=_seq_view(mask_t, seq_len),
            source_dropout_mask=_seq_view(mask_s, seq_len), fusion_params=fusion_params,
        )
        dx = g.dx.reshape(x.shape) if need_dx else None
        da = g.d_lora_A.to(lora_A.dtype) if need_da else None
        db = g.d_lora_B.to(lora_B.dtype) if need_db else None
        dparams = g.d_fusion_params
    return [
        _empty(x) if dx is None else dx.contiguous(),
        _empty(lora_A) if da is None else da.contiguous(),
        _empty(lora_B) if db is None else db.contiguous(),
        *([p.contiguous() for p in dparams] if need_dparams else []),
    ]


@flare_lora_bwd.register_fake
def _(dy, x, source, packed, absmax, code, nested_absmax, nested_code, nested_offset, out_features,
      blocksize, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, mask_t, mask_s, s_t, s_s,
      seq_len, need_dx, need_da, need_db, need_dparams):  # fmt: skip
    return [
        x.new_empty(x.shape) if need_dx else _empty(x),
        lora_A.new_empty(lora_A.shape) if need_da else _empty(lora_A),
        lora_B.new_empty(lora_B.shape) if need_db else _empty(lora_B),
        *([p.new_empty(p.shape) for p in fusion_params] if need_dparams else []),
    ]


# ------------------------------------------------------------------------------ autograd
# Positions of the differentiable inputs of flare_lora_fwd.
_X, _BIAS, _A, _B, _PARAMS = 0, 10, 11, 12, 15


def _setup_context(ctx, inputs, output):
    (x, source, packed, absmax, code, nested_absmax, nested_code, nested_offset, out_features,
     blocksize, bias, lora_A, lora_B, scaling, fusion, fusion_params, dropout_p, mask_t, mask_s,
     seq_len, source_out) = inputs  # fmt: skip
    _, y_s, s_t, s_s = output
    # Saved: activations, masks, the rank-r intermediates and the 4-bit weight as stored; never a
    # dequantized weight.
    ctx.save_for_backward(
        x, source, packed, absmax, code, nested_absmax, nested_code, nested_offset,
        lora_A, lora_B, mask_t, mask_s, s_t, s_s, *fusion_params,
    )
    ctx.meta = (out_features, blocksize, scaling, fusion, dropout_p, seq_len, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(y_s, s_t, s_s)


def _backward(ctx, dy, dy_source, ds_t, ds_s):
    (x, source, packed, absmax, code, nested_absmax, nested_code, nested_offset,
     lora_A, lora_B, mask_t, mask_s, s_t, s_s, *params) = ctx.saved_tensors  # fmt: skip
    out_features, blocksize, scaling, fusion, dropout_p, seq_len, bias_dtype = ctx.meta
    needs = ctx.needs_input_grad
    need_dparams = bool(needs[_PARAMS]) and any(needs[_PARAMS])
    grads = flare_lora_bwd(
        dy, x, source, packed, absmax, code, nested_absmax, nested_code, nested_offset,
        out_features, blocksize, lora_A, lora_B, scaling, fusion, params, dropout_p,
        mask_t, mask_s, s_t, s_s, seq_len,
        needs[_X], needs[_A], needs[_B], need_dparams,
    )
    dx, da, db, dparams = grads[0], grads[1], grads[2], grads[3:]
    dbias = None
    if bias_dtype is not None and needs[_BIAS]:
        dbias = dy.sum(dim=0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(bias_dtype)
    return (
        dx if needs[_X] else None,
        None, None, None, None, None, None, None, None, None,
        dbias,
        da if needs[_A] else None,
        db if needs[_B] else None,
        None, None,
        list(dparams) if need_dparams else [None] * len(params),
        None, None, None, None, None,
    )


torch.library.register_autograd("flare_kernels::flare_lora_fwd", _backward, setup_context=_setup_context)

