"""The environment of a run: device, versions, git commit, load; where its results go.

Everything here is queried when called (never at import): the same code runs on a CPU-only machine
and on a GPU machine.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "triton", "bitsandbytes", "peft", "transformers", "flare-kernels")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible to torch {torch.__version__}")
    return dev


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_model()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(dev: torch.device) -> str:
    """Folder name of a device's results: ``nvidia-h200``, ``cpu-xeon-2c``, ..."""
    if dev.type == "cuda":
        return _slug(device_name(dev))
    model = re.sub(r"\((R|TM|tm|r)\)|@.*$|\bCPU\b|\bProcessor\b|\bIntel\b|\bAMD\b|\d+-Core", " ", cpu_model())
    words = _slug(model).split("-")[:3]
    return "-".join(["cpu", *[w for w in words if w], f"{cpu_count()}c"])


def results_dir(dev: torch.device, root: Path | None = None) -> Path:
    return (root or RESULTS) / device_slug(dev)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    out["cuda_runtime"] = torch.version.cuda or "none"
    return out


def versions_field(v: dict[str, str] | None = None) -> str:
    """The CSV's ``versions`` column: the packages that decide the numbers, ``;``-separated."""
    v = v or versions()
    return ";".join(f"{k}={v[k]}" for k in ("torch", "triton", "bitsandbytes", "peft"))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """Short commit of the code measured, ``-dirty`` when tracked code differs from it.

    ``FLARE_BENCH_COMMIT`` overrides it (a copy of the tree without ``.git``, e.g. a GPU machine).
    Changes under benchmarks/results/ (the results themselves) do not make it dirty.
    """
    if os.environ.get("FLARE_BENCH_COMMIT"):
        return os.environ["FLARE_BENCH_COMMIT"]
    head = _git("rev-parse", "--short=12", "HEAD")
    if head is None:
        return "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no") or ""
    dirty = [line for line in status.splitlines() if "benchmarks/results/" not in line]
    return head + ("-dirty" if dirty else "")


def gpu_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def memory_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(dev: torch.device) -> dict:
    """The JSON record of where and with what a run measured."""
    env = {
        "device": device_name(dev),
        "device_type": dev.type,
        "device_slug": device_slug(dev),
        "cpu": cpu_model(),
        "cpu_cores": cpu_count(),
        "memory_gib": memory_total_gib(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "commit": git_commit(),
        "platform": platform.platform(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(
            driver=gpu_driver(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            l2_cache_mb=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            capability=f"{props.major}.{props.minor}",
        )
    return env


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
