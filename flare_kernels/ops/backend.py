"""Which implementation runs an op: ``FLARE_KERNELS_BACKEND`` = auto | triton | cpu | torch.

* ``triton``: the fused kernels; CUDA tensors, or CPU tensors when Triton's interpreter is on
  (``TRITON_INTERPRET=1`` set before ``flare_kernels`` is imported).
* ``cpu``: the native C++ kernels (``flare_kernels._C``), CPU tensors, when built.
* ``torch``: the pure-PyTorch reference (any device).
* ``auto`` (default): Triton on CUDA; on CPU the native kernels when built, else the reference.

The setting is read from the environment at import; ``set_backend`` / ``use_backend`` change it
at run time. ``last_backend()`` names the implementation that ran the most recent op call.
"""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "cpu", "torch")

try:
    from ..kernels import INTERPRETED as TRITON_INTERPRETED

    TRITON_AVAILABLE = True
    _TRITON_IMPORT_ERROR = None
except ImportError as exc:  # no triton on this machine: the reference still works
    TRITON_AVAILABLE = False
    TRITON_INTERPRETED = False
    _TRITON_IMPORT_ERROR = exc


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"FLARE_KERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


_requested = _check(os.environ.get("FLARE_KERNELS_BACKEND", "auto").strip().lower() or "auto")
_last: str | None = None


def get_backend() -> str:
    """The requested backend (``auto``, ``triton``, ``cpu`` or ``torch``)."""
    return _requested


def set_backend(name: str) -> None:
    global _requested
    _requested = _check(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Run a block with another backend, restoring the previous one afterwards."""
    previous = _requested
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def last_backend() -> str | None:
    """The backend that ran the most recent flare_kernels op (``triton``, ``cpu`` or ``torch``), or None."""
    return _last


def record(name: str) -> None:
    global _last
    _last = name


_native_ok: bool | None = None


def native_available() -> bool:
    # Loading succeeds or fails once per process, so the answer is kept: asking the package each
    # call cost a few microseconds of every op call, which counts at decode sizes.
    global _native_ok
    if _native_ok is None:
        from .. import native

        _native_ok = native.available()
    return _native_ok


def resolve(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that will run for tensors on ``device``; raises if the request cannot be met.

    ``auto`` sends float64 activations to the reference: neither kernel backend computes in fp64.
    """
    if _requested == "torch":
        return "torch"
    if _requested == "auto" and dtype == torch.float64:
        return "torch"
    if _requested == "auto":
        if device.type == "cuda" and TRITON_AVAILABLE:
            return "triton"
        return "cpu" if device.type == "cpu" and native_available() else "torch"
    if _requested == "cpu":
        if device.type != "cpu":
            raise ValueError(f"FLARE_KERNELS_BACKEND=cpu runs CPU tensors only, got tensors on {device}")
        if not native_available():
            raise RuntimeError(
                "FLARE_KERNELS_BACKEND=cpu but the native extension flare_kernels._C is not built "
                "(reinstall with a C++ compiler and CMake present: pip install -e . --no-build-isolation)"
            )
        return "cpu"
    triton_ok = TRITON_AVAILABLE and (device.type == "cuda" or TRITON_INTERPRETED)
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"FLARE_KERNELS_BACKEND=triton but Triton cannot be imported: {_TRITON_IMPORT_ERROR}")
    if not triton_ok:
        raise ValueError(
            f"the Triton backend needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
            "before importing flare_kernels to run the kernels on the CPU, or use "
            "FLARE_KERNELS_BACKEND=torch"
        )
    return "triton"
