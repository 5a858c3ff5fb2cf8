"""flare-kernels: fused NF4 + LoRA + FLARE fusion kernels and the FLARE method on Hugging Face models.

Install against the torch already in the environment (``pip install -e . --no-build-isolation``):
an unpinned torch in a fresh build environment would pull the several-GB CUDA build.

The native CPU backend (``flare_kernels._C``) is built here by CMake (CMakeLists.txt) against that
torch. Without CMake, a C++ compiler or an importable torch, the install still succeeds: a warning
says so, and CPU tensors run the pure-PyTorch reference. ``FLARE_KERNELS_BUILD_NATIVE=0`` skips it.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class NativeBuildSkipped(Exception):
    pass


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt for each CMakeExtension; a failure warns and drops the
    extension instead of failing the install."""

    def build_extensions(self) -> None:
        built = []
        for ext in self.extensions:
            try:
                self._build_cmake(ext)
                built.append(ext)
            except NativeBuildSkipped as exc:
                self._warn(str(exc))
            except (OSError, subprocess.CalledProcessError) as exc:
                self._warn(f"the CMake build failed ({exc}); see the output above")
        self.extensions = built  # nothing to copy or record for a skipped extension

    def copy_extensions_to_source(self) -> None:
        # Editable installs copy the library into the source tree. Replace it atomically (a new
        # file, then a rename): processes that have the old one loaded keep their mapping instead of
        # reading a file truncated under them.
        if not hasattr(self, "_get_inplace_equivalent"):
            return super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            os.makedirs(os.path.dirname(inplace_file) or ".", exist_ok=True)
            tmp = f"{inplace_file}.{os.getpid()}.tmp"
            shutil.copy2(regular_file, tmp)
            os.replace(tmp, inplace_file)

    @staticmethod
    def _warn(reason: str) -> None:
        bar = "=" * 78
        sys.stderr.write(
            f"\n{bar}\nWARNING: flare-kernels' native CPU backend (flare_kernels._C) was NOT built:\n"
            f"  {reason}\nCPU tensors will run the pure-PyTorch reference (slower). Install CMake >= 3.18 "
            f"and a C++17 compiler,\nthen: pip install --no-build-isolation -e .\n{bar}\n\n"
        )

    def _build_cmake(self, ext: Extension) -> None:
        if os.environ.get("FLARE_KERNELS_BUILD_NATIVE", "1") == "0":
            raise NativeBuildSkipped("FLARE_KERNELS_BUILD_NATIVE=0")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise NativeBuildSkipped("cmake was not found on PATH")
        try:
            import torch
        except ImportError:
            raise NativeBuildSkipped(
                "torch is not importable in the build environment (pip's build isolation?): "
                "install torch first and build with --no-build-isolation"
            ) from None
        out = os.path.abspath(self.get_ext_fullpath(ext.name))
        # One CMake tree per interpreter and torch: editable installs from several environments
        # share the source tree.
        tag = hashlib.sha1(f"{sys.executable}|{torch.__version__}".encode()).hexdigest()[:10]
        tree = os.path.join(ROOT, "build", f"native-{sysconfig.get_platform()}-{tag}")
        configure = [
            cmake, "-S", ROOT, "-B", tree, f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DFLARE_OUTPUT_DIR={os.path.dirname(out)}", "-DCMAKE_BUILD_TYPE=Release",
        ]  # fmt: skip
        if shutil.which("ninja") and not os.path.exists(os.path.join(tree, "CMakeCache.txt")):
            configure += ["-G", "Ninja"]
        subprocess.check_call(configure)
        jobs = str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "--build", tree, "--parallel", jobs])
        if not os.path.exists(out):
            raise NativeBuildSkipped(f"the build did not produce {out}")

TRAIN = [
    "transformers>=4.46",
    "peft>=0.13",
    "accelerate>=1.0",
    "datasets>=3.0",
    "bitsandbytes>=0.45",
    "safetensors>=0.4",
    "tqdm>=4.60",
    "matplotlib>=3.7",  # the run's curves.png (skipped with a log line where it is missing)
]
TEST = ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4"]
BENCH = ["matplotlib>=3.7", "pandas>=2.0"]
# Anchors of the static cost report (python -m benchmarks.static): a pure-Python wheel whose kernel
# files are loaded by path there, never imported (``import gemlite`` needs CUDA); without it the
# report skips those anchors. Pinned below 0.7: the shim fills 0.6's kernel parameters by name.
STATIC = ["gemlite>=0.6,<0.7"]

setup(
    name="flare-kernels",
    version="0.1.0",
    description="Fused Triton kernels for FLARE cross-lingual LoRA fusion over 4-bit NF4 weights",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["flare_kernels", "flare_kernels.*", "flare", "flare.*"]),
    package_data={"flare": ["default/*.jsonl"]},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=1.24",
    ],
    extras_require={"train": TRAIN, "test": TEST + TRAIN, "bench": BENCH + TRAIN, "all": TEST + TRAIN + BENCH + STATIC},
    entry_points={"console_scripts": ["flare=flare.cli:main"]},
    ext_modules=[CMakeExtension("flare_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    license="Apache-2.0",
)
