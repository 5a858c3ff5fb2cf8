"""Native C++ CPU kernels: ``flare_kernels._C``, built by CMake through setup.py.

The operators (``torch.ops.flare_kernels_cpu``) dequantize NF4 in registers or cache-sized tiles,
never the whole weight, and run on the best instruction set of the CPU, picked at run time:

    scalar       portable C++ (any CPU, including aarch64)
    avx2         AVX2 + FMA + F16C
    avx512       AVX-512 F/BW/VL/DQ
    avx512_bf16  + vdpbf16ps for bf16 activations
    amx          + AMX-BF16 tiles for bf16 activations (Sapphire Rapids and later)

``FLARE_KERNELS_CPU_ISA`` (read when the library loads) or ``set_isa`` / ``use_isa`` pick another
one of ``supported_isas()``; ``isa()`` names the one in use.

``forward`` / ``backward`` have the signatures and return types of ``flare_kernels.ops.launch``;
the ``flare_kernels::flare_lora_fwd`` / ``_bwd`` ops call them for backend ``cpu``
(``FLARE_KERNELS_BACKEND=cpu``, or ``auto`` on CPU tensors when ``available()``).
"""

from __future__ import annotations

import contextlib
import warnings

from ._library import load_error, ops
from .launch import backward, dequantize, forward

__all__ = [
    "available", "backward", "build_info", "built_isas", "dequantize", "forward", "isa", "load_error",
    "set_isa", "supported_isas", "use_isa",
]  # fmt: skip


_warned = False


def available() -> bool:
    """Whether the native library is built and loads with the installed torch.

    The first time it is not, a RuntimeWarning says why (pip hides the build's own warning):
    the ``auto`` backend then runs CPU tensors on the pure-PyTorch reference.
    """
    global _warned
    if ops() is not None:
        return True
    if not _warned:
        _warned = True
        warnings.warn(
            f"flare_kernels: the native CPU backend is unavailable, CPU tensors run the pure-PyTorch "
            f"reference: {load_error()}",
            RuntimeWarning,
            stacklevel=2,
        )
    return False


def _require():
    lib = ops()
    if lib is None:
        raise RuntimeError(load_error())
    return lib


def isa() -> str:
    """The instruction set the kernels run on now."""
    return _require().isa()


def supported_isas() -> list[str]:
    """Instruction sets this build and this CPU can run, from the most portable to the fastest."""
    return list(_require().supported_isas())


def built_isas() -> list[str]:
    """Instruction sets compiled into this build."""
    return list(_require().built_isas())


def set_isa(name: str | None) -> str:
    """Run the kernels on ``name`` (None or "auto": the fastest supported); returns the name in use."""
    try:
        return _require().set_isa(name or "auto")
    except RuntimeError as exc:  # the library reports a bad name as a c10 ValueError
        raise ValueError(str(exc).splitlines()[0]) from None


@contextlib.contextmanager
def use_isa(name: str | None):
    """Run a block on another instruction set, restoring the previous one afterwards."""
    previous = isa()
    set_isa(name)
    try:
        yield
    finally:
        set_isa(previous)


def build_info() -> dict[str, str]:
    """What the library was built with: torch version, compiler and instruction sets."""
    text = _require().build_info()
    return dict(part.split("=", 1) for part in text.split(";") if "=" in part)
