"""The predicted phase's child (``python -m benchmarks.gpu_check _measure FOLDER CELLS.json``): the
predicted cells benchmarks.run's preset did not cover, timed with the same providers and timers and
appended to the folder's results.csv."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from .compare import measurable


@dataclasses.dataclass(frozen=True)
class Cells:
    """A preset made of given cases (the predicted cells benchmarks.run's preset did not cover)."""

    name: str
    cells: tuple
    provider_for: tuple  # ((case key, provider), ...)

    def cases(self) -> list:
        return list(self.cells)

    def runs(self, provider: str, case) -> bool:
        return (case.key, provider) in self.provider_for


def main(argv: list[str]) -> int:
    """``_measure FOLDER CELLS.json``: time cells, append to results.csv."""
    import torch

    from .. import env as envmod
    from .. import ops as opsmod
    from ..results import Writer, measured, read
    from ..roofline import Roofline
    from ..run import _stop_on_sigterm, timer_config

    folder, cells = Path(argv[0]), json.loads(Path(argv[1]).read_text())
    _stop_on_sigterm()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the tests' toy cells
    pairs = []
    for row in cells:
        got = measurable(row)
        if not isinstance(got, str):
            pairs.append(got)
    csv_path = folder / "results.csv"
    rows = read(csv_path) if csv_path.exists() else []
    roof_rates = {r["metric"]: float(r["p50"]) for r in rows if r["op"] == "roofline" and r["p50"]}
    roof = None
    if {"copy_gbps", "gemm_tflops"} <= roof_rates.keys():
        roof = Roofline(roof_rates["copy_gbps"], roof_rates["gemm_tflops"], 0, 0, None, None)
    preset = Cells("predicted", tuple(dict.fromkeys(c for c, _ in pairs)),
                   tuple((c.key, p) for c, p in pairs))  # fmt: skip
    env = envmod.environment(dev)
    report = opsmod.OpsReport()
    t0 = time.time()
    try:
        versions = envmod.versions_field(env["versions"])
        cfg = timer_config(argparse.Namespace(rep_ms=None, cpu_budget_s=None))
        with Writer(folder, env["device_slug"], versions, env["commit"], resume=True) as w:
            opsmod.run_ops(preset, dev, w, roof, cfg, providers=sorted({p for _, p in pairs}), done=measured(rows),
                           progress=False, report=report)  # fmt: skip
    except KeyboardInterrupt:
        print("measure: stopped at the deadline; every finished cell is in results.csv", flush=True)
    report.wall_s = round(time.time() - t0, 1)
    print("MEASURE " + json.dumps(report.as_dict()), flush=True)
    return 0
