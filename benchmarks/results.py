"""The one results schema: a CSV row per (op, provider, mode, shape, r, M, metric).

Columns: op, provider, mode, shape, r, M, metric, p50, p20, p80, device, versions, commit.

Metrics (p20/p80 empty where a metric is a single number):
    time_ms        milliseconds per call: median and the 20th / 80th percentiles of the samples
    tflops, gbps   FLOPs and Marlin-counted bytes of the case (counts.py) over the time;
                   p20 / p80 come from the p80 / p20 times (the throughput percentiles)
    roofline_frac  the case's roofline time (counts.roofline_ms with the device's copy and GEMM
                   rates measured in the same run) over the median time: 1.0 is the roofline
    peak_mem_mb    weights held by the provider + the peak extra memory of one call (timing.py)
    ratio_to_ours  provider time / ours time (> 1: ours is faster); p50 = ratio of medians,
                   p20 = provider p20 / ours p80, p80 = provider p80 / ours p20 (a conservative band)
Roofline rows (op ``roofline``): copy_gbps and gemm_tflops of the device. End-to-end rows (op
``e2e_train`` / ``e2e_decode``): tokens_per_s, step_ms, peak_mem_mb; shape names the model.

Rows are appended and flushed one cell at a time, so an interrupted run keeps what it measured
and ``--resume`` carries on from there.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

COLUMNS = ("op", "provider", "mode", "shape", "r", "M", "metric", "p50", "p20", "p80", "device", "versions", "commit")
CSV_NAME = "results.csv"
ENV_NAME = "environment.json"


@dataclass(frozen=True)
class Row:
    op: str
    provider: str
    mode: str
    shape: str
    r: int | str
    M: int | str
    metric: str
    p50: float
    p20: float | None = None
    p80: float | None = None

    def cells(self, device: str, versions: str, commit: str) -> list[str]:
        return [self.op, self.provider, self.mode, self.shape, str(self.r), str(self.M), self.metric,
                _fmt(self.p50), _fmt(self.p20), _fmt(self.p80), device, versions, commit]  # fmt: skip


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.6g}"


class Writer:
    """Appends rows to ``<dir>/results.csv``; a fresh run (``resume=False``) starts the file over."""

    def __init__(self, directory: Path, device: str, versions: str, commit: str, resume: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / CSV_NAME
        self.device, self.versions, self.commit = device, versions, commit
        fresh = not (resume and self.path.exists())
        self._file = open(self.path, "w" if fresh else "a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        if fresh:
            self._csv.writerow(COLUMNS)
            self._file.flush()

    def write(self, rows: Iterable[Row]) -> None:
        for row in rows:
            self._csv.writerow(row.cells(self.device, self.versions, self.commit))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path} does not have the benchmark schema {COLUMNS}, got {reader.fieldnames}")
        return list(reader)


def cell_key(op: str, provider: str, mode: str, shape: str, r, m) -> tuple[str, str, str, str, str, str]:
    return (op, provider, mode, shape, str(r), str(m))


def measured(rows: Iterable[dict[str, str]]) -> dict[tuple, dict[str, str]]:
    """time_ms rows by (op, provider, mode, shape, r, M): what ``--resume`` skips."""
    return {
        cell_key(r["op"], r["provider"], r["mode"], r["shape"], r["r"], r["M"]): r
        for r in rows
        if r["metric"] == "time_ms"
    }
