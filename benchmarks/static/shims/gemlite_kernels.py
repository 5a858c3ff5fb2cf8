"""GemLite's Triton kernels, loaded from the installed ``gemlite`` package without a GPU.

``import gemlite`` needs CUDA (it reads the device's name and capability at import), so its
kernel modules are loaded by path under stand-in parent packages (``gemlite``,
``gemlite.triton_kernels``: namespace modules whose ``__init__`` is not run), with the few CUDA
queries their imports make answered as on an H100 (sm_90, 132 SMs) for the duration of the
import. Nothing of GemLite is copied here; the kernels are GemLite's own files.

    from benchmarks.static.shims import gemlite_kernels
    gemlite_kernels.gemv_revsplitK      # the JITFunction GemLite launches for M = 1 (4-bit)

The compile workers load the same attributes (``KernelSpec.source`` =
``"benchmarks.static.shims.gemlite_kernels:gemv_revsplitK"``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path

# attribute -> (GemLite module, kernel): the 4-bit integer (A16Wn) kernels of each matmul type.
KERNELS = {
    "gemv_revsplitK": ("gemv_revsplitK_kernels", "gemv_INT_revsplitK_kernel"),
    "gemm_splitK": ("gemm_splitK_kernels", "gemm_splitK_INT_kernel"),
    "gemm": ("gemm_kernels", "gemm_INT_kernel"),
}


class GemliteUnavailable(ImportError):
    pass


def package_dir() -> Path:
    loaded = sys.modules.get("gemlite")
    if loaded is not None and getattr(loaded, "__path__", None):
        return Path(list(loaded.__path__)[0])
    spec = importlib.util.find_spec("gemlite")  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise GemliteUnavailable("gemlite is not installed (pip install gemlite)")
    return Path(list(spec.submodule_search_locations)[0])


def version() -> str:
    import importlib.metadata

    return importlib.metadata.version("gemlite")


@contextlib.contextmanager
def _as_h100():
    """CUDA queries answered as on an H100 SXM while GemLite's modules are imported."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    class _Props:
        name = "NVIDIA H100 80GB HBM3"
        multi_processor_count = 132
        major, minor = 9, 0

    class _Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_device_properties(self, _device=0):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132}

        def __getattr__(self, name):
            if name == "utils":
                return self
            raise AttributeError(name)

    saved = torch.cuda.get_device_capability, torch.cuda.get_device_properties, triton.set_allocator
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_properties = lambda *a, **k: _Props()
    triton.set_allocator = lambda *a, **k: None  # GemLite registers a CUDA allocator for TMA
    drivers = triton.runtime.driver
    saved_active = drivers._active  # None until something asked for the driver (no GPU: it never can)
    drivers.set_active(_Driver())
    try:
        yield
    finally:
        torch.cuda.get_device_capability, torch.cuda.get_device_properties, triton.set_allocator = saved
        drivers._active = saved_active


def _module(name: str) -> types.ModuleType:
    full = f"gemlite.triton_kernels.{name}"
    if full in sys.modules:
        return sys.modules[full]
    root = package_dir()
    for pkg, path in (("gemlite", root), ("gemlite.triton_kernels", root / "triton_kernels")):
        if pkg not in sys.modules:
            stub = types.ModuleType(pkg)
            stub.__path__ = [str(path)]
            stub.__package__ = pkg
            sys.modules[pkg] = stub
    with _as_h100():
        return importlib.import_module(full)


def module(name: str) -> types.ModuleType:
    """A GemLite kernel module (``gemv_revsplitK_kernels``, ``utils``, ...)."""
    return _module(name)


def __getattr__(attr: str):
    if attr not in KERNELS:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    mod, kernel = KERNELS[attr]
    from triton.runtime.jit import JITFunction

    obj = getattr(_module(mod), kernel)
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):  # autotuner / heuristics wrappers
        obj = obj.fn
    return obj
