"""The native CPU kernels (flare_kernels._C) side by side with what CPU users run today, in one run.

    python -m benchmarks.cpu_native            # about 3 minutes on 2 cores
    python -m benchmarks.cpu_native --quick    # fewer samples, for development
    OMP_NUM_THREADS=1 python -m benchmarks.cpu_native --out benchmarks/results/cpu/1-thread
                                               # every provider on one thread (steadier on a
                                               # loaded machine, where a descheduled thread
                                               # stalls the other at each parallel region)

Llama 3.1 8B q_proj: a 4096 x 4096 NF4 weight (double quantization, blocksize 64; the bytes come
from bitsandbytes), r = 8, bf16 activations, fp32 LoRA factors (PEFT keeps them in fp32 for 4-bit
models), FLARE fusion add_relu. Providers:

    native                 flare_kernels, FLARE_KERNELS_BACKEND=cpu (both streams in one op)
    native_base            the same op as the frozen layer alone (FlareLinear4bit.base_forward:
                           adapter term scaled by zero), one stream: our base GEMV + op overhead
    reference              flare_kernels, FLARE_KERNELS_BACKEND=torch (the pure-PyTorch spec)
    bnb_peft               bitsandbytes Linear4bit + PEFT LoRA, train mode (dequantize + matmul);
                           FLARE in the authors' style (two base calls, fusion in torch)
    bnb_peft_cpu_packed    the same in eval mode without grad: bitsandbytes' repacked CPU kernel
    bnb_cpu_packed         bitsandbytes' repacked eval-mode Linear4bit alone, one stream, no LoRA
    dense_bf16             torch F.linear over a dense bf16 weight, every row of the cell

Modes: ``fwd`` is an inference forward without grad; ``bwd`` is the backward alone, re-run on a
retained graph. The baseline of a cell is bitsandbytes' faster mode (train or eval) + PEFT.

Providers are timed in alternation (benchmarks.timing.cpu_bench_interleaved) so that a shared
machine's drifting load hits them alike: the ratios are the result. Milliseconds depend on the
load, which is recorded (1-minute load average before and after). Results: a table on stdout,
benchmarks/results/cpu/cpu_native.csv (the suite's schema) and cpu_native.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import flare_kernels as fk
from flare_kernels import native

from .config import SHAPES
from .env import environment, git_commit, load_average, versions_field
from .providers.base import ACT_DTYPE, LayerWeights
from .providers.bnb_peft import authors_flare_forward, make_linear4bit, peft_lora_linear4bit
from .results import COLUMNS, Row
from .timing import TimerConfig, cpu_bench_interleaved

OUT_DIR = Path(__file__).resolve().parent / "results" / "cpu"
SHAPE = SHAPES["llama3.1-8b.q"]
R = 8
FUSION = "add_relu"


@dataclass(frozen=True)
class Cell:
    op: str  # "lora" (one stream) or "flare" (target + source streams)
    mode: str  # "fwd" or "bwd"
    m: int  # tokens per stream
    providers: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.op}-{self.mode}-M{self.m}"


FWD = ("native", "bnb_peft", "bnb_peft_cpu_packed", "dense_bf16")
CELLS = (
    Cell("flare", "fwd", 1, FWD + ("bnb_cpu_packed",)),
    Cell("lora", "fwd", 1, FWD + ("bnb_cpu_packed", "native_base")),
    Cell("lora", "fwd", 16, FWD),
    Cell("flare", "fwd", 16, FWD),
    Cell("lora", "fwd", 512, FWD),
    Cell("flare", "fwd", 512, FWD),
    Cell("lora", "bwd", 512, ("native", "reference", "bnb_peft")),
    Cell("flare", "bwd", 512, ("native", "reference", "bnb_peft")),
)


@dataclass(frozen=True)
class Target:
    text: str
    cell: str
    ours: str
    against: tuple[str, ...]  # the faster of these
    at_least: float  # required (their time / our time)


TARGETS = (
    Target("M=1: FLARE (both streams) no slower than bitsandbytes' eval path on one stream",
           "flare-fwd-M1", "native", ("bnb_cpu_packed",), 1.0),
    Target("M=1: plain LoRA >= 1.3x faster than bitsandbytes + PEFT",
           "lora-fwd-M1", "native", ("bnb_peft", "bnb_peft_cpu_packed"), 1.3),
    Target("M=16: >= 3x faster than bitsandbytes + PEFT",
           "lora-fwd-M16", "native", ("bnb_peft", "bnb_peft_cpu_packed"), 3.0),
    Target("M=512: >= 1.3x faster than bitsandbytes + PEFT",
           "lora-fwd-M512", "native", ("bnb_peft", "bnb_peft_cpu_packed"), 1.3),
    Target("M=512: within 1.3x of the dense bf16 torch matmul",
           "lora-fwd-M512", "native", ("dense_bf16",), 1 / 1.3),
    Target("backward at M=512: >= 2x faster than the reference path",
           "lora-bwd-M512", "native", ("reference",), 2.0),
)  # fmt: skip
# Reported next to the targets: the same comparisons for FLARE's two streams.
FLARE_CHECKS = (
    Target("M=1 FLARE vs bitsandbytes + PEFT, authors' style (two streams)",
           "flare-fwd-M1", "native", ("bnb_peft", "bnb_peft_cpu_packed"), 1.3),
    Target("M=16 FLARE vs bitsandbytes + PEFT, authors' style", "flare-fwd-M16", "native",
           ("bnb_peft", "bnb_peft_cpu_packed"), 3.0),
    Target("M=512 FLARE vs bitsandbytes + PEFT, authors' style", "flare-fwd-M512", "native",
           ("bnb_peft", "bnb_peft_cpu_packed"), 1.3),
    Target("M=512 FLARE (1024 rows) vs dense bf16 matmul of 1024 rows", "flare-fwd-M512", "native",
           ("dense_bf16",), 1 / 1.3),
    Target("backward at M=512, FLARE", "flare-bwd-M512", "native", ("reference",), 2.0),
)
# Where the M=1 targets stand: the frozen layer alone against bitsandbytes' kernel alone (PEFT's
# LoRA adds little on top of it, so the plain-LoRA target needs our base GEMV well ahead of it).
BASE_CHECKS = (
    Target("M=1 base layer alone (native_base) vs bitsandbytes' eval kernel alone",
           "lora-fwd-M1", "native_base", ("bnb_cpu_packed",), 1.0),
)  # fmt: skip


# ------------------------------------------------------------------------------------ providers
class Layers:
    """Every provider's copy of one set of weights (bitsandbytes' eval path repacks its own copy)."""

    def __init__(self) -> None:
        self.weights = LayerWeights(SHAPE, R, torch.device("cpu"))
        self.nf4 = fk.NF4Weight.from_bnb(make_linear4bit(self.weights.dense))  # bitsandbytes' bytes
        self.peft_train = peft_lora_linear4bit(self.weights).train()
        self.peft_eval = peft_lora_linear4bit(self.weights).eval()
        with torch.no_grad():  # the first eval-mode forward repacks the weight in place
            self.peft_eval(torch.zeros((1, SHAPE.k), dtype=ACT_DTYPE))
        if not getattr(self.peft_eval.base_layer.weight.quant_state, "packing_format_for_cpu", False):
            self.peft_eval = None  # no AVX512-BF16: bitsandbytes has no separate eval path here
        self.dense = self.weights.dense.to(ACT_DTYPE)
        self.a = self.weights.lora_a.clone()
        self.b = self.weights.lora_b.clone()


def make_fn(name: str, layers: Layers, cell: Cell, x: torch.Tensor, src: torch.Tensor | None, dy: torch.Tensor):
    """(callable to time, tensors whose .grad is reset between calls) or None if not applicable."""
    flare = cell.op == "flare"
    if name in ("native", "reference", "native_base"):
        backend = "torch" if name == "reference" else "cpu"
        a = layers.a.clone().requires_grad_(cell.mode == "bwd")
        b = layers.b.clone().requires_grad_(cell.mode == "bwd")
        if name == "native_base":
            if flare or cell.mode != "fwd":
                return None

            def ours():  # FlareLinear4bit.base_forward's call
                return fk.flare_lora_linear(x, layers.nf4, a, b, 0.0, fusion="none")

            return _mode(cell, ours, dy, [], lambda: fk.use_backend(backend))

        def ours():
            return fk.flare_lora_linear(x, layers.nf4, a, b, layers.weights.scaling, source=src,
                                        fusion=FUSION if flare else "none", return_source_output=flare)  # fmt: skip

        # The backend is chosen per op call, so the backward runs under the same setting too.
        return _mode(cell, ours, dy, [x, a, b], lambda: fk.use_backend(backend))
    if name in ("bnb_peft", "bnb_peft_cpu_packed"):
        layer = layers.peft_train if name == "bnb_peft" else layers.peft_eval
        if layer is None or (name == "bnb_peft_cpu_packed" and cell.mode != "fwd"):
            return None
        params = [p for p in layer.parameters() if p.requires_grad]

        def theirs():
            if flare:
                return authors_flare_forward(layer, x, src, FUSION)
            return layer(x)

        return _mode(cell, theirs, dy, [x, *params])
    if name == "bnb_cpu_packed":
        if layers.peft_eval is None or cell.mode != "fwd":
            return None
        base = layers.peft_eval.base_layer

        def bnb_one_stream():
            with torch.no_grad():
                return base(x)

        return bnb_one_stream, []
    if name == "dense_bf16":
        rows = torch.cat([src, x]) if flare else x

        def dense():
            with torch.no_grad():
                return F.linear(rows, layers.dense)

        return dense, []
    raise ValueError(name)


def _mode(cell: Cell, forward, dy: torch.Tensor, grads: list[torch.Tensor], context=contextlib.nullcontext):
    if cell.mode == "fwd":

        def fwd():
            with torch.no_grad(), context():
                return forward()

        return fwd, []
    with context():
        out = forward()
    y = out[0] if isinstance(out, tuple) else out

    def bwd():
        with context():
            y.backward(dy, retain_graph=True)

    return bwd, grads


def check_outputs(layers: Layers) -> float:
    """The native op and bitsandbytes + PEFT compute the same layer: relative max difference."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, SHAPE.k, generator=g).to(ACT_DTYPE)
    with torch.no_grad(), fk.use_backend("cpu"):
        ours = fk.flare_lora_linear(x, layers.nf4, layers.a, layers.b, layers.weights.scaling, fusion="none")
        theirs = layers.peft_train(x)
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()


