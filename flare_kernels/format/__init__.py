"""Storage formats: bitsandbytes' NF4 (packing, quantization, dequantization)."""

from .codes import NF4_CODE, dynamic_code, nf4_code
from .nf4 import VALID_BLOCKSIZES, NF4Tensors, NF4Weight, quantize_nf4

__all__ = ["NF4_CODE", "VALID_BLOCKSIZES", "NF4Tensors", "NF4Weight", "dynamic_code", "nf4_code", "quantize_nf4"]
