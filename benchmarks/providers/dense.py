"""Dense bf16 anchors: what the op would cost with an unquantized weight.

* ``dense_bf16``: ``F.linear`` with the bf16 weight + the LoRA branch (fp32 factors, PEFT's
  casts) and phi in torch; the source stream is a no-grad ``F.linear`` of its own.
* ``dense_bf16_gemm``: the bare GEMMs the targets are stated against: the forward is one
  ``F.linear`` over all rows of both streams (2M rows for FLARE); the backward is the dX GEMM
  of the target rows (dY W). No LoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ADAPTER_DTYPE, Layer, LayerWeights, Provider, tensor_bytes


class DenseBf16(Provider):
    name = "dense_bf16"
    label = "dense bf16 F.linear + LoRA"

    def build(self, weights: LayerWeights) -> Layer:
        from flare_kernels.reference.fusion import fuse

        w = weights.cached("dense_copy", lambda: weights.dense.clone())
        a, b = weights.trainable_lora()
        scaling = weights.scaling

        def fn(inp, case):
            y_src = None
            s_s = None
            if inp.src is not None:
                with torch.no_grad():
                    y_src = F.linear(inp.src, w)
                s_s = F.linear(inp.src.to(ADAPTER_DTYPE), a)
            y = F.linear(inp.x, w)
            s_t = F.linear(inp.x.to(ADAPTER_DTYPE), a)
            return y + (F.linear(fuse(s_s, s_t, case.fusion), b) * scaling).to(y.dtype), y_src

        return Layer(fn, [a, b], tensor_bytes(w, a, b))


class DenseBf16Gemm(Provider):
    name = "dense_bf16_gemm"
    label = "dense bf16 GEMM only (roofline anchor)"

    def build(self, weights: LayerWeights) -> Layer:
        w = weights.cached("dense_copy", lambda: weights.dense.clone())

        def fn(inp, case):
            if case.mode == "fwd":
                return F.linear(inp.x_all, w), None
            y_src = None
            if inp.src is not None:
                with torch.no_grad():
                    y_src = F.linear(inp.src, w)
            return F.linear(inp.x, w), y_src

        return Layer(fn, [], tensor_bytes(w))