# ------------------------------------------------------------------------------------ run
def run(args) -> dict:
    torch.manual_seed(0)
    cfg = TimerConfig(cpu_warmup=2, cpu_min_reps=args.min_reps, cpu_max_reps=args.max_reps, cpu_budget_s=args.budget)
    layers = Layers()
    diff = check_outputs(layers)
    if diff > 2e-2:
        raise RuntimeError(f"native output differs from bitsandbytes + PEFT by {diff:.2e} (relative): not timing")
    results: dict[str, dict[str, dict]] = {}
    for cell in CELLS:
        if args.cells and cell.key not in args.cells:
            continue
        g = torch.Generator().manual_seed(cell.m)
        x = torch.randn((cell.m, SHAPE.k), generator=g).to(ACT_DTYPE).requires_grad_(cell.mode == "bwd")
        src = torch.randn((cell.m, SHAPE.k), generator=g).to(ACT_DTYPE) if cell.op == "flare" else None
        dy = torch.randn((cell.m, SHAPE.n), generator=g).to(ACT_DTYPE)
        fns, grads = {}, {}
        for name in cell.providers:
            made = make_fn(name, layers, cell, x, src, dy)
            if made is None:
                continue
            fns[name], grads[name] = made
            for _ in range(cfg.cpu_warmup):
                fns[name]()
        timings = cpu_bench_interleaved(fns, cfg, grads)
        results[cell.key] = {name: dict(p50=t.p50, p20=t.p20, p80=t.p80, n=t.n) for name, t in timings.items()}
        line = "  ".join(f"{n} {t.p50:.3g}" for n, t in timings.items())
        print(f"  measured {cell.key:16s} {line}  (ms)", file=sys.stderr, flush=True)
    return dict(results=results, check_rel_diff=diff)


