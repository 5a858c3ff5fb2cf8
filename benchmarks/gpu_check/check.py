"""One ``run``: the environment, the phases in budget order, the record and the summary.

``run`` writes ``<out>/gpu-check-<device slug>/``; a dry run plans every phase on this machine and
writes the folder as a real run would (without tests.xml, results.csv, environment.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

from . import phases, testrun
from .budget import SHARES, Budget, Phase
from .compare import load_predictions, measurable, predicted_metric, static_dir, write_compare
from .layout import FILES, IMAGE, PREFIX, RESULTS, rel, say
from .plan import PRESET, import_gpu_cases, spec_of_bench_case, spec_of_test_case
from .summary import render_summary

# The phases given a share of the budget (they run in SHARES' order): what runs it, the least time
# it starts with (with less it is skipped), and what is written instead when it is skipped.
PHASES: dict[str, tuple[Callable, float, Callable | None]] = {
    "compile": (phases.compile_kernels, 20, None),
    "tests": (testrun.run_tests, 40, None),
    "bench": (phases.run_bench, 30, None),
    "predicted": (phases.measure_predicted, 5, phases.unmeasured_predictions),
}


def _now() -> str:
    # Not benchmarks.env.now: that module imports torch (seconds), and the start is stamped before.
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _set_aside(folder: Path) -> None:
    old = [folder / n for n in FILES.values() if (folder / n).exists()]
    if old:
        keep = folder / "tmp" / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        keep.mkdir(parents=True, exist_ok=True)
        for p in old:
            p.replace(keep / p.name)


class Check:
    """One ``run``: the phases, their record, the folder."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry = args.dry_run
        self.t0 = time.time()
        # A dry run plans on a virtual clock on which every phase uses all of its share: the
        # budgets and deadlines it records are those of a run where nothing ends early.
        self._virtual_now = self.t0
        self.budget = Budget(args.budget_s, clock=(lambda: self._virtual_now) if self.dry else time.time)
        self.phases: dict[str, Phase] = {n: Phase(n) for n in ("environment", *SHARES, "summary")}
        self.record: dict = {"dry_run": self.dry, "budget_s": args.budget_s, "shares": SHARES,
                             "command": " ".join(["python -m benchmarks.gpu_check", *getattr(args, "argv", [])]),
                             "started": _now()}  # fmt: skip
        self.site = args.site if args.site and args.site.is_dir() else None
        self.folder: Path | None = None
        self.device_name = ""
        self.specs: dict[str, list] = {}
        self.compare_rows: list[dict] = []
        self.collector: testrun.Collector | None = None

    # ---- helpers
    def say(self, msg: str) -> None:
        say(f"{self.budget.stamp()} {msg}")

    def path(self, key: str) -> Path:
        return self.folder / FILES[key]

    def begin(self, name: str, min_s: float = 5.0) -> tuple[Phase, float] | None:
        ph = self.phases[name]
        now = self.budget.clock()
        end = self.budget.phase_end(name) if name in SHARES else self.budget.end
        ph.budget_s = round(end - now, 1)
        if not self.dry and ph.budget_s < min_s:
            ph.status, ph.reason = "skipped", f"{ph.budget_s:.0f} s left for it, under the {min_s:.0f} s it needs"
            self.say(f"{name}: skipped ({ph.reason})")
            return None
        self.say(f"{name}: {'planning' if self.dry else 'start'} (budget {ph.budget_s:.0f} s)")
        if self.dry:
            self._virtual_now = end
        return ph, end

    def predictions(self) -> tuple[list[dict], str, str, str | None]:
        metric = self.args.metric or predicted_metric(self.device_name)
        src = self.args.static or static_dir(self.record["environment"]["triton"])
        rows, note = load_predictions(src, metric)
        return rows, note, rel(src), metric

    # ---- before the phases
    def environment(self) -> None:
        ph = self.phases["environment"]
        t0 = time.time()
        import torch  # noqa: F401  (here, not at import: --help needs no torch)

        from .. import env as envmod

        if self.dry:
            self.device_name = self.args.device_name
            slug = envmod._slug(self.device_name)
            env = {"device": self.device_name, "device_slug": slug, "planned_on": envmod.cpu_model(),
                   "versions_here": envmod.versions(), "image": IMAGE, "commit": envmod.git_commit()}  # fmt: skip
            root = self.args.out or RESULTS / "tmp"
        else:
            if not torch.cuda.is_available() and not self.args.allow_cpu:
                raise SystemExit("gpu_check run: no CUDA device visible to torch; use --dry-run to plan here")
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            env = envmod.environment(dev)
            self.device_name = env["device"]
            slug = env["device_slug"]
            root = self.args.out or RESULTS
        self.folder = root / f"{PREFIX}{slug}"
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.args.resume and not self.dry:
            prev = RESULTS / self.folder.name
            for name in (FILES["results"], FILES["environment"]):
                if (prev / name).exists() and prev.resolve() != self.folder.resolve():
                    shutil.copy2(prev / name, self.folder / name)
        elif not self.args.resume:
            _set_aside(self.folder)
        env["site"] = str(self.site) if self.site else None
        env["triton"] = self._triton_version()
        self.record["environment"] = env
        ph.status, ph.wall_s = "dry-run" if self.dry else "ok", round(time.time() - t0, 1)
        self.say(f"environment: {self.device_name} -> {rel(self.folder)}")

    def _triton_version(self) -> str:
        if self.dry:
            return self.args.triton_version or IMAGE["triton"]
        import importlib.metadata

        return importlib.metadata.version("triton")

    def plan_specs(self) -> None:
        """The calls the check makes with our kernels: tests, the preset's ``ours``, predicted cells."""
        from ..config import PRESETS

        t0 = time.time()
        groups = {
            "tests": lambda: [spec_of_test_case(c) for _, c in import_gpu_cases()],
            "bench": lambda: [spec_of_bench_case(c) for c in PRESETS[PRESET].cases()],
            "predicted": lambda: [spec for row in self.predictions()[0]
                                  if not isinstance(got := measurable(row), str)
                                  and (spec := spec_of_bench_case(*got)) is not None],
        }  # fmt: skip
        for name, make in groups.items():
            try:
                self.specs[name] = make()
            except Exception as exc:  # the warm-up then covers less; the phases themselves still run
                self.specs[name] = []
                self.record.setdefault("spec_errors", []).append(f"{name}: {type(exc).__name__}: {exc}")
        self.record["specs"] = {k: len(v) for k, v in self.specs.items()}
        self.record["spec_planning_s"] = round(time.time() - t0, 1)

    # ---- the folder
    def finish(self) -> None:
        ph = self.phases["summary"]
        self.record["finished"] = _now()
        self.record["wall_s"] = round(time.time() - self.t0, 1)
        if self.dry:
            self.record["planned_end_s"] = round(self.budget.elapsed(), 1)
        self.record["phases"] = [dataclasses.asdict(p) for p in self.phases.values()]
        ph.status = "dry-run" if self.dry else "ok"
        self.record["phases"][-1] = dataclasses.asdict(ph)
        self.path("record").write_text(json.dumps(self.record, indent=2, default=str) + "\n")
        self.path("summary").write_text(render_summary(self.record, self.folder, self.compare_rows), encoding="utf-8")
        self.say(f"summary: {rel(self.path('summary'))}")
        print(self.path("summary").read_text(), flush=True)


