"""The static cost report (issue 11): compile every launch ahead of time, read its SASS, predict.

    python -m benchmarks.static                       # sm_90, the installed Triton and the pinned 3.6.0
    python -m benchmarks.static --triton installed    # one version
    python -m benchmarks.static --arch 90 --tokens 1,16,4096 --no-anchors

Writes ``benchmarks/results/static-sm<arch>-triton<version>/`` (results.csv in the benchmark
schema, environment.json, static_<op>.png). Needs no GPU. See benchmarks/README.md, "Static cost
report", for what the metrics and the prediction mean.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..env import RESULTS
from .report import SHAPE_NAMES, TOKENS, run
from .toolchain import PINNED_VERSION, installed_version


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--arch", type=_ints, default=[90], help="compute capabilities x 10, comma list (default 90)")
    p.add_argument("--triton", default="both",
                   help=f"installed | {PINNED_VERSION} | both (default) | any version pip can install")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS, help="results root (default benchmarks/results)")
    p.add_argument("--tokens", type=_ints, default=list(TOKENS), help="M values (default 1,16,64,512,4096)")
    p.add_argument("--shapes", default=",".join(SHAPE_NAMES), help="shape names of benchmarks/config.py")
    p.add_argument("--jobs", type=int, default=2, help="parallel compiles (default 2)")
    p.add_argument("--no-anchors", action="store_true", help="skip GemLite and bitsandbytes")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.triton == "both":
        versions = [None, PINNED_VERSION] if installed_version() != PINNED_VERSION else [None]
    elif args.triton == "installed":
        versions = [None]
    else:
        versions = [args.triton]
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    folders = run(args.arch, versions, args.out, [s for s in args.shapes.split(",") if s], args.tokens, args.jobs,
                  not args.no_anchors, not args.no_plots, log)  # fmt: skip
    log("wrote " + ", ".join(str(f) for f in folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