def ratio(results: dict, t: Target) -> tuple[float, str] | None:
    cell = results.get(t.cell, {})
    present = [a for a in t.against if a in cell]
    if t.ours not in cell or not present:
        return None
    best = min(present, key=lambda a: cell[a]["p50"])
    return cell[best]["p50"] / cell[t.ours]["p50"], best


def print_table(results: dict, print=print) -> None:
    print(f"\n{'cell':18s} {'provider':22s} {'p50 ms':>9s} {'p20-p80 ms':>17s} {'vs native':>10s}")
    for key, cell in results.items():
        ours = cell.get("native", {}).get("p50")
        for name, t in sorted(cell.items(), key=lambda kv: kv[1]["p50"]):
            rel = f"{t['p50'] / ours:.2f}x" if ours else ""
            print(f"{key:18s} {name:22s} {t['p50']:9.3f} {t['p20']:8.3f}-{t['p80']:<8.3f} {rel:>10s}")
    print()
    for title, targets in (("targets (issue 5)", TARGETS), ("the same for FLARE's two streams", FLARE_CHECKS),
                           ("where M=1 stands", BASE_CHECKS)):
        print(title)
        for t in targets:
            got = ratio(results, t)
            if got is None:
                print(f"  [ n/a ] {t.text}")
                continue
            value, against = got
            need = f">= {t.at_least:.2f}x" if t.at_least >= 1 else f"<= {1 / t.at_least:.2f}x slower"
            shown = f"{value:.2f}x faster" if value >= 1 else f"{1 / value:.2f}x slower"
            mark = "met" if value >= t.at_least else "NOT met"
            print(f"  [{mark:7s}] {t.text}: {shown} than {against} (needs {need})")
        print()


