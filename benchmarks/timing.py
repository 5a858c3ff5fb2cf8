"""Timers and peak memory, on CUDA and on the CPU.

Every timer takes ``make_fn``: a function that sets up (e.g. runs the forward whose backward is
timed) and returns the callable to time. Setup runs on the stream that is timed, so a backward
captured into a CUDA graph runs its kernels on the capturing stream.

* CUDA, large M: ``triton.testing.do_bench`` (CUDA events around each call, L2 flushed between
  calls), quantiles 0.5 / 0.2 / 0.8.
* CUDA, small M: the callable is captured into a CUDA graph and the graph replayed; launch
  latency (several us per kernel) would otherwise hide the kernels, whose floor at M <= 16 is
  about 2 us for a 4096 x 4096 NF4 weight. Graph replays keep the weights in L2 (60 MB on an H200,
  larger than one NF4 projection), so the caller rotates over several weight copies whose total
  is a few times L2 (``rotation_copies``) and divides by their number.
* CPU: wall clock around each call after warm-up, repeated until a time budget is spent.
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

# Tokens per stream up to which CUDA timings use graph replay.
GRAPH_MAX_M = 64
# Graph replays rotate over enough weight copies to spill this multiple of the L2 cache.
ROTATE_L2_MULTIPLE = 4
MAX_COPIES = 32
# CPU: time slice per provider and round when providers are timed in alternation.
ROUND_SLICE_S = 0.1


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles over ``n`` samples."""

    p50: float
    p20: float
    p80: float
    n: int
    method: str
    peak_bytes: int | None = None  # CPU: peak extra memory of the first timed call (see peak_memory_bytes)


@dataclass(frozen=True)
class TimerConfig:
    warmup_ms: float = 20.0  # do_bench warm-up
    rep_ms: float = 60.0  # do_bench / graph measuring time per cell and provider (the gpu preset fits one call)
    graph_samples: int = 20  # graph replays timed (each replays several calls)
    cpu_warmup: int = 1  # CPU: calls before timing (compilation, bitsandbytes' repack, caches)
    cpu_min_reps: int = 3
    cpu_max_reps: int = 30
    cpu_budget_s: float = 0.4  # CPU: sampling time per provider and cell (at least cpu_min_reps samples)


