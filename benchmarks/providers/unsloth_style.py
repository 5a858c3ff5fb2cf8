"""Unsloth's style of QLoRA (as kernel-notes.md describes it), written here from that description.

Forward: dequantize the 4-bit weight through bitsandbytes into a bf16 buffer, ``X @ W^T`` with
``torch.matmul``, then ``out.addmm_(X A^T, B^T, alpha=s)`` with A and B in the activation dtype.
Fusion at the autograd level: only X (and the rank-r intermediates) are saved; the backward
dequantizes W again and computes dX = dY W + dS A. For FLARE the source stream reuses the same
dequantized W in the same call (no second dequantization) and phi is done in torch.
"""

from __future__ import annotations

import torch

from .base import Layer, LayerWeights, Provider, tensor_bytes
from .bnb_peft import _missing, linear4bit_bytes, make_linear4bit


def _dequantize(param) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(param.data, param.quant_state).to(torch.bfloat16)


class _DequantMatmulLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, a, b, param, scaling, fusion):
        from flare_kernels.reference.fusion import fuse

        w = _dequantize(param)  # [N, K] bf16, freed after the call
        a_, b_ = a.to(x.dtype), b.to(x.dtype)
        out = torch.matmul(x, w.t())
        y_src = None if src is None else torch.matmul(src, w.t())
        s_t = x @ a_.t()
        s_s = None if src is None else src @ a_.t()
        z = fuse(s_s, s_t, fusion)
        out.addmm_(z, b_.t(), alpha=scaling)
        ctx.save_for_backward(x, src, a, b, s_t, s_s)
        ctx.param, ctx.scaling, ctx.fusion = param, scaling, fusion
        ctx.mark_non_differentiable(*(() if y_src is None else (y_src,)))
        return out, y_src

    @staticmethod
    def backward(ctx, dy, _dy_src):
        from flare_kernels.reference.fusion import fuse, fuse_backward

        x, src, a, b, s_t, s_s = ctx.saved_tensors
        a_, b_ = a.to(x.dtype), b.to(x.dtype)
        z = fuse(s_s, s_t, ctx.fusion)
        dz = (dy @ b_) * ctx.scaling
        ds_s, ds_t, _ = fuse_backward(dz, s_s, s_t, ctx.fusion)
        db = (dy.t() @ z) * ctx.scaling
        da = ds_t.t() @ x
        if ds_s is not None:
            da = da + ds_s.t() @ src
        w = _dequantize(ctx.param)  # dequantized again: W is never saved
        dx = torch.matmul(dy, w)
        dx.addmm_(ds_t, a_)
        return dx, None, da.to(a.dtype), db.to(b.dtype), None, None, None


class UnslothStyle(Provider):
    name = "unsloth_style"
    label = "dequantize + matmul + addmm_ LoRA (Unsloth's style)"

    def unavailable(self, dev):
        return super().unavailable(dev) or _missing("bitsandbytes")

    def build(self, weights: LayerWeights) -> Layer:
        base = make_linear4bit(weights.dense)  # train-mode bitsandbytes tensors, never repacked
        param = base.weight
        a, b = weights.trainable_lora()
        scaling = weights.scaling

        def fn(inp, case):
            return _DequantMatmulLoRA.apply(inp.x, inp.src, a, b, param, scaling, case.fusion)

        return Layer(fn, [a, b], linear4bit_bytes(base) + tensor_bytes(a, b))
