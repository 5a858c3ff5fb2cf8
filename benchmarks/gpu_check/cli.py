"""``python -m benchmarks.gpu_check``: the commands (run, pack, merge) and the hidden worker entry
points of its child processes (``_warm``, ``_measure``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __doc__ as OVERVIEW
from . import measure, warm
from .budget import BUDGET_S
from .check import run
from .layout import IMAGE, REPO, RESULTS, SITE
from .merge import merge
from .pack import CARRY_DISTS, pack
from .warm import COMPILE_JOBS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=OVERVIEW,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="cmd", metavar="{run,pack,merge}")
    r = sub.add_parser("run", help="the check (on a CUDA GPU), or its plan (--dry-run)")
    r.add_argument("--dry-run", action="store_true", help="plan every phase here and write the folder, no GPU")
    r.add_argument("--out", type=Path, help="root of the folder gpu-check-<device slug> (default benchmarks/results; "
                   "dry run: benchmarks/results/tmp)")  # fmt: skip
    r.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"the whole check's time (default {BUDGET_S:.0f})")
    r.add_argument("--site", type=Path, default=SITE, help="carried packages (pack), appended to sys.path")
    r.add_argument("--static", type=Path, help="static predictions (folder or CSV; default "
                   "benchmarks/results/static-sm90-triton<installed triton>)")  # fmt: skip
    r.add_argument("--resume", action="store_true",
                   help="start from benchmarks/results/<folder>/results.csv (cells measured there are kept)")
    r.add_argument("--test-files", type=lambda s: [x for x in s.split(",") if x],
                   help="comma list of test files (default: every file under tests/ with gpu-marked tests)")
    r.add_argument("--jobs", type=int, default=COMPILE_JOBS, help="compile warm-up processes")
    # The orchestration alone, exercised on a CPU (no kernels compiled; tiny static rows):
    r.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    r.add_argument("--metric", help=argparse.SUPPRESS)
    r.add_argument("--device-name", default=IMAGE["device"], help="dry run: the GPU planned for")
    r.add_argument("--triton-version", help=f"dry run: the GPU's triton (default {IMAGE['triton']})")
    k = sub.add_parser("pack", help="carried packages for the GPU image + the device command line")
    k.add_argument("--dest", type=Path, default=SITE)
    k.add_argument("--dists", type=lambda s: tuple(x for x in s.split(",") if x), default=CARRY_DISTS,
                   help=f"comma list (default {','.join(CARRY_DISTS)})")  # fmt: skip
    k.add_argument("--budget-s", type=float, default=BUDGET_S)
    k.add_argument("--no-tree-size", dest="tree_size", action="store_false", help="skip summing the working tree")
    m = sub.add_parser("merge", help="copy a fetched folder into benchmarks/results and regenerate the tables")
    m.add_argument("folder", type=Path, help="the fetched gpu-check-<slug> folder (or the folder holding it)")
    m.add_argument("--results", type=Path, default=RESULTS)
    m.add_argument("--readme", type=Path, default=REPO / "README.md")
    m.add_argument("--no-plots", action="store_true")
    m.add_argument("--no-summary", action="store_true", help="leave the README alone")
    m.add_argument("--allow-dry-run", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]  # `python -m benchmarks.gpu_check [--dry-run]` is `run`
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_warm":
        return warm.main(argv[1:])
    if argv and argv[0] == "_measure":
        return measure.main(argv[1:])
    args = parse_args(argv)
    args.argv = argv
    return {"run": run, "pack": pack, "merge": merge}[args.cmd](args)
