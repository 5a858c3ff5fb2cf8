"""The tests phase: ``pytest -m gpu`` over the gpu test files, no test starting after its deadline
(conftest's ``FLARE_GPU_CHECK_DEADLINE``), counted from the junit file (or, when pytest was
killed, from its verbose log). A dry run collects them only."""

from __future__ import annotations

import re
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

from .budget import BUDGET_SKIP_REASON, DEADLINE_ENV
from .child import STOP_BEFORE_S, brief, child_command, child_env, run_child
from .layout import rel
from .plan import gpu_test_files

if TYPE_CHECKING:
    from .budget import Phase
    from .check import Check

TEST_TAIL_S = 30.0  # no test starts later than this before the tests' deadline (the largest take ~10 s)


def pytest_args(test_files: list[str] | None) -> tuple[list[str], list[str]]:
    files = test_files or [rel(p) for p in gpu_test_files()]
    # A file that fails to import (e.g. a package the image lacks) must not cancel the others.
    # The gpu tests use neither hypothesis nor pytest-benchmark: without their plugins pytest
    # starts in a fraction of the time (6 s -> 0.1 s of collection on this 2-core machine).
    plugins = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:benchmark", "-p", "no:anyio"]
    return files, ["-m", "gpu", *plugins, "--continue-on-collection-errors", *files]


class Collector:
    """Dry run: ``pytest --collect-only`` in the background, while the kernels are planned."""

    def __init__(self, test_files: list[str] | None, log: Path):
        cmd = child_command("pytest", "--collect-only", "-q", *pytest_args(test_files)[1])
        self.result: dict = {}

        def collect():
            self.result.update(run_child(cmd, child_env(None), stop_at=time.time() + 300, log=log,
                                         prefix="  collect: "))  # fmt: skip

        self.thread = threading.Thread(target=collect, daemon=True)
        self.thread.start()

    def join(self) -> dict:
        self.thread.join()
        return self.result


def run_tests(check: Check, ph: Phase, end: float) -> None:
    t0 = time.time()
    files, common = pytest_args(check.args.test_files)
    ph.details["files"] = files
    if check.dry:
        if check.collector is None:
            check.collector = Collector(check.args.test_files, check.path("log"))
        res = check.collector.join()
        ids = [ln.strip() for ln in check.path("log").read_text().splitlines() if "::" in ln]
        ph.details.update(collected=len(ids), collect_rc=res["rc"])
        ph.status = "dry-run" if res["rc"] == 0 and ids else "failed"
        ph.reason = "" if ph.status == "dry-run" else f"collection exited {res['rc']} with {len(ids)} tests"
        with open(check.path("log"), "a", encoding="utf-8") as f:
            f.write(f"\n# dry run: {len(ids)} gpu tests would run (pytest -m gpu {' '.join(files)}), "
                    f"no new test starting after {end - TEST_TAIL_S - check.budget.start:.0f} s of the budget\n")
        ph.wall_s = round(time.time() - t0, 1)
        return
    stop_starting = end - TEST_TAIL_S
    res = run_child(child_command("pytest", "-v", "-rfEs", "--tb=short", "--durations=15",
                                  f"--junitxml={check.path('junit')}", *common),
                    child_env(check.site, {DEADLINE_ENV: f"{stop_starting:.0f}"}),
                    stop_at=end - STOP_BEFORE_S, log=check.path("log"))  # fmt: skip
    counts = junit_counts(check.path("junit"))
    if not check.path("junit").exists():  # pytest was killed: count from its verbose log
        counts = log_counts(check.path("log"))
    ph.details.update(child=brief(res), **counts)
    ph.wall_s = round(time.time() - t0, 1)
    if res["terminated"] or res["killed"]:
        ph.status = "truncated"
        ph.reason = "a test ran past the deadline and pytest was stopped; tests.txt has the log"
    elif counts["skipped_budget"]:
        ph.status, ph.reason = "truncated", f"{counts['skipped_budget']} tests not started: time budget spent"
    elif res["rc"] in (0, 1):
        ph.status = "ok"
    else:
        ph.status, ph.reason = "failed", f"pytest exited {res['rc']}"


def junit_counts(path: Path) -> dict:
    """Counts from a junit file, budget skips apart, and the failures' first lines."""
    out = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "skipped_budget": 0, "failures": []}
    if not path.exists():
        return out
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        out["failures"].append(f"{path.name} unreadable: {exc}")
        return out
    for tc in root.iter("testcase"):
        out["tests"] += 1
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        fail, err, skip = tc.find("failure"), tc.find("error"), tc.find("skipped")
        if fail is not None or err is not None:
            node = fail if fail is not None else err
            out["failed" if fail is not None else "errors"] += 1
            msg = (node.get("message") or node.text or "").strip().splitlines()
            out["failures"].append(f"{name}: {msg[0][:300] if msg else '?'}")
        elif skip is not None:
            if BUDGET_SKIP_REASON in (skip.get("message") or ""):
                out["skipped_budget"] += 1
            else:
                out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def log_counts(path: Path) -> dict:
    """Counts from ``pytest -v`` output (``<node id> PASSED [ 10%]``), for a run killed before its junit."""
    out = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "skipped_budget": 0, "failures": [],
           "from": "tests.txt (no junit: pytest was stopped)"}  # fmt: skip
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = re.match(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)\b", line)
        if not m:
            continue
        out["tests"] += 1
        key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}[m.group(2)]
        out[key] += 1
        if key in ("failed", "errors"):
            out["failures"].append(f"{m.group(1)}: {m.group(2)} (see tests.txt)")
    return out
