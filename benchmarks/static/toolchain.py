"""The Triton versions the kernels are compiled with, and where each one's tools live.

Two toolchains matter: the Triton installed in this environment, and the one on the GPU image the
project is measured on (``PINNED_VERSION``). The pinned one is installed on demand, wheel only,
into its own folder (``<cache>/triton-<version>``) and put first on ``PYTHONPATH`` of a
subprocess; torch and everything else still come from this environment. Two Tritons cannot share
one process, so every compile runs in a subprocess (``compile.py``), whichever the version.

The cache folder is ``$FLARE_KERNELS_CACHE``, else ``~/.cache/flare-kernels``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# The Triton of the GPU image this project is measured on (Python 3.12 there; the wheel installed
# here matches this interpreter, and the compiler itself does not depend on Python's version).
PINNED_VERSION = "3.6.0"

# Compile targets (compute capability x 10). Both 3.6 and 3.9 ship ptxas builds that know all
# three: 3.6 with CUDA 12.8 (ptxas) and 12.9 (ptxas-blackwell), 3.9 with 12.9 and 13.4.
ARCH_NAMES = {80: "A100 (sm_80)", 90: "H100/H200 (sm_90a)", 100: "B200 (sm_100a)"}
ARCHS = tuple(ARCH_NAMES)
# The most shared memory one program may use (the opt-in limit per block): A100 163 KiB, H100/H200
# and B200 227 KiB. Triton compiles past it without complaint; the launch then fails with
# OutOfResources, so it is checked on the compiled kernels' metadata.
MAX_SHARED_BYTES = {80: 166912, 90: 232448, 100: 232448}


class ToolchainError(RuntimeError):
    """A toolchain could not be set up (pip failed, no Triton installed)."""


def cache_dir() -> Path:
    """``$FLARE_KERNELS_CACHE`` or ``~/.cache/flare-kernels`` (created)."""
    path = Path(os.environ.get("FLARE_KERNELS_CACHE") or Path.home() / ".cache" / "flare-kernels")
    path.mkdir(parents=True, exist_ok=True)
    return path


def installed_version() -> str:
    """The version of the Triton installed in this environment (without importing it)."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        raise ToolchainError("no triton installed in this environment") from None


@dataclass(frozen=True)
class Toolchain:
    """One Triton version: ``site`` is the folder that holds its ``triton`` package when it is not
    the installed one (None: the installed one)."""

    version: str
    site: Path | None = None

    @property
    def package_dir(self) -> Path:
        """The ``triton`` package folder."""
        if self.site is not None:
            return self.site / "triton"
        spec = importlib.util.find_spec("triton")  # finds, does not import
        if spec is None or not spec.submodule_search_locations:
            raise ToolchainError("no triton installed in this environment")
        return Path(list(spec.submodule_search_locations)[0])

    @property
    def bin_dir(self) -> Path:
        return self.package_dir / "backends" / "nvidia" / "bin"

    @property
    def cuobjdump(self) -> Path:
        return self.bin_dir / "cuobjdump"

    @property
    def nvdisasm(self) -> Path:
        return self.bin_dir / "nvdisasm"

    @property
    def archs(self) -> tuple[int, ...]:
        return ARCHS

    def ptxas(self, arch: int) -> Path:
        """The ptxas this Triton itself runs for ``arch``: its ``get_ptxas`` decides (3.6 uses
        ``ptxas`` below sm_100; 3.9 uses ``ptxas-blackwell`` from sm_90 on)."""
        return Path(_ptxas_path(self, arch))

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a Python subprocess that imports this Triton first.

        ``TRITON_INTERPRET`` is removed (the tests set it; under it ``@triton.jit`` makes
        interpreter objects that cannot be compiled).
        """
        env = dict(os.environ if base is None else base)
        env.pop("TRITON_INTERPRET", None)
        if self.site is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.site), env.get("PYTHONPATH", "")) if p)
        return env

    def command(self, *args: str) -> list[str]:
        """``[python, *args]``: this environment's interpreter (run it with ``env()``)."""
        return [sys.executable, *args]

    def run_python(self, code: str, timeout: float = 120) -> str:
        """Run ``python -c code`` under this toolchain; its stdout (raises on failure)."""
        proc = subprocess.run(
            self.command("-c", code), env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ToolchainError(f"python under triton {self.version} failed: {last}")
        return proc.stdout


@functools.lru_cache(maxsize=None)
def _ptxas_path(chain: Toolchain, arch: int) -> str:
    code = f"from triton.backends.nvidia.compiler import get_ptxas; print(get_ptxas({arch}).path)"
    return chain.run_python(code).strip().splitlines()[-1]


def toolchain(version: str | None = None) -> Toolchain:
    """The toolchain for ``version`` (None or the installed version: the installed Triton;
    anything else is installed into the cache on first use)."""
    installed = installed_version()
    if version is None or version == installed:
        return Toolchain(installed)
    return Toolchain(version, install(version))


def install(version: str) -> Path:
    """Install ``triton==version`` (no dependencies) into ``<cache>/triton-<version>``, once.

    Atomic: pip installs into a temporary folder that is renamed when complete, so an interrupted
    install never looks finished. Raises ``ToolchainError`` with pip's last line on failure.
    """
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", version):
        raise ToolchainError(f"not a triton version: {version!r}")
    dest = cache_dir() / f"triton-{version}"
    if _installed_at(dest) == version:
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
        "--no-deps", "--target", str(tmp), f"triton=={version}",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ToolchainError(f"pip install triton=={version} failed: {e}") from None
    if proc.returncode or _installed_at(tmp) != version:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise ToolchainError(f"pip install --target {dest} triton=={version} failed: {why}")
    if dest.exists():  # a leftover or a concurrent install: replace it
        shutil.rmtree(dest, ignore_errors=True)
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _installed_at(dest) != version:
            raise
    return dest


def _installed_at(site: Path) -> str | None:
    """The version of the triton package in ``site`` (read from its files, not imported)."""
    init = site / "triton" / "__init__.py"
    if not init.is_file():
        return None
    match = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", init.read_text(), re.M)
    return match.group(1) if match else None