def write(results: dict, meta: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    device = meta["environment"]["device"]
    vers, commit = versions_field(), meta["environment"]["commit"]
    with open(out_dir / "cpu_native.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for key, cell in results.items():
            op, mode, m = key.split("-")
            ours = cell.get("native")
            for name, t in cell.items():
                rows = [Row(op, name, mode, SHAPE.label, R, m[1:], "time_ms", t["p50"], t["p20"], t["p80"])]
                if ours and name != "native":
                    rows.append(Row(op, name, mode, SHAPE.label, R, m[1:], "ratio_to_ours", t["p50"] / ours["p50"],
                                    t["p20"] / ours["p80"], t["p80"] / ours["p20"]))  # fmt: skip
                for row in rows:
                    w.writerow(row.cells(device, vers, commit))
    targets = []
    for t in TARGETS + FLARE_CHECKS + BASE_CHECKS:
        got = ratio(results, t)
        targets.append(dict(target=t.text, cell=t.cell, against=got[1] if got else None,
                            ratio=got[0] if got else None, required=t.at_least,
                            met=bool(got and got[0] >= t.at_least), issue_target=t in TARGETS))  # fmt: skip
    (out_dir / "cpu_native.json").write_text(json.dumps(dict(meta, results=results, targets=targets), indent=2) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer samples (development)")
    p.add_argument("--budget", type=float, default=None, help="seconds of sampling per provider and cell")
    p.add_argument("--cells", nargs="*", help=f"subset of {[c.key for c in CELLS]}")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    args.budget = args.budget if args.budget is not None else (0.3 if args.quick else 2.5)
    args.min_reps, args.max_reps = (3, 15) if args.quick else (10, 400)
    if not native.available():
        raise SystemExit(f"the native CPU backend is not available: {native.load_error()}")
    load_before = load_average()
    start = time.time()
    print(f"native kernels: {native.isa()} ({', '.join(native.supported_isas())}); torch threads "
          f"{torch.get_num_threads()}; load average {load_before}", file=sys.stderr)  # fmt: skip
    measured = run(args)
    meta = dict(
        command="python -m benchmarks.cpu_native " + " ".join(argv if argv is not None else sys.argv[1:]),
        environment=environment(torch.device("cpu")) | dict(commit=git_commit()),
        native_isa=native.isa(),
        native_build=native.build_info(),
        torch_threads=torch.get_num_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        load_average_before=load_before,
        load_average_after=load_average(),
        seconds=round(time.time() - start, 1),
        check_rel_diff=measured["check_rel_diff"],
        shape=SHAPE.label, r=R, fusion=FUSION, activations=str(ACT_DTYPE), adapters="float32",
    )
    lines: list[str] = []

    def report(*parts: object) -> None:  # the table goes to stdout and, verbatim, to cpu_native.txt
        lines.append(" ".join(str(p) for p in parts))
        print(*parts)

    report(f"{meta['command']}  (native kernels: {meta['native_isa']}; torch threads {meta['torch_threads']}; "
           f"commit {meta['environment']['commit']})")  # fmt: skip
    print_table(measured["results"], print=report)
    report(f"load average before {meta['load_average_before']}, after {meta['load_average_after']}; "
           f"{meta['seconds']} s; native vs bitsandbytes + PEFT output: {meta['check_rel_diff']:.1e} relative")
    write(measured["results"], meta, args.out)
    (args.out / "cpu_native.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'cpu_native.csv'}, .json and .txt")


if __name__ == "__main__":
    main()
