"""The one command: ``python -m benchmarks.run`` (``make bench``).

Default: the ``cpu`` preset on a machine without a GPU (about 10 minutes on 2 cores), the ``gpu``
preset on CUDA; ``--full`` runs the whole grid of issue 4 (several GPU commands: add ``--resume``
and split it with ``--shapes``). Writes ``benchmarks/results/<device>/``: results.csv (the schema
in results.py), environment.json, PNG plots; then regenerates the README's benchmark table.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from . import env as envmod
from .config import MODES, OPS, PRESETS, SHAPES, Preset
from .results import ENV_NAME, Writer, measured, read
from .timing import CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, GRAPH_MAX_M, TimerConfig, prepare_cpu_memory_measurement


def _csv_list(text: str | None, cast=str):
    return None if not text else tuple(cast(x.strip()) for x in text.split(",") if x.strip())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--preset", choices=sorted(PRESETS), help="grid to run (default: cpu on a CPU, gpu on CUDA)")
    p.add_argument("--full", action="store_true", help="the whole grid (same as --preset full)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<device slug>)")
    p.add_argument("--resume", action="store_true", help="append to an existing results.csv, skipping measured cells")
    p.add_argument("--shapes", help=f"comma list from {', '.join(SHAPES)}")
    p.add_argument("--ranks", help="comma list of LoRA ranks")
    p.add_argument("--tokens", help="comma list of M (tokens per stream)")
    p.add_argument("--modes", help=f"comma list from {', '.join(MODES)}")
    p.add_argument("--ops", help=f"comma list from {', '.join(OPS)}")
    p.add_argument("--providers", help="comma list of provider names (default: all available)")
    p.add_argument("--skip-ops", action="store_true", help="no op benchmarks")
    p.add_argument("--skip-e2e", action="store_true", help="no end-to-end benchmark")
    p.add_argument("--e2e-size", help="end-to-end model size (gpu, cpu, tiny; default from the preset)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1 on a CPU: see benchmarks/README.md; 0 = torch's default)")
    p.add_argument("--rep-ms", type=float, default=None, help="CUDA: measuring time per cell and provider")
    p.add_argument("--cpu-budget-s", type=float, default=None, help="CPU: sampling time per cell and provider")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="print tracebacks of failing providers")
    return p.parse_args(argv)


def build_preset(args: argparse.Namespace, dev: torch.device) -> Preset:
    name = "full" if args.full else args.preset or ("gpu" if dev.type == "cuda" else "cpu")
    base = PRESETS[name]
    fields = dict(
        shapes=_csv_list(args.shapes) or base.shapes,
        ranks=_csv_list(args.ranks, int) or base.ranks,
        tokens=_csv_list(args.tokens, int) or base.tokens,
        modes=_csv_list(args.modes) or base.modes,
        ops=_csv_list(args.ops) or base.ops,
    )
    for s in fields["shapes"]:
        if isinstance(s, str) and s not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    for m in fields["modes"]:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    for o in fields["ops"]:
        if o not in OPS:
            raise SystemExit(f"--ops: unknown op {o!r}; choose from {', '.join(OPS)}")
    return Preset(name, provider_modes=base.provider_modes, provider_tokens=base.provider_tokens, e2e=base.e2e,
                  **fields)  # fmt: skip


def timer_config(args: argparse.Namespace) -> TimerConfig:
    cfg = TimerConfig()
    kw = {}
    if args.rep_ms:
        kw["rep_ms"] = args.rep_ms
    if args.cpu_budget_s:
        kw["cpu_budget_s"] = args.cpu_budget_s
    return TimerConfig(**{**cfg.__dict__, **kw})


def _native_isa() -> str | None:
    """The instruction set of flare_kernels' native CPU backend, when it is built."""
    try:
        from flare_kernels import native

        return native.isa() if native.available() else None
    except Exception:
        return None


def _set_aside(out: Path) -> None:
    """A fresh run starts results.csv over: keep the previous files under tmp/ (git-ignored)."""
    old = [out / n for n in ("results.csv", ENV_NAME) if (out / n).exists()]
    if not old:
        return
    keep = out / "tmp" / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    keep.mkdir(parents=True, exist_ok=True)
    for path in old:
        path.replace(keep / path.name)


def _previous_runs(out: Path, resume: bool) -> list[dict]:
    path = out / ENV_NAME
    if not (resume and path.exists()):
        return []
    try:
        return json.loads(path.read_text()).get("runs", [])
    except (OSError, ValueError):
        return []


def _write_env(out: Path, record: dict, history: list[dict]) -> None:
    """environment.json: this run's record; ``runs`` lists every invocation that wrote results.csv."""
    keys = ("started", "finished", "status", "command", "preset", "commit", "wall_s", "load_average_start",
            "load_average_end", "torch_threads")  # fmt: skip
    runs = [*history, {k: record.get(k) for k in keys}]
    (out / ENV_NAME).write_text(json.dumps({**record, "runs": runs}, indent=2, default=str) + "\n")


