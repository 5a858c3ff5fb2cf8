"""Native C++ CPU kernels (``flare_kernels._C``, built by CMake through setup.py).

Until the extension is built this package reports itself unavailable and the CPU runs the
reference. Interface (mirrors ``ops/launch.py``): ``forward(...)`` and ``backward(...)`` with the
launchers' signatures.
"""


def available() -> bool:
    return False
