"""Predicted against measured: the static report's predictions for this device
(``benchmarks/static``), the benchmark cell each one names, and the join with the measured times
(``predicted_vs_measured.csv``)."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from .layout import RESULTS, rel

COMPARE_COLUMNS = ("op", "provider", "mode", "shape", "r", "M", "device", "predicted_metric", "predicted_us",
                   "measured_provider", "measured_us", "measured_p20_us", "measured_p80_us",
                   "measured_over_predicted", "measured_by", "status", "static_source")  # fmt: skip
BUDGET_RAN_OUT = "not measured: the time budget ran out first"  # the status of a cell not timed in time


def static_dir(triton_version: str, root: Path = RESULTS) -> Path:
    return root / f"static-sm90-triton{triton_version}"


def predicted_metric(device_name: str) -> str | None:
    """The static report's metric for this GPU: predicted_us_h100 / predicted_us_h200 (by name)."""
    name = device_name.upper()
    for chip in ("H200", "H100"):
        if chip in name:
            return f"predicted_us_{chip.lower()}"
    return None


def load_predictions(path: Path, metric: str | None) -> tuple[list[dict], str]:
    """(rows of ``metric``, a note). Missing file, other schema or metric: no rows and why."""
    from ..results import read

    csv_path = path / "results.csv" if path.is_dir() else path
    if not csv_path.exists():
        return [], f"no static predictions at {rel(csv_path)} (python -m benchmarks.static writes them)"
    try:
        rows = read(csv_path)
    except (ValueError, OSError) as exc:
        return [], f"{rel(csv_path)} unreadable: {exc}"
    if metric is None:
        return [], "the device is neither an H100 nor an H200: no prediction applies"
    got = [r for r in rows if r["metric"] == metric and r["p50"] not in ("", None)]
    if not got:
        metrics = sorted({r["metric"] for r in rows})
        return [], f"{rel(csv_path)} has no {metric} rows (metrics: {', '.join(metrics[:8])})"
    return got, f"{len(got)} {metric} rows from {rel(csv_path)}"


def measurable(row: dict) -> tuple[Any, str] | str:
    """(benchmarks.config.Case, provider to time) for a predicted row, or why it cannot be timed."""
    from ..config import MODES, OPS, SHAPES, Case, Shape

    if row["op"] not in OPS:
        return f"op {row['op']!r} is not a benchmark op ({', '.join(OPS)})"
    if row["mode"] not in MODES:
        return f"mode {row['mode']!r} is not one of {', '.join(MODES)}"
    m = re.fullmatch(r"(.+):(\d+)x(\d+)", row["shape"])
    if not m:
        return f"shape {row['shape']!r} is not name:NxK"
    name, n, k = m.group(1), int(m.group(2)), int(m.group(3))
    known = SHAPES.get(name)
    shape = known if known and (known.n, known.k) == (n, k) else Shape(name, n, k, flare=True)
    try:
        case = Case(row["op"], shape, int(row["r"]), int(row["M"]), row["mode"])
    except ValueError:
        return f"r {row['r']!r} or M {row['M']!r} is not an integer"
    from ..providers import provider_names

    return case, row["provider"] if row["provider"] in provider_names() else "ours"


def compare(predicted: list[dict], measured: dict, metric: str | None, source: str, *,
            planned: dict[tuple, str] | None = None) -> list[dict]:  # fmt: skip
    """predicted_vs_measured rows. ``measured``: time_ms rows by results.cell_key; ``planned`` (dry
    run): key -> what would measure it."""
    from ..results import cell_key

    out = []
    for row in predicted:
        got = measurable(row)
        rec = {c: "" for c in COMPARE_COLUMNS}
        rec.update({k: row[k] for k in ("op", "provider", "mode", "shape", "r", "M")})
        rec.update(device=row.get("device", ""), predicted_metric=metric or "", static_source=source)
        pred_us = float(row["p50"])
        rec["predicted_us"] = f"{pred_us:.6g}"
        if isinstance(got, str):
            rec["status"] = f"not measured: {got}"
            out.append(rec)
            continue
        case, provider = got
        rec["measured_provider"] = provider
        key = cell_key(case.op, provider, case.mode, case.shape.label, case.r, case.m)
        hit = measured.get(key)
        if planned is not None:
            rec["measured_by"] = planned.get(key, "gpu_check (cells the preset lacks)")
            rec["status"] = "dry-run: not measured"
        elif hit is None:
            rec["status"] = f"{BUDGET_RAN_OUT} (see gpu_check.json)"
        else:
            us = [float(hit[c]) * 1e3 if hit[c] else None for c in ("p50", "p20", "p80")]
            rec.update(measured_us=f"{us[0]:.6g}", measured_p20_us=f"{us[1]:.6g}" if us[1] else "",
                       measured_p80_us=f"{us[2]:.6g}" if us[2] else "",
                       measured_over_predicted=f"{us[0] / pred_us:.4g}" if pred_us > 0 else "",
                       measured_by="results.csv", status="ok")  # fmt: skip
        out.append(rec)
    return out


def write_compare(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COMPARE_COLUMNS)
        w.writeheader()
        w.writerows(rows)
