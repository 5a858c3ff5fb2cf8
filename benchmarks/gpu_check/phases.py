"""The compile, bench and predicted phases of a ``Check`` (the tests phase is ``testrun``).

Each gets its ``Phase`` and deadline from ``Check`` (which skips a phase with too little time
left), runs its child process with that deadline and records status, reason and details on the
``Phase``; a dry run records the plan only.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .child import STOP_BEFORE_S, brief, child_command, child_env, run_child, tagged
from .compare import BUDGET_RAN_OUT, compare, write_compare
from .plan import PRESET, bench_plan, compile_plan

if TYPE_CHECKING:
    from .budget import Phase
    from .check import Check


def _tmp_file(kind: str) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu-check-{kind}-{os.getpid()}.json"


def compile_kernels(check: Check, ph: Phase, end: float) -> None:
    t0 = time.time()
    target = None
    if not check.dry:
        import torch

        from flare_kernels.ops.plan import Target

        if not torch.cuda.is_available():  # --allow-cpu: the orchestration alone
            ph.status, ph.reason = "skipped", "no CUDA device: nothing to compile"
            return
        target = Target.of(torch.device("cuda"), interpret=False)
    specs = [s for group in ("tests", "bench", "predicted") for s in check.specs.get(group, [])]
    plan = compile_plan(specs, target, deadline=None if check.dry else end - 20)
    ph.details = {k: v for k, v in plan.items() if k != "tasks"}
    ph.details["warm_calls"] = len(plan["tasks"])
    check.say(f"compile: {plan['kernels']} kernel specializations over {plan['launches']} launches "
              f"({len(plan['tasks'])} calls to warm up)")  # fmt: skip
    if check.dry:
        ph.status, ph.wall_s = "dry-run", round(time.time() - t0, 1)
        return
    plan_file = _tmp_file("plan")
    plan_file.write_text(json.dumps(plan))
    res = run_child(child_command("benchmarks.gpu_check", "_warm", str(plan_file), str(check.args.jobs)),
                    child_env(check.site), stop_at=end - STOP_BEFORE_S)  # fmt: skip
    ph.details["child"] = brief(res)
    ph.wall_s = round(time.time() - t0, 1)
    warm = tagged(res, "WARM")
    ph.status = "truncated" if res["terminated"] or res["killed"] else ("ok" if res["rc"] == 0 else "failed")
    if ph.status == "truncated":
        ph.reason = "deadline reached: the kernels not yet compiled compile on first use in the tests"
    elif res["rc"] != 0:
        ph.reason = f"warm-up exited {res['rc']}: the kernels compile on first use instead"
    if warm:
        ph.details.update(warm)


def _cells_measured(path: Path) -> int:
    """time_ms rows of the op suite in a results.csv (what a killed benchmarks.run could not report)."""
    from ..results import read

    try:
        return sum(1 for r in read(path) if r["metric"] == "time_ms" and r["op"] != "roofline")
    except (OSError, ValueError):
        return 0


def run_bench(check: Check, ph: Phase, end: float) -> None:
    from ..config import PRESETS

    t0 = time.time()
    plan = bench_plan(PRESETS[PRESET])
    ph.details["plan"] = plan
    check.say(f"bench: preset {PRESET}, {plan['cases']} cases, {plan['measurements']} measurements")
    if check.dry:
        ph.status, ph.wall_s = "dry-run", round(time.time() - t0, 1)
        return
    cmd = child_command("benchmarks.run", "--preset", PRESET, "--out", str(check.folder), "--resume",
                        "--skip-e2e", "--no-plots", "--no-readme", "--quiet")  # fmt: skip
    res = run_child(cmd, child_env(check.site), stop_at=end - STOP_BEFORE_S)
    ph.details["child"] = brief(res)
    ph.wall_s = round(time.time() - t0, 1)
    env_path = check.path("environment")
    ops = {}
    if env_path.exists():
        try:
            ops = json.loads(env_path.read_text()).get("ops") or {}
        except ValueError:
            pass
    ph.details["ops"] = {k: ops.get(k) for k in ("measured", "resumed", "failures", "unavailable", "wall_s")}
    ph.details["cells_in_results"] = _cells_measured(check.path("results"))
    if res["terminated"] or res["killed"]:
        ph.status = "truncated"
        ph.reason = ("deadline reached: finished cells kept (rerun with --resume to go on)"
                     + ("; it did not stop on SIGTERM and was killed" if res["killed"] else ""))  # fmt: skip
    else:
        ph.status = "ok" if res["rc"] == 0 else "failed"
        ph.reason = "" if res["rc"] == 0 else f"benchmarks.run exited {res['rc']}"


def _planned_cells(check: Check) -> dict[tuple, str]:
    """Dry run: the cells the bench phase's preset times, by results.cell_key."""
    from ..config import PRESETS
    from ..results import cell_key

    bench = check.phases["bench"].details.get("plan", {}).get("cells", {})
    planned = {}
    for c in PRESETS[PRESET].cases():
        for p in bench.get(str(c), []):
            planned[cell_key(c.op, p, c.mode, c.shape.label, c.r, c.m)] = f"benchmarks.run --preset {PRESET}"
    return planned


def _join(check: Check, rows: list[dict], done: dict, metric: str | None, src: str,
          planned: dict[tuple, str] | None = None) -> None:  # fmt: skip
    """predicted_vs_measured.csv, and its rows for the summary."""
    check.compare_rows = compare(rows, done, metric, src, planned=planned)
    write_compare(check.path("compare"), check.compare_rows)


def unmeasured_predictions(check: Check) -> None:
    """The predicted phase skipped (no time left): every prediction listed, none measured."""
    rows, note, src, metric = check.predictions()
    _join(check, rows, {}, metric, src)


def measure_predicted(check: Check, ph: Phase, end: float) -> None:
    from ..results import measured, read

    t0 = time.time()
    rows, note, src, metric = check.predictions()
    ph.details.update(source=src, metric=metric, note=note, predicted=len(rows))
    check.say(f"predicted: {note}")
    if check.dry:
        _join(check, rows, {}, metric, src, planned=_planned_cells(check))
        ph.status, ph.wall_s = "dry-run", round(time.time() - t0, 1)
        return
    csv_path = check.path("results")
    done = measured(read(csv_path)) if csv_path.exists() else {}
    first = compare(rows, done, metric, src)
    missing = [r for r, c in zip(rows, first) if c["status"].startswith(BUDGET_RAN_OUT)]
    ph.details["missing_after_bench"] = len(missing)
    if missing and end - time.time() > 10:
        cells = _tmp_file("cells")
        cells.write_text(json.dumps(missing))
        res = run_child(child_command("benchmarks.gpu_check", "_measure", str(check.folder), str(cells)),
                        child_env(check.site), stop_at=end - STOP_BEFORE_S)  # fmt: skip
        ph.details["child"] = brief(res)
        ph.details["measure"] = tagged(res, "MEASURE")
        done = measured(read(csv_path)) if csv_path.exists() else {}
    _join(check, rows, done, metric, src)
    left = sum(1 for c in check.compare_rows if c["status"].startswith(BUDGET_RAN_OUT))
    ph.details.update(ok=sum(1 for c in check.compare_rows if c["status"] == "ok"), unmeasured=left)
    ph.wall_s = round(time.time() - t0, 1)
    if not rows:
        ph.status, ph.reason = "skipped", note
    elif left:
        ph.status, ph.reason = "truncated", f"{left} predicted cells not measured before the deadline"
    else:
        ph.status = "ok"
