"""What users run today: bitsandbytes ``Linear4bit`` + a PEFT LoRA, and bitsandbytes' ``gemm_4bit``.

FLARE in the authors' style (pnborchert/FLARE, on PEFT + bitsandbytes): the source stream is a
separate call of the frozen 4-bit base layer under no_grad, the target stream goes through the
PEFT layer's base call (cloned, as PEFT does for 4-bit), and the fusion phi(A x_s, A x_t) is done
in torch between ``lora_A`` and ``lora_B``.

On a CPU bitsandbytes has two paths, both measured, each on its own module instance:
* ``bnb_peft`` (train mode): dequantize to bf16, then ``F.linear``; the only path with grad.
* ``bnb_peft_cpu_packed`` (eval mode, no grad): the first forward repacks the weight in place
  into a CPU-only layout (bf16 scales) and computes with a fused CPU kernel from then on. The
  repacked tensors are not NF4 any more (kernel-notes.md), so no other provider may share them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ACT_DTYPE, ADAPTER_DTYPE, Layer, LayerWeights, Provider, tensor_bytes


def _missing(*packages: str) -> str | None:
    import importlib

    for pkg in packages:
        try:
            importlib.import_module(pkg)
        except Exception as exc:  # ImportError, or a broken install raising something else
            return f"{pkg} cannot be imported ({type(exc).__name__}: {exc})"
    return None


def make_linear4bit(dense: torch.Tensor) -> nn.Module:
    """A bitsandbytes nf4 ``Linear4bit`` (double quantization, bf16 compute) quantized from ``dense``."""
    import bitsandbytes as bnb

    n, k = dense.shape
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=ACT_DTYPE, compress_statistics=True,
                              quant_type="nf4", device="meta")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(
        dense.detach().clone(), requires_grad=False, compress_statistics=True, quant_type="nf4"
    )
    return layer.to(dense.device)  # quantizes on the device


def linear4bit_bytes(layer: nn.Module) -> int:
    qs = layer.weight.quant_state
    nested = (qs.state2.absmax, qs.state2.code, qs.offset) if qs.nested else ()
    return tensor_bytes(layer.weight.data, qs.absmax, qs.code, *nested)


class _Holder(nn.Module):
    """The smallest model PEFT will wrap; ``is_loaded_in_4bit`` makes it pick ``lora.bnb.Linear4bit``."""

    is_loaded_in_4bit = True

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def peft_lora_linear4bit(weights: LayerWeights) -> nn.Module:
    """PEFT's ``lora.bnb.Linear4bit`` around a fresh bitsandbytes layer, with the case's LoRA factors."""
    from peft import LoraConfig, get_peft_model

    base = make_linear4bit(weights.dense)
    config = LoraConfig(r=weights.r, lora_alpha=weights.scaling * weights.r, lora_dropout=0.0,
                        target_modules=["proj"], bias="none")  # fmt: skip
    model = get_peft_model(_Holder(base), config)
    layer = model.base_model.model.proj
    if type(layer).__module__.split(".")[-1] != "bnb":
        raise RuntimeError(f"PEFT wrapped the 4-bit layer as {type(layer).__name__}, not lora.bnb.Linear4bit")
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(weights.lora_a.to(layer.lora_A["default"].weight.dtype))
        layer.lora_B["default"].weight.copy_(weights.lora_b.to(layer.lora_B["default"].weight.dtype))
    return layer


def authors_flare_forward(layer: nn.Module, x: torch.Tensor, src: torch.Tensor, fusion: str):
    """FLARE on a PEFT 4-bit LoRA layer as the authors run it: two base calls, fusion in torch."""
    from flare_kernels.reference.fusion import fuse

    base = layer.base_layer
    with torch.no_grad():
        y_src = base(src)  # the English stream: the frozen base layer, a pass of its own
    result = base(x).clone()
    lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
    drop, scaling = layer.lora_dropout["default"], layer.scaling["default"]
    dtype = lora_a.weight.dtype
    z = fuse(lora_a(drop(src.to(dtype))), lora_a(drop(x.to(dtype))), fusion)
    return result + (lora_b(z) * scaling).to(result.dtype), y_src


class BnbPeft(Provider):
    name = "bnb_peft"
    label = "bitsandbytes + PEFT (train mode)"
    train_mode = True

    def unavailable(self, dev):
        return super().unavailable(dev) or _missing("bitsandbytes", "peft")

    def build(self, weights: LayerWeights) -> Layer:
        layer = peft_lora_linear4bit(weights)
        layer.train(self.train_mode)
        params = [p for p in layer.parameters() if p.requires_grad]

        def fn(inp, case):
            if inp.src is None:
                return layer(inp.x), None
            return authors_flare_forward(layer, inp.x, inp.src, case.fusion)

        info = {"module": layer}
        return Layer(fn, params, linear4bit_bytes(layer.base_layer) + tensor_bytes(*params), info)


class BnbPeftCpuPacked(BnbPeft):
    name = "bnb_peft_cpu_packed"
    label = "bitsandbytes + PEFT (CPU eval mode, repacked)"
    train_mode = False
    modes = ("fwd",)
    devices = ("cpu",)

    def unavailable(self, dev):
        reason = super().unavailable(dev)
        if reason:
            return reason
        import bitsandbytes as bnb

        probe = bnb.nn.Linear4bit(64, 64, quant_type="nf4", device="meta")
        if not getattr(probe, "support_avx512bf16_for_cpu", False):
            return "this CPU has no AVX512-BF16: bitsandbytes keeps the dequantize + matmul path in eval mode"
        return None

    def build(self, weights: LayerWeights) -> Layer:
        built = super().build(weights)
        layer = built.info["module"]
        base = layer.base_layer
        with torch.no_grad():  # the first eval-mode forward repacks the weight in place
            layer(torch.zeros((1, weights.shape.k), device=weights.dev, dtype=ACT_DTYPE))
        if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("bitsandbytes did not repack the weight: this is not its CPU eval path")
        # Count the repacked layout (bf16 scales instead of nested codes).
        return Layer(built.fn, built.params, linear4bit_bytes(base) + tensor_bytes(*built.params), built.info)


class BnbGemm4bit(Provider):
    """bitsandbytes' fused inference GEMM (``torch.ops.bitsandbytes.gemm_4bit``, 0.50+) + LoRA in torch.

    Measured on CUDA for M <= 64, where bitsandbytes dispatches to it. On a CPU the op's
    registered implementation is the generic dequantize + ``F.linear``, the path ``bnb_peft``
    already times, so it is not repeated there.
    """

    name = "bnb_gemm_4bit"
    label = "bitsandbytes gemm_4bit + LoRA (inference)"
    modes = ("fwd",)
    devices = ("cuda",)
    max_m = 64

    def unavailable(self, dev):
        reason = super().unavailable(dev) or _missing("bitsandbytes")
        if reason:
            return reason
        import bitsandbytes  # noqa: F401  (registers the ops)

        if not hasattr(torch.ops.bitsandbytes, "gemm_4bit"):
            return f"bitsandbytes {bitsandbytes.__version__} has no gemm_4bit op (0.50+)"
        return None

    def build(self, weights: LayerWeights) -> Layer:
        from flare_kernels.reference.fusion import fuse

        base = make_linear4bit(weights.dense)
        data, qs = base.weight.data, base.weight.quant_state
        a = weights.lora_a.to(ADAPTER_DTYPE)
        b = weights.lora_b.to(ADAPTER_DTYPE)
        scaling = weights.scaling

        def gemm(x):
            if qs.nested:
                return torch.ops.bitsandbytes.gemm_4bit.default(
                    x, data, list(qs.shape), qs.state2.absmax, qs.blocksize, qs.quant_type,
                    absmax_8bit=qs.absmax, absmax_code=qs.state2.code, absmax_offset=qs.offset,
                )  # fmt: skip
            return torch.ops.bitsandbytes.gemm_4bit.default(
                x, data, list(qs.shape), qs.absmax, qs.blocksize, qs.quant_type
            )

        def fn(inp, case):
            y_src = None if inp.src is None else gemm(inp.src)
            y = gemm(inp.x)
            s_t = F.linear(inp.x.to(ADAPTER_DTYPE), a)
            s_s = None if inp.src is None else F.linear(inp.src.to(ADAPTER_DTYPE), a)
            return y + (F.linear(fuse(s_s, s_t, case.fusion), b) * scaling).to(y.dtype), y_src

        return Layer(fn, [], linear4bit_bytes(base) + tensor_bytes(a, b))