def run(args: argparse.Namespace) -> int:
    """The ``run`` command: SIGTERM (``timeout``) stops it like Ctrl-C, the folder still written."""
    check = Check(args)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        return _run_phases(check)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_phases(check: Check) -> int:
    check.environment()
    try:
        if check.dry:
            check.collector = testrun.Collector(check.args.test_files, check.path("log"))
        check.plan_specs()
        for name in SHARES:  # compile, tests, bench, predicted
            run_phase, min_s, if_skipped = PHASES[name]
            try:
                got = check.begin(name, min_s)
                if got is not None:
                    run_phase(check, *got)
                elif if_skipped is not None:
                    if_skipped(check)
            except Exception as exc:  # a bug in one phase must not cost the others their time
                import traceback

                ph = check.phases[name]
                ph.status, ph.reason = "failed", f"{type(exc).__name__}: {exc}"
                ph.details["traceback"] = traceback.format_exc().splitlines()[-12:]
                check.say(f"{name}: FAILED {ph.reason}")
    except KeyboardInterrupt as exc:
        for ph in check.phases.values():
            if ph.status == "pending":
                ph.status, ph.reason = "interrupted", f"stopped ({exc or 'Ctrl-C'})"
    finally:
        if check.folder is not None:
            if not check.path("compare").exists():
                write_compare(check.path("compare"), check.compare_rows)
            check.finish()
    failed = [p.name for p in check.phases.values() if p.status == "failed"]
    tests = check.phases["tests"].details
    return 1 if failed or tests.get("failed") or tests.get("errors") else 0