def summarize(samples_ms: Sequence[float], method: str) -> Timing:
    s = sorted(samples_ms)
    if len(s) == 1:
        return Timing(s[0], s[0], s[0], 1, method)
    q = statistics.quantiles(s, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return Timing(statistics.median(s), q[1], q[7], len(s), method)


def _reset_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


# ------------------------------------------------------------------------------------------ CPU
def cpu_bench(make_fn: Callable[[], Callable[[], object]], cfg: TimerConfig,
              grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:  # fmt: skip
    """Wall-clock samples after warm-up; the first timed call also gives the peak memory (no extra call)."""
    fn = make_fn()
    for _ in range(cfg.cpu_warmup):
        fn()
    samples: list[float] = []
    peak = None
    start = time.perf_counter()
    while len(samples) < cfg.cpu_min_reps or (
        len(samples) < cfg.cpu_max_reps and time.perf_counter() - start < cfg.cpu_budget_s
    ):
        _reset_grads(grad_to_none)
        before = _cpu_peak_reset() if not samples else None
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if before is not None:
            peak = _cpu_peak_since(before)
    t = summarize(samples, f"cpu wall clock, {cfg.cpu_warmup} warm-up")
    return Timing(t.p50, t.p20, t.p80, t.n, t.method, peak)


def cpu_bench_interleaved(fns: dict[str, Callable[[], object]], cfg: TimerConfig,
                          grads: dict[str, Sequence[torch.Tensor]] | None = None) -> dict[str, Timing]:  # fmt: skip
    """Time several already warmed-up callables in alternation (CPU).

    On a shared machine the load drifts over seconds; taking the providers' samples in rounds
    (each gets a slice of about ``ROUND_SLICE_S`` per round, at least one call) makes their ratios
    compare calls made under the same load. The first sample of each also gives its peak memory.
    """
    grads = grads or {}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, int | None] = {}
    budget = cfg.cpu_budget_s * len(fns)
    start = time.perf_counter()
    rounds = 0
    while True:
        for name, fn in fns.items():
            own = samples[name]
            slice_start = time.perf_counter()
            while len(own) < cfg.cpu_max_reps:
                _reset_grads(grads.get(name, ()))
                before = _cpu_peak_reset() if not own else None
                t0 = time.perf_counter()
                fn()
                own.append((time.perf_counter() - t0) * 1e3)
                if before is not None:
                    peaks[name] = _cpu_peak_since(before)
                if time.perf_counter() - slice_start >= ROUND_SLICE_S:
                    break
        rounds += 1
        counts = [len(v) for v in samples.values()]
        if min(counts) >= cfg.cpu_max_reps:
            break
        if min(counts) >= cfg.cpu_min_reps and rounds >= cfg.cpu_min_reps and time.perf_counter() - start >= budget:
            break
    method = f"cpu wall clock, interleaved ({rounds} rounds), {cfg.cpu_warmup} warm-up"
    out = {}
    for name, own in samples.items():
        t = summarize(own, method)
        out[name] = Timing(t.p50, t.p20, t.p80, t.n, method, peaks.get(name))
    return out


# ------------------------------------------------------------------------------------------ CUDA
def do_bench(make_fn, cfg: TimerConfig, grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
    import triton.testing

    fn = make_fn()
    p50, p20, p80 = triton.testing.do_bench(
        fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, grad_to_none=list(grad_to_none) or None,
        quantiles=[0.5, 0.2, 0.8],
    )  # fmt: skip
    return Timing(p50, p20, p80, -1, "triton do_bench")


def graph_bench(make_fn, cfg: TimerConfig) -> Timing:
    """Capture the callable into a CUDA graph (on a side stream, setup included) and time replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn = make_fn()
        for _ in range(3):  # compile, autotune, allocate gradient buffers outside the capture
            fn()
        stream.synchronize()
        one = torch.cuda.CUDAGraph()
        with torch.cuda.graph(one, stream=stream):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        one.replay()
        start.record(stream)
        for _ in range(5):
            one.replay()
        end.record(stream)
        end.synchronize()
        estimate = max(start.elapsed_time(end) / 5, 1e-3)
        inner = max(1, min(1000, int(cfg.rep_ms / cfg.graph_samples / estimate)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(inner):
                fn()
        graph.replay()
        samples = []
        for _ in range(cfg.graph_samples):
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            samples.append(start.elapsed_time(end) / inner)
        del graph, one
    return summarize(samples, f"cuda graph, {inner} calls per replay")


def bench(make_fn, dev: torch.device, m: int, cfg: TimerConfig,
          grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:  # fmt: skip
    """Time one provider on one case; see the module docstring for the method per device and M."""
    if dev.type != "cuda":
        return cpu_bench(make_fn, cfg, grad_to_none)
    if m <= GRAPH_MAX_M:
        try:
            return graph_bench(make_fn, cfg)
        except Exception as exc:  # some third-party ops cannot be captured: time them eagerly
            torch.cuda.synchronize()
            warnings.warn(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); using do_bench")
            timing = do_bench(make_fn, cfg, grad_to_none)
            return Timing(timing.p50, timing.p20, timing.p80, timing.n, "triton do_bench (graph capture failed)")
    return do_bench(make_fn, cfg, grad_to_none)


def rotation_copies(dev: torch.device, m: int, weight_bytes: int) -> int:
    """How many weight copies a timed call rotates over (1 unless timed by graph replay)."""
    if dev.type != "cuda" or m > GRAPH_MAX_M:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 60 * 2**20
    return max(1, min(MAX_COPIES, math.ceil(ROTATE_L2_MULTIPLE * l2 / max(weight_bytes, 1))))


# ------------------------------------------------------------------------------------------ memory
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_CPU_MEMORY_READY: bool | None = None

CPU_MEMORY_METHOD = (
    "growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) during "
    "one call; glibc's mmap threshold is fixed at 256 KiB so that freed tensors return to the OS "
    "(allocations below that may reuse resident memory and go uncounted)"
)
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated during one call minus memory allocated before it"


def _cpu_memory_setup() -> bool:
    """Make freed tensors leave the resident set, so that peak-RSS growth measures one call."""
    global _CPU_MEMORY_READY
    if _CPU_MEMORY_READY is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 256 * 1024) == 1
            Path("/proc/self/clear_refs").write_text("5")
            _CPU_MEMORY_READY = ok and _status_kib() is not None
        except (OSError, AttributeError):
            _CPU_MEMORY_READY = False
    return _CPU_MEMORY_READY


def _status_kib() -> dict[str, int] | None:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        if line.startswith(("VmHWM:", "VmRSS:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out if len(out) == 2 else None


def peak_memory_bytes(make_fn, dev: torch.device, grad_to_none: Sequence[torch.Tensor] = ()) -> int | None:
    """Peak extra memory of one call (after one warm-up call) on top of what exists before it."""
    fn = make_fn()
    fn()
    _reset_grads(grad_to_none)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    before = _cpu_peak_reset()
    fn()
    return _cpu_peak_since(before)


def _cpu_peak_reset() -> dict[str, int] | None:
    """Reset the peak resident set to the current one; returns the state to compare with."""
    if not _cpu_memory_setup():
        return None
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib()


def _cpu_peak_since(before: dict[str, int] | None) -> int | None:
    after = _status_kib()
    if before is None or after is None:
        return None
    return max(0, after["VmHWM"] - before["VmRSS"]) * 1024


def prepare_cpu_memory_measurement() -> bool:
    """Call once before building anything (sets glibc's thresholds for the whole process)."""
    return _cpu_memory_setup()
