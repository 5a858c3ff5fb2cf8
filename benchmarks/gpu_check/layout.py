"""Where the GPU check reads and writes, and the GPU image it plans for.

Standard library only: ``--help`` needs no torch.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
TESTS = REPO / "tests"
SITE = REPO / ".gpu_site"
PREFIX = "gpu-check-"

# The files of one run's folder, ``<out>/gpu-check-<device slug>/``.
FILES = {
    "summary": "summary.md",
    "record": "gpu_check.json",
    "junit": "tests.xml",
    "log": "tests.txt",
    "results": "results.csv",
    "environment": "environment.json",
    "compare": "predicted_vs_measured.csv",
}
# What the GPU image has (KINDS.md) and what a dry run plans for.
IMAGE = {"python": "3.12", "torch": "2.11", "triton": "3.6.0", "device": "NVIDIA H100 80GB HBM3"}


def say(msg: str) -> None:
    print(msg, flush=True)


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
