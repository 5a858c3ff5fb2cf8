"""The op suite: every provider on every case of a preset, side by side, one cell at a time.

For each (shape, r) the providers are built once per weight copy and reused for every M and mode;
for each case every provider is timed on the same inputs, then its peak memory is taken, and the
cell's rows (time, TFLOP/s, GB/s, roofline fraction, memory, ratio to ours) are appended to the
CSV before the next cell starts.
"""

from __future__ import annotations

import gc
import itertools
import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .config import Case, Preset
from .counts import bytes_moved, flops, nf4_bytes, roofline_ms
from .providers import Inputs, Layer, LayerWeights, Provider, all_providers, make_inputs, resolved_backend
from .results import Row, Writer, cell_key
from .roofline import Roofline
from .timing import TimerConfig, Timing, bench, cpu_bench_interleaved, peak_memory_bytes, rotation_copies

OURS = "ours"


@dataclass
class OpsReport:
    measured: int = 0
    resumed: int = 0
    failures: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    timers: Counter = field(default_factory=Counter)
    wall_s: float | None = None

    def as_dict(self) -> dict:
        return {"measured": self.measured, "resumed": self.resumed, "failures": self.failures,
                "unavailable": self.unavailable, "timers": dict(self.timers), "wall_s": self.wall_s}  # fmt: skip


def make_callable(layers: Sequence[Layer], inp: Inputs, case: Case) -> Callable[[], Callable[[], None]]:
    """``make_fn`` for the timers: setup (the forward of a ``bwd`` case) then the timed call."""
    if case.mode == "fwd":

        def make():
            def fn():
                with torch.no_grad():
                    for layer in layers:
                        layer(inp, case)

            return fn

    elif case.mode == "bwd":

        def make():
            outs = [layer(inp, case)[0] for layer in layers]

            def fn():
                for y in outs:
                    y.backward(inp.dy, retain_graph=True)

            return fn

    else:

        def make():
            def fn():
                for layer in layers:
                    layer(inp, case)[0].backward(inp.dy)

            return fn

    return make


def metric_rows(case: Case, provider: str, t: Timing, roof: Roofline | None, mem_bytes: int | None) -> list[Row]:
    head = (case.op, provider, case.mode, case.shape.label, case.r, case.m)
    fl, by = flops(case), bytes_moved(case)
    rows = [
        Row(*head, "time_ms", t.p50, t.p20, t.p80),
        Row(*head, "tflops", fl / t.p50 / 1e9, fl / t.p80 / 1e9, fl / t.p20 / 1e9),
        Row(*head, "gbps", by / t.p50 / 1e6, by / t.p80 / 1e6, by / t.p20 / 1e6),
    ]
    if roof is not None:
        floor = roofline_ms(case, roof.gemm_tflops, roof.copy_gbps)
        rows.append(Row(*head, "roofline_frac", floor / t.p50, floor / t.p80, floor / t.p20))
    if mem_bytes is not None:
        rows.append(Row(*head, "peak_mem_mib", mem_bytes / 2**20))
    return rows


def ratio_row(case: Case, provider: str, t: Timing, ours: Timing) -> Row:
    head = (case.op, provider, case.mode, case.shape.label, case.r, case.m)
    return Row(*head, "ratio_to_ours", t.p50 / ours.p50, t.p20 / ours.p80, t.p80 / ours.p20)


def _timing_from_row(row: dict[str, str]) -> Timing:
    return Timing(float(row["p50"]), float(row["p20"] or row["p50"]), float(row["p80"] or row["p50"]), 0, "resumed")


def select_providers(dev: torch.device, names: Sequence[str] | None, report: OpsReport) -> list[Provider]:
    chosen = []
    for p in all_providers():
        if names and p.name not in names:
            continue
        reason = p.unavailable(dev)
        if reason:
            report.unavailable[p.name] = reason
            continue
        chosen.append(p)
    return chosen


