"""Stage 1 of the recipe: merge a plain LoRA adapter into the base weights and re-quantize to NF4.

For every adapted projection::

    W  <-  dequant(W0) + scaling * B A          (fp32)
    W0 <-  NF4(W)   with W0's blocksize and double quantization (flare_kernels.quantize_nf4,
                    bytes identical to bitsandbytes' quantize_4bit of W)

4-bit projections become bitsandbytes ``Linear4bit`` layers again (holding the new bytes), dense
ones ``nn.Linear`` with W in their dtype; ``modules_to_save`` copies replace their originals; the
adapters are gone. The result is a plain transformers model, ready for ``get_flare_model`` with a
fresh stage-2 (FLARE) config.

Re-quantization error. NF4 rounds each value to the nearest of 16 levels scaled by its block's
stored absmax a' (double quantization stores the true absmax a with an 8-bit code), so per value
|NF4(W) - W| <= 0.152 a' + |a - a'| (0.152 = half the widest gap between levels, -1.0 to -0.696);
it is the error the original QLoRA quantization made, and the tests hold every value to it. As a
relative Frobenius error ||NF4(W) - W|| / ||W|| it is about 0.09 for a large update and smaller
for a small one (most values round back to W0).

That is the catch of stage 1 in 4-bit: dequant(W0) already lies on the NF4 grid, so an update small
against the grid spacing is largely rounded away. Measured on the tiny Llama (up_proj, blocksize
64; ``merge_report``'s ``update_kept``, 1 = kept exactly): ||dW|| / ||W0|| = 0.74 keeps 0.84 of the
update, 0.12 keeps 0.30, 0.03 keeps nothing (the rounding noise is as large as the update). On the
model's logits, ||merged - adapter|| / ||adapter - base|| was 0.19 and 0.83 for the first two.
Check ``merge_report`` on a real stage-1 adapter; when the update does not survive, merge without
re-quantizing (``requantize=False``: dense weights in the model's dtype, 4x the memory of NF4).
"""

from __future__ import annotations

import torch
from torch import nn

from flare_kernels import NF4Weight, quantize_nf4

from .projection import FlareProjection4bit, FlareProjectionDense


def merged_dense_weight(module) -> torch.Tensor:
    """dequant(W0) + scaling * B A as an fp32 [out, in] tensor (the unquantized merge)."""
    a = module.lora_A.weight.detach().float()
    b = module.lora_B.weight.detach().float()
    if isinstance(module, FlareProjection4bit):
        w0 = module.weight.dequantize(torch.float32)
    else:
        w0 = module.weight.detach().float()
    return w0 + module.scaling * (b @ a)


def requantize_like(w: torch.Tensor, like: NF4Weight, compute_dtype=None) -> NF4Weight:
    """Quantize fp32 ``w`` to NF4 with ``like``'s blocksize, double quantization and dtype."""
    nf4 = quantize_nf4(w.float(), blocksize=like.blocksize, double_quant=like.nested, compute_dtype=compute_dtype)
    nf4.dtype = like.dtype  # dequantize() returns the dtype the model was loaded in
    return nf4


def to_bnb_linear4bit(nf4: NF4Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype | None) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``nf4``'s bytes (no re-quantization)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    t = nf4.tensors()
    state2 = None
    if nf4.nested:
        state2 = QuantState(absmax=t.nested_absmax, code=t.nested_code, blocksize=256, dtype=torch.float32)
    state = QuantState(
        absmax=t.absmax,
        shape=torch.Size(nf4.shape),
        code=t.code,
        blocksize=nf4.blocksize,
        quant_type="nf4",
        dtype=nf4.dtype,
        offset=t.nested_offset,
        state2=state2,
    )
    out_features, in_features = nf4.shape
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
        compress_statistics=nf4.nested, quant_type="nf4", device=t.packed.device,
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(
        t.packed.reshape(-1, 1), requires_grad=False, quant_state=state, blocksize=nf4.blocksize,
        compress_statistics=nf4.nested, quant_type="nf4", module=layer, bnb_quantized=True,
    )  # fmt: skip
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def merge_report(module) -> dict[str, float]:
    """How faithful re-quantizing one projection's merge is (all relative Frobenius norms).

    ``requant_error``: ||NF4(W) - W|| / ||W||; ``update_kept``: 1 - ||(NF4(W) - W0) - dW|| / ||dW||
    (1 = the update survived exactly, 0 = it was rounded away or replaced by noise of its size).
    """
    w = merged_dense_weight(module)
    dw = w - (
        module.weight.dequantize(torch.float32) if isinstance(module, FlareProjection4bit) else module.weight.float()
    )
    if not isinstance(module, FlareProjection4bit):
        return {"requant_error": 0.0, "update_kept": 1.0}
    q = requantize_like(w, module.weight).dequantize(torch.float32)
    w0 = module.weight.dequantize(torch.float32)
    dn = dw.norm().clamp_min(1e-30)
    return {
        "requant_error": float((q - w).norm() / w.norm().clamp_min(1e-30)),
        "update_kept": float(1.0 - ((q - w0) - dw).norm() / dn),
    }


@torch.no_grad()
def merge_and_requantize(flare_model, *, requantize: bool = True) -> nn.Module:
    """Merge ``flare_model``'s plain LoRA adapters into its base weights; returns the transformers model.

    With ``requantize=False`` 4-bit projections become dense ``nn.Linear`` layers holding W in the
    dtype the model was loaded in (no rounding to the NF4 grid).
    """
    cfg = flare_model.config
    if cfg.fuses:
        raise ValueError(
            f"only a plain LoRA adapter can be merged into the weights (stage 1); this one fuses the source "
            f"stream (fusion={cfg.fusion!r} at {len(flare_model.targets.fusion)} projections), which is not a "
            "linear function of the target input"
        )
    from ..model import _set_submodule

    model = flare_model.base_model
    for path, module in flare_model.projections().items():
        w = merged_dense_weight(module)
        if isinstance(module, FlareProjection4bit) and requantize:
            nf4 = requantize_like(w, module.weight, compute_dtype=module.compute_dtype)
            new = to_bnb_linear4bit(nf4, module.bias, module.compute_dtype)
        elif isinstance(module, (FlareProjection4bit, FlareProjectionDense)):
            dtype = module.weight.dtype
            new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            device=w.device, dtype=dtype)  # fmt: skip
            new.weight.copy_(w.to(dtype))
            if module.bias is not None:
                new.bias.copy_(module.bias)
        else:  # pragma: no cover - resolve_targets only creates the two kinds
            raise TypeError(f"{path}: unexpected module {type(module).__name__}")
        new.train(module.training)
        new.requires_grad_(False)
        _set_submodule(model, path, new)
    for path, wrapper in flare_model.saved_modules().items():
        trained = wrapper.trained_module
        trained.requires_grad_(False)
        _set_submodule(model, path, trained)
    return model
