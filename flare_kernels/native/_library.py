"""Loading ``flare_kernels._C`` (the CMake-built operator library) once, lazily.

Import torch first (the library links libtorch), then ``torch.ops.load_library`` on the file the
build put next to this package. Anything that keeps it from loading (not built, built against
another torch, a missing symbol) leaves the backend unavailable with the reason kept for
``load_error()``; the reference path runs instead.
"""

from __future__ import annotations

import importlib.util
import threading

import torch

_lock = threading.Lock()
_ops = None
_error: str | None = None
_loaded = False


def _load() -> None:
    global _ops, _error
    spec = importlib.util.find_spec("flare_kernels._C")
    if spec is None or not spec.origin:
        _error = (
            "flare_kernels._C is not built (reinstall with a C++ compiler and CMake present: "
            "pip install --no-build-isolation -e .)"
        )
        return
    try:
        torch.ops.load_library(spec.origin)
        ops = torch.ops.flare_kernels_cpu
        info = dict(part.split("=", 1) for part in ops.build_info().split(";") if "=" in part)
    except (OSError, RuntimeError, AttributeError) as exc:
        _error = f"flare_kernels._C at {spec.origin} failed to load: {exc}"
        return
    built_for = info.get("torch", "unknown")
    if built_for != torch.__version__:
        _error = (
            f"flare_kernels._C was built against torch {built_for} but torch {torch.__version__} is "
            "installed; rebuild it: pip install --no-build-isolation -e ."
        )
        return
    _ops = ops


def ops():
    """``torch.ops.flare_kernels_cpu``, or None when the library is unavailable."""
    global _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                _load()
                _loaded = True
    return _ops


def load_error() -> str | None:
    """Why the native library is unavailable (None when it loaded)."""
    ops()
    return _error