def run_ops(
    preset: Preset,
    dev: torch.device,
    writer: Writer,
    roof: Roofline | None,
    cfg: TimerConfig,
    *,
    providers: Sequence[str] | None = None,
    done: dict[tuple, dict[str, str]] | None = None,
    progress: bool = True,
    report: OpsReport | None = None,
) -> OpsReport:
    from tqdm.auto import tqdm

    report = report if report is not None else OpsReport()
    done = done or {}
    chosen = select_providers(dev, providers, report)
    ours_backend = resolved_backend(dev)

    def runs(p: Provider, c: Case) -> bool:
        if getattr(p, "redundant", None) and p.redundant(c, ours_backend):
            why = f"same computation as ours, which runs the {ours_backend} backend here"
            report.unavailable.setdefault(f"{p.name} ({c.mode})", why)
            return False
        return p.supports(c) and preset.runs(p.name, c)

    plan = [(c, [p for p in chosen if runs(p, c)]) for c in preset.cases()]
    total = sum(len(ps) for _, ps in plan)
    bar = tqdm(total=total, desc="ops", unit="meas", disable=not progress, dynamic_ncols=True, file=sys.stderr)

    def group_key(item):
        case = item[0]
        return (case.shape.label, case.r)

    try:
        for (_, _), group in itertools.groupby(sorted(plan, key=group_key), key=group_key):
            group = list(group)
            weights: list[LayerWeights] = []
            built: dict[tuple[str, int], Layer] = {}

            def layers_for(p: Provider, copies: int, case: Case) -> list[Layer]:
                while len(weights) < copies:
                    weights.append(LayerWeights(case.shape, case.r, dev, seed=len(weights)))
                for i in range(copies):
                    if (p.name, i) not in built:
                        built[(p.name, i)] = p.build(weights[i])
                return [built[(p.name, i)] for i in range(copies)]

            for case, provs in group:
                rows = _run_case(case, provs, dev, cfg, roof, layers_for, done, report, bar)
                writer.write(rows)
            built.clear()  # free this group's weights before the next one is built
            weights.clear()
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        bar.close()
    return report


def _fail(report: OpsReport, bar, case: Case, name: str, exc: BaseException, dev: torch.device) -> None:
    msg = f"{case} {name}: {type(exc).__name__}: {exc}"
    report.failures.append(msg)
    bar.write(f"FAILED {msg}")
    if "--debug" in sys.argv:
        traceback.print_exc()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _run_case(case, provs, dev, cfg, roof, layers_for, done, report: OpsReport, bar) -> list[Row]:
    """Time every provider of one case on the same inputs; returns the cell's rows."""
    inp = make_inputs(case, dev)
    copies = rotation_copies(dev, case.m, nf4_bytes(case.shape.n, case.shape.k))
    timings: dict[str, Timing] = {}
    fresh: dict[str, Timing] = {}
    state_bytes: dict[str, int] = {}
    todo = []
    for p in provs:
        key = cell_key(case.op, p.name, case.mode, case.shape.label, case.r, case.m)
        if key in done:
            timings[p.name] = _timing_from_row(done[key])
            report.resumed += 1
            bar.update()
            continue
        try:
            layers = layers_for(p, copies, case)
        except Exception as exc:  # one provider failing must not stop the suite
            _fail(report, bar, case, p.name, exc, dev)
            bar.update()
            continue
        grads = inp.grad_tensors() + [t for layer in layers for t in layer.params]
        state_bytes[p.name] = layers[0].state_bytes
        todo.append((p, layers, grads))

    bar.set_postfix_str(str(case), refresh=False)
    if dev.type == "cuda":
        for p, layers, grads in todo:
            try:
                t = bench(make_callable(layers, inp, case), dev, case.m, cfg, grads)
                if copies > 1:
                    t = Timing(t.p50 / copies, t.p20 / copies, t.p80 / copies, t.n,
                               f"{t.method}, {copies} weight copies")  # fmt: skip
                mem = peak_memory_bytes(make_callable(layers[:1], inp, case), dev, grads)
                fresh[p.name] = Timing(t.p50, t.p20, t.p80, t.n, t.method, mem)
            except Exception as exc:
                _fail(report, bar, case, p.name, exc, dev)
            bar.update()
    else:
        fns, grads_of = {}, {}
        for p, layers, grads in todo:
            try:
                fn = make_callable(layers, inp, case)()
                for _ in range(cfg.cpu_warmup):  # compilation, bitsandbytes' repack, first allocations
                    fn()
                fns[p.name], grads_of[p.name] = fn, grads
            except Exception as exc:
                _fail(report, bar, case, p.name, exc, dev)
                bar.update()
        if fns:
            fresh.update(cpu_bench_interleaved(fns, cfg, grads_of))
            bar.update(len(fns))
    for _, layers, grads in todo:
        for g in grads:
            g.grad = None

    rows: list[Row] = []
    for name, t in fresh.items():
        mem = None if t.peak_bytes is None else t.peak_bytes + state_bytes[name]
        rows += metric_rows(case, name, t, roof, mem)
        report.timers[t.method.split(",")[0]] += 1
        report.measured += 1
    timings.update(fresh)
    ours = timings.get(OURS)
    if ours is not None:
        for name, t in timings.items():
            if name != OURS and (name in fresh or OURS in fresh):
                rows.append(ratio_row(case, name, t, ours))
    return rows
