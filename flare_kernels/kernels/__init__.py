"""Triton kernels (``@triton.jit`` only). Import fails cleanly when Triton is not installed."""

from .backward import flare_dx_kernel, flare_dx_splitn_epilogue_kernel
from .dequant import nf4_dequant_kernel
from .forward import flare_fwd_kernel, flare_fwd_splitk_epilogue_kernel
from .lora import lora_down_kernel, lora_reduce_kernel, lora_up_kernel

# TRITON_INTERPRET is read when a kernel is decorated, so ask the kernel object what it became.
INTERPRETED = type(flare_fwd_kernel).__name__ == "InterpretedFunction"

__all__ = [
    "INTERPRETED", "flare_dx_kernel", "flare_dx_splitn_epilogue_kernel", "flare_fwd_kernel", "flare_fwd_splitk_epilogue_kernel", "lora_down_kernel",
    "lora_reduce_kernel", "lora_up_kernel", "nf4_dequant_kernel",
]