def _stop_on_sigterm() -> None:
    """``timeout`` and job schedulers send SIGTERM: stop like Ctrl-C, so the files are completed."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test harness thread)
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = envmod.pick_device(args.device)
    if dev.type == "cpu":
        threads = 1 if args.threads is None else args.threads
        if threads > 0:
            torch.set_num_threads(threads)
        prepare_cpu_memory_measurement()  # before anything is allocated (glibc thresholds)
    preset = build_preset(args, dev)
    cfg = timer_config(args)
    out = args.out or envmod.results_dir(dev)
    if args.out is None and preset.name == "smoke":  # a harness check must not replace real results
        out = out / "tmp" / "smoke"
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        _set_aside(out)
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    # bitsandbytes logs a warning at import on CPUs when the optional `kernels` package is absent.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    t_start = time.time()
    load_start = envmod.load_average()
    env = envmod.environment(dev)
    versions = envmod.versions_field(env["versions"])
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"benchmarks: preset {preset.name} on {env['device']} ({env['device_slug']}), load {load_start}, -> {out}")

    done = {}
    if args.resume and (out / "results.csv").exists():
        done = measured(read(out / "results.csv"))
        say(f"resuming: {len(done)} measured cells kept")

    from . import ops as opsmod
    from . import roofline as roofmod
    from .providers import fuse_down_default, resolved_backend

    record: dict = {
        **env,
        "preset": preset.name,
        "command": " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
        "started": envmod.now(),
        "load_average_start": load_start,
        "timer": {**cfg.__dict__, "cuda_graph_max_m": GRAPH_MAX_M},
        "memory_method": CUDA_MEMORY_METHOD if dev.type == "cuda" else CPU_MEMORY_METHOD,
        "ours_backend": resolved_backend(dev),
        "native_isa": _native_isa(),
        "fuse_down_default": fuse_down_default(),
        "grid": {"shapes": [getattr(s, "label", s) for s in preset.shapes], "ranks": preset.ranks,
                 "tokens": preset.tokens, "modes": preset.modes, "ops": preset.ops,
                 "provider_modes": preset.provider_modes, "provider_tokens": preset.provider_tokens},  # fmt: skip
    }
    history = _previous_runs(out, args.resume)
    record["status"] = "running"
    _write_env(out, record, history)
    _stop_on_sigterm()
    report = opsmod.OpsReport()
    try:
        with Writer(out, env["device_slug"], versions, env["commit"], resume=args.resume) as writer:
            say("roofline: measuring the device's copy bandwidth and bf16 GEMM rate ...")
            roof = roofmod.measure(dev, cfg, small=preset.name == "smoke")
            writer.write(roof.rows())
            record["roofline"] = {"copy_gbps": round(roof.copy_gbps, 2), "gemm_tflops": round(roof.gemm_tflops, 3),
                                  "ridge_flop_per_byte": round(roof.ridge_flop_per_byte, 1)}  # fmt: skip
            say(f"roofline: copy {roof.copy_gbps:.1f} GB/s, bf16 GEMM {roof.gemm_tflops:.2f} TFLOP/s")
            if not args.skip_ops:
                t_ops = time.time()
                opsmod.run_ops(preset, dev, writer, roof, cfg, providers=_csv_list(args.providers), done=done,
                               progress=not args.quiet, report=report)  # fmt: skip
                report.wall_s = round(time.time() - t_ops, 1)
                say(f"ops: {report.measured} measured, {report.resumed} resumed, {len(report.failures)} failed")
            if not args.skip_e2e:
                from . import e2e as e2emod

                size = e2emod.SIZES[args.e2e_size or preset.e2e]
                t_e2e = time.time()
                rows, notes = e2emod.run_e2e(size, dev, log=say)
                writer.write(rows)
                record["e2e"] = {**notes, "wall_s": round(time.time() - t_e2e, 1)}
        record["status"] = "complete"
    except KeyboardInterrupt as exc:
        why = exc or "Ctrl-C"
        record["status"] = f"interrupted ({why}): every finished cell is in results.csv; rerun with --resume"
        say(f"interrupted: {out / 'results.csv'} keeps every finished cell; rerun with --resume")
    finally:
        if not args.skip_ops:
            record["ops"] = report.as_dict()
        record["finished"] = envmod.now()
        record["wall_s"] = round(time.time() - t_start, 1)
        record["load_average_end"] = envmod.load_average()
        _write_env(out, record, history)
    say(f"results: {out / 'results.csv'} ({record['wall_s']} s)")

    if not args.no_plots:
        from . import plots

        for path in plots.plot_all(out):
            say(f"plot: {path}")
    complete = record["status"] == "complete"
    if not args.no_readme and complete:
        from . import summary

        if summary.update_readme():
            say("README.md: benchmark table regenerated")
    return 0 if complete else 130


if __name__ == "__main__":
    sys.exit(main())
