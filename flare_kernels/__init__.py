"""flare-kernels: fused NF4 + LoRA + FLARE cross-lingual fusion, forward and backward.

Layers (each imports only those before it):
    format     NF4 weights in bitsandbytes' layout: quantize, dequantize, wrap bitsandbytes tensors
    reference  pure-PyTorch spec of the FLARE-LoRA projection and its fusion functions
    kernels    Triton jit kernels (optional: absent without Triton)
    ops        backend choice, launchers, torch.library ops with autograd, functional API
    modules    drop-in nn.Modules
"""

from .format import NF4Tensors, NF4Weight, quantize_nf4
from .modules import CrossAttentionFusion, FlareLinear, FlareLinear4bit
from .ops import flare_lora_linear, get_backend, last_backend, set_backend, use_backend
from .reference import FUSIONS, flare_lora_reference

__version__ = "0.1.0"

__all__ = [
    "FUSIONS",
    "CrossAttentionFusion",
    "FlareLinear",
    "FlareLinear4bit",
    "NF4Tensors",
    "NF4Weight",
    "flare_lora_linear",
    "flare_lora_reference",
    "get_backend",
    "last_backend",
    "quantize_nf4",
    "set_backend",
    "use_backend",
]
