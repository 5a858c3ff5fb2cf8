"""The static cost report: every launch an op makes, compiled ahead of time, read and priced.

For each (arch, Triton version): the launches of ``flare_kernels.ops.plan.launch_plan`` for every
case (so the report measures exactly what a call launches) and the anchors (``anchors.py``) are
compiled through ``compile.compile_specs``; each cubin is read by ``sass.py`` (registers, spills,
shared memory, the main loop) and priced by ``cost.py`` (occupancy, waves, three floors, predicted
time on an H100 and an H200). Rows go to ``<out>/static-sm<arch>-triton<version>/results.csv`` in
the benchmark schema (``benchmarks/results.py``), with ``environment.json`` and a plot.

Rows (``device`` column: ``static-sm90``; nothing here is measured on a GPU):

* per op, providers named as the benchmark's (the GPU check joins ``predicted_us_<dev>`` with the
  measured ``time_ms`` of the same cell): ``ours`` = fp32 LoRA factors, as PEFT keeps them and the
  benchmark runs; ``ours_bf16_fused_down`` = bf16 factors with the down-projection inside the base
  K loop (the launcher's default for bf16). Metrics of the weight kernel (``flare_fwd_kernel`` in
  fwd, ``flare_dx_kernel`` in bwd): registers, spills, occupancy, warp-instructions per weight;
  ``launches``; and the predicted time summed over all launches;
* per launch (provider ``<provider>:<kernel>``, ``#2`` for a second launch of a kernel): the same
  metrics of that launch alone, its time as ``predicted_launch_us_<dev>`` (so that nothing joins
  it with a whole op's measured time). ``lora_down`` / ``lora_reduce`` dequantize no weights: they
  report ``warp_inst_per_elem`` (per element of the streamed activation tile) instead of
  ``warp_inst_per_weight``;
* anchors: ``gemlite`` (op ``w4a16_gemm``: the base GEMM alone, one stream of M rows),
  ``bnb_dequant`` / ``bnb_dequant_code`` (op ``nf4_dequant``, M = 0: independent of M);
* references: ``dense_bf16_gemm`` (``predicted_us_<dev>``; fwd: one bf16 GEMM over every row of
  both streams; bwd: the dX GEMM dY W), ``nf4_read`` (``floor_us_<dev>``: the NF4 weight read
  once) and ``roofline`` (``floor_us_<dev>``: the op's FLOPs and Marlin-counted bytes,
  ``benchmarks/counts.py``, at the device's rates).

Metrics: registers, spill_bytes (ptxas spill stores per thread), shared_kb, num_warps,
blocks_per_sm, warps_per_sm, programs, waves, launches, loop_instructions, loop_iterations,
loop_mma (tensor-core instructions in the loop: HMMA / HGMMA), warp_inst_per_weight or
warp_inst_per_elem, and per device (``h100``, ``h200``): predicted_us_<dev>,
floor_{hbm,tensor,issue}_us_<dev>, bound_{hbm,tensor,issue}_<dev> (the share of the predicted
time spent in launches bound by that floor: 1.0 for a single launch's bound).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import counts
from ..config import OPS, SHAPES, Case, Shape
from ..results import ENV_NAME, Row, Writer
from . import cost, sass
from .compile import Artifact, compile_specs, spec_of
from .toolchain import toolchain

SHAPE_NAMES = ("llama3.1-8b.q", "llama3.1-8b.gate_up")
TOKENS = (1, 16, 64, 512, 4096)
RANK = 16
MODES = ("fwd", "bwd")
# provider -> (LoRA factor dtype, fuse_down): the benchmark's providers of the same name (the GPU
# check joins these rows with its measured times by provider).
ADAPTERS = {"ours": ("float32", None), "ours_bf16_fused_down": ("bfloat16", True)}
DEVICES = ("h100", "h200")
# The launch whose loop dequantizes the weights: the op rows carry its metrics. On the large-M
# "dequant" route that is nf4_dequant_kernel (the GEMMs are cuBLAS's).
WEIGHT_KERNELS = ("flare_fwd_kernel", "flare_dx_kernel", "nf4_dequant_kernel")


# ------------------------------------------------------------------------------------ one launch, priced
@dataclass
class Priced:
    """One compiled launch with everything the rows need."""

    kernel: str
    programs: int
    num_warps: int
    per_pass: int  # weights (or streamed elements) per main-loop pass
    per_elem: bool  # True: per_pass counts activation elements, not weights
    iterations: int
    flops: float
    bytes: float
    art: Artifact
    sass: sass.KernelSass | None = None
    occ: cost.Occupancy | None = None
    preds: dict[str, cost.Prediction] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.art.ok and self.sass is not None

    @property
    def warp_inst_per_pass_unit(self) -> float:
        return self.sass.loop_instructions * self.num_warps / self.per_pass

    def metrics(self) -> list[tuple[str, float]]:
        s, m = self.sass, self.art.metadata
        shared = m.get("shared_bytes") or 0
        out = [
            ("registers", s.resources.registers),
            ("spill_bytes", m.get("spill_stores", s.spill_store_bytes) or 0),
            ("shared_kb", shared / 1024),
            ("num_warps", self.num_warps),
            ("blocks_per_sm", self.occ.blocks),
            ("warps_per_sm", self.occ.warps),
            ("programs", self.programs),
            ("waves", self.preds["h200"].waves),
            ("loop_instructions", s.loop_instructions),
            ("loop_iterations", self.iterations),
            ("loop_mma", s.opcode_count("HMMA", "HGMMA")),
            ("warp_inst_per_elem" if self.per_elem else "warp_inst_per_weight", self.warp_inst_per_pass_unit),
        ]
        for dev, p in self.preds.items():
            out += _pred_metrics(dev, [p], "predicted_launch_us")
        return out


def _pred_metrics(dev: str, preds: list[cost.Prediction], total_name: str = "predicted_us") -> list[tuple[str, float]]:
    total = sum(p.time_s for p in preds)
    out = [(f"{total_name}_{dev}", total * 1e6)]
    for kind in ("hbm", "tensor", "issue"):
        out.append((f"floor_{kind}_us_{dev}", sum(p.floors[kind] for p in preds) * 1e6))
    for kind in ("hbm", "tensor", "issue"):
        share = sum(p.time_s for p in preds if p.bound == kind) / total if total > 0 else 0.0
        out.append((f"bound_{kind}_{dev}", share))
    return out


@dataclass
class PricedGemm:
    """A library GEMM of the plan (``LibraryCall``: cuBLAS through torch), priced as the dense
    reference is: no SASS to read, so no instruction metrics."""

    kernel: str
    m: int
    n: int
    k: int
    act_bytes: int
    preds: dict[str, cost.Prediction] = field(default_factory=dict)
    ok: bool = True

    @classmethod
    def of(cls, call) -> "PricedGemm":
        p = cls(call.name, call.m, call.n, call.k, _itemsize(call.dtype))
        flops = 2.0 * p.m * p.n * p.k
        moved = p.act_bytes * (p.m * p.k + p.n * p.k + p.m * p.n)
        for dev in DEVICES:
            d = cost.DEVICES[dev]
            # fp32 GEMMs run on the CUDA cores (torch keeps TF32 off): 1/8 of the tensor rate is
            # optimistic (H100 SXM datasheet: 67 fp32 TFLOP/s against 989 bf16).
            rate = d.tensor_flops_per_s / (8 if p.act_bytes == 4 else 1)
            p.preds[dev] = cost.Prediction(moved / d.hbm_bytes_per_s, flops / rate, 0.0, 0)
        return p

    def metrics(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = [("gemm_m", self.m), ("gemm_n", self.n), ("gemm_k", self.k)]
        for dev, p in self.preds.items():
            out += _pred_metrics(dev, [p], "predicted_launch_us")
        return out


def _itemsize(dtype) -> int:
    return dtype.itemsize


def describe_launch(launch) -> dict[str, Any]:
    """Per-pass work, passes per program, FLOPs and Marlin-counted bytes of one of our launches,
    from its runtime arguments and constexprs (the kernels' loops, read from their sources)."""
    c, a, name = launch.constexprs, launch.arg_specs(), launch.name
    if name == "flare_fwd_kernel":
        m, n, k, r = a["M"], a["N"], a["K"], a["R"]
        act, ad = _itemsize(a["xt_ptr"].dtype), _itemsize(a["a_ptr"].dtype)
        s_out = 2 if c["SOURCE_OUT"] else 1
        src_x = c["SOURCE_OUT"] or (c["LORA"] == 2 and c["NEED_SRC_S"])
        s_rows = 2 if c["NEED_SRC_S"] else 1
        moved = m * k * act * (2 if src_x else 1) + counts.nf4_bytes(n, k) + m * n * act * s_out
        flops = 2 * s_out * m * n * k
        if c["LORA"]:
            moved += n * r * ad + m * r * 4 * s_rows  # B; s written (LORA 2) or read (LORA 1)
            flops += 2 * m * r * n
        if c["LORA"] == 2:
            moved += r * k * ad
            flops += 2 * s_rows * m * k * r
        splits = launch.grid[1] if len(launch.grid) > 1 else 1
        if c.get("SPLIT_K"):  # fp32 partials written instead of the outputs (read back by the epilogue)
            moved += splits * m * n * 4 * s_out - m * n * act * s_out
        return dict(per_pass=c["BLOCK_N"] * c["BLOCK_K"], per_elem=False,
                    iterations=math.ceil(min(k, a["k_per_split"]) / c["BLOCK_K"]), flops=flops, bytes=moved)  # fmt: skip
    if name == "flare_fwd_splitk_epilogue_kernel":
        m, n, r, splits = a["M"], a["N"], a["R"], a["splits"]
        s_out = 2 if c["SOURCE_OUT"] else 1
        act = _itemsize(a["yt_ptr"].dtype)
        moved = splits * m * n * 4 * s_out + m * n * act * s_out + n * r * _itemsize(a["b_ptr"].dtype)
        return dict(per_pass=c["BLOCK_M"] * c["BLOCK_N"], per_elem=True, iterations=splits,
                    flops=2 * m * r * n, bytes=moved)  # fmt: skip
    if name == "flare_dx_kernel":
        m, n, k, r = a["M"], a["N"], a["K"], a["R"]
        act, ad = _itemsize(a["dy_ptr"].dtype), _itemsize(a["a_ptr"].dtype)
        s_rows = 2 if c["NEED_SRC_S"] else 1
        splits = launch.grid[1] if len(launch.grid) > 1 else 1
        moved = m * n * act + counts.nf4_bytes(n, k)
        flops = 2 * m * n * k
        if c["LORA"] == 2:
            moved += n * r * ad  # B
            flops += 2 * m * n * r
        if c.get("SPLIT_N"):  # fp32 partials of dX (and dz) out; the LoRA term is the epilogue kernel's
            moved += splits * m * k * 4 + (splits * m * r * 4 if c["LORA"] == 2 else 0)
        else:
            moved += m * k * act
            if c["LORA"]:
                moved += r * k * ad
                flops += 2 * m * r * k
            if c["LORA"] == 2:
                moved += 2 * m * r * 4 * s_rows  # s read, ds written
            elif c["LORA"] == 1:
                moved += m * r * 4
        return dict(per_pass=c["BLOCK_N"] * c["BLOCK_K"], per_elem=False,
                    iterations=math.ceil(min(n, a["n_per_split"]) / c["BLOCK_N"]), flops=flops, bytes=moved)  # fmt: skip
    if name == "flare_dx_splitn_epilogue_kernel":
        m, k, r, splits = a["M"], a["K"], a["R"], a["splits"]
        act, ad = _itemsize(a["dx_ptr"].dtype), _itemsize(a["a_ptr"].dtype)
        s_rows = 2 if c["NEED_SRC_S"] else 1
        moved = splits * m * k * 4 + m * k * act + r * k * ad
        moved += splits * m * r * 4 + 2 * m * r * 4 * s_rows if c["LORA"] == 2 else m * r * 4
        return dict(per_pass=c["BLOCK_M"] * c["BLOCK_K"], per_elem=True, iterations=splits,
                    flops=2 * m * r * k, bytes=moved)  # fmt: skip
    if name == "nf4_dequant_kernel":
        n, k = a["N"], a["K"]
        return dict(per_pass=c["BLOCK_N"] * c["BLOCK_K"], per_elem=False, iterations=1, flops=0.0,
                    bytes=counts.nf4_bytes(n, k) + n * k * _itemsize(a["out_ptr"].dtype))  # fmt: skip
    if name == "lora_up_kernel":
        m, ch, r = a["M"], a["C"], a["R"]
        y, ad = _itemsize(a["y_ptr"].dtype), _itemsize(a["u_ptr"].dtype)
        moved = 2 * m * ch * y + m * r * 4 + r * ch * ad + (m * ch if c["DROPOUT"] else 0)
        return dict(per_pass=c["BLOCK_M"] * c["BLOCK_C"], per_elem=True, iterations=1, flops=2 * m * r * ch,
                    bytes=moved)  # fmt: skip
    if name == "lora_down_kernel":
        m, k, r = a["M"], a["K"], a["R"]
        streams = launch.grid[1] if len(launch.grid) > 1 else 1
        act, ad = _itemsize(a["x0_ptr"].dtype), _itemsize(a["a_ptr"].dtype)
        splits = launch.grid[2] if len(launch.grid) > 2 else 1
        return dict(per_pass=c["BLOCK_M"] * c["BLOCK_K"], per_elem=True,
                    iterations=math.ceil(min(k, a["k_per_split"]) / c["BLOCK_K"]), flops=streams * 2 * m * k * r,
                    bytes=streams * (m * k * act + splits * m * r * 4) + r * k * ad)  # fmt: skip
    if name == "lora_reduce_kernel":
        m, ch, r = a["M"], a["C"], a["R"]
        streams = 2 if c["TWO_STREAMS"] else 1
        splits = launch.grid[1] if len(launch.grid) > 1 else 1
        act = _itemsize(a["x0_ptr"].dtype)
        return dict(per_pass=c["BLOCK_M"] * c["BLOCK_C"] * streams, per_elem=True,
                    iterations=math.ceil(a["rows_per_split"] / c["BLOCK_M"]), flops=streams * 2 * m * r * ch,
                    bytes=streams * (m * ch * act + m * r * 4) + splits * r * ch * 4)  # fmt: skip
    raise ValueError(f"the static report does not know the loop of {name}; add it to describe_launch")


# ------------------------------------------------------------------------------------ cases
@dataclass
class OpCase:
    op: str
    provider: str
    shape: Shape
    mode: str
    m: int
    launches: list  # plan.Launch
    specs: list = field(default_factory=list)

    @property
    def case(self) -> Case:
        return Case(self.op, self.shape, RANK, self.m, self.mode)


def our_cases(shapes: list[Shape], ms: list[int], log: Callable[[str], None]) -> list[OpCase]:
    import torch

    from flare_kernels.ops.plan import HOPPER, CallSpec, Launch, launch_plan

    cases = []
    for shape in shapes:
        for op, fusion in OPS.items():
            two = fusion != "none"
            if two and not shape.flare:
                continue  # FLARE fuses in q and v projections only (config.Shape.flare)
            for provider, (adapter, fuse_down) in ADAPTERS.items():
                for mode in MODES:
                    for m in ms:
                        call = CallSpec(m=m, k=shape.k, n=shape.n, r=RANK, dtype=torch.bfloat16,
                                        adapter_dtype=getattr(torch, adapter), fusion=fusion, source=two,
                                        source_out=two, fuse_down=fuse_down)  # fmt: skip
                        launches = launch_plan(call, HOPPER, forward=mode == "fwd", backward=mode == "bwd",
                                               library=True)  # fmt: skip
                        specs = [spec_of(ln) if isinstance(ln, Launch) else None for ln in launches]
                        cases.append(OpCase(op, provider, shape, mode, m, launches, specs))
    log(f"plan: {len(cases)} op cases, {sum(len(c.launches) for c in cases)} launches")
    return cases


# ------------------------------------------------------------------------------------ pricing
def price(art: Artifact, chain, arch: int, kernel: str, programs: int, num_warps: int, work: dict,
          cache: dict) -> Priced:  # fmt: skip
    p = Priced(kernel, programs, num_warps, work["per_pass"], work["per_elem"], work["iterations"],
               float(work["flops"]), float(work["bytes"]), art)  # fmt: skip
    if not art.ok or art.cubin is None:
        return p
    key = str(art.cubin)
    if key not in cache:
        ptxas = chain.ptxas(arch) if "spill_stores" not in art.metadata else None  # spills unknown: ask ptxas -v
        cache[key] = sass.analyze_cached(art.cubin, chain.cuobjdump, art.ptx, ptxas, arch)
    p.sass = cache[key]
    num_warps = art.metadata.get("num_warps") or num_warps
    p.num_warps = num_warps
    p.occ = cost.occupancy(p.sass.resources.registers, art.metadata.get("shared_bytes") or 0, num_warps,
                           shared_static=p.sass.resources.shared_static)  # fmt: skip
    per_prog = cost.warp_instructions_per_program(p.sass.loop_instructions, p.iterations, p.sass.outside_loop,
                                                  num_warps)  # fmt: skip
    work_ = cost.Work(programs, num_warps, per_prog, p.flops, p.bytes)
    p.preds = {dev: cost.predict(work_, p.occ, cost.DEVICES[dev]) for dev in DEVICES}
    return p


def _launch_labels(names: list[str]) -> list[str]:
    seen: dict[str, int] = defaultdict(int)
    out = []
    for n in names:
        seen[n] += 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def case_rows(c: OpCase, priced: list[Priced]) -> list[Row]:
    shape, rows = c.shape.label, []
    labels = _launch_labels([p.kernel for p in priced])
    for label, p in zip(labels, priced):
        if not p.ok:
            rows.append(Row(c.op, f"{c.provider}:{label}", c.mode, shape, RANK, c.m, "compile_failed", 1.0))
            continue
        rows += [Row(c.op, f"{c.provider}:{label}", c.mode, shape, RANK, c.m, k, float(v)) for k, v in p.metrics()]
    ok = [p for p in priced if p.ok]
    main = next((p for p in ok if p.kernel in WEIGHT_KERNELS), None)
    op_metrics: list[tuple[str, float]] = [("launches", len(priced))]
    if len(ok) < len(priced):
        op_metrics.append(("compile_failed", float(len(priced) - len(ok))))
    if main is not None:
        keep = ("registers", "spill_bytes", "shared_kb", "num_warps", "blocks_per_sm", "warps_per_sm", "programs",
                "waves", "loop_instructions", "loop_iterations", "loop_mma", "warp_inst_per_weight")  # fmt: skip
        op_metrics += [(k, v) for k, v in main.metrics() if k in keep]
    if len(ok) == len(priced):
        for dev in DEVICES:
            op_metrics += _pred_metrics(dev, [p.preds[dev] for p in ok])
    rows += [Row(c.op, c.provider, c.mode, shape, RANK, c.m, k, float(v)) for k, v in op_metrics]
    return rows


def reference_rows(shape: Shape, op: str, mode: str, m: int) -> list[Row]:
    """dense_bf16_gemm, nf4_read and roofline predictions for one op case."""
    rows = []
    s = 2 if OPS[op] != "none" else 1
    case = Case(op, shape, RANK, m, mode)
    for dev in DEVICES:
        d = cost.DEVICES[dev]
        if mode == "fwd":
            dense = cost.dense_gemm_s(s * m, shape.n, shape.k, d)  # both streams' rows through W
        else:
            dense = cost.dense_gemm_s(m, shape.k, shape.n, d)  # dX = dY W
        roof = counts.roofline_ms(case, d.tensor_flops_per_s / 1e12, d.hbm_bytes_per_s / 1e9) * 1e3
        rows.append(Row(op, "dense_bf16_gemm", mode, shape.label, RANK, m, f"predicted_us_{dev}", dense * 1e6))
        for provider, us in (("nf4_read", cost.nf4_read_s(shape.n, shape.k, d) * 1e6), ("roofline", roof)):
            rows.append(Row(op, provider, mode, shape.label, RANK, m, f"floor_us_{dev}", us))
    return rows


def anchor_rows(a, p: Priced) -> list[Row]:
    if not p.ok:
        return [Row(a.op, a.provider, "fwd", a.shape.label, "", a.m, "compile_failed", 1.0)]
    metrics = [(k.replace("predicted_launch_us", "predicted_us"), v) for k, v in p.metrics()]  # one launch = the op
    rows = [Row(a.op, a.provider, "fwd", a.shape.label, "", a.m, k, float(v)) for k, v in metrics]
    return rows + [Row(a.op, a.provider, "fwd", a.shape.label, "", a.m, "launches", 1.0)]


# ------------------------------------------------------------------------------------ one run
def run_one(arch: int, version: str | None, out_root: Path, shapes: list[Shape], ms: list[int], jobs: int,
            anchors: bool, plot: bool, log: Callable[[str], None], command: str) -> Path:  # fmt: skip
    """The report for one arch and one Triton version; returns its folder."""
    from .. import env as benv

    start = time.perf_counter()
    chain = toolchain(version)
    folder = out_root / f"static-sm{arch}-triton{chain.version}"
    log(f"== sm_{arch}, triton {chain.version} -> {folder}")
    cases = our_cases(shapes, ms, log)
    anchor_list, skipped = [], {}
    if anchors:
        from .anchors import anchor_launches

        anchor_list, skipped = anchor_launches(shapes, ms)
        for what, why in skipped.items():
            log(f"anchor skipped: {what}: {why}")
    specs = list(dict.fromkeys([s for c in cases for s in c.specs if s is not None] + [a.spec for a in anchor_list]))
    log(f"compiling {len(specs)} unique kernels for sm_{arch} with triton {chain.version} "
        f"({jobs} jobs; cached ones are free)")
    arts = compile_specs(specs, arch, chain.version, jobs=jobs, log=log)
    by_spec = dict(zip(specs, arts))
    failures = {a.spec.describe(): a.error for a in arts if not a.ok}
    for what, err in failures.items():
        log(f"compile failed: {what}: {err}")

    cache: dict = {}
    versions = benv.versions()
    vfield = f"triton={chain.version};torch={versions.get('torch')};bitsandbytes={versions.get('bitsandbytes')}"
    from .anchors import gemlite_version

    if anchors and gemlite_version():
        vfield += f";gemlite={gemlite_version()}"
    commit = benv.git_commit()
    if folder.exists():
        for old in (folder / "results.csv", folder / ENV_NAME):
            old.unlink(missing_ok=True)
    with Writer(folder, f"static-sm{arch}", vfield, commit, resume=False) as w:
        for i, c in enumerate(cases):
            priced = [
                PricedGemm.of(ln) if s is None else
                price(by_spec[s], chain, arch, ln.name, ln.programs, ln.options.get("num_warps", 4),
                      describe_launch(ln), cache)
                for ln, s in zip(c.launches, c.specs)
            ]  # fmt: skip
            w.write(case_rows(c, priced))
            if c.provider == "ours":
                w.write(reference_rows(c.shape, c.op, c.mode, c.m))
            if (i + 1) % 20 == 0 or i + 1 == len(cases):
                log(f"priced {i + 1}/{len(cases)} op cases")
        for a in anchor_list:
            work = dict(per_pass=a.weights_per_pass, per_elem=False, iterations=a.passes, flops=a.flops, bytes=a.bytes)
            w.write(anchor_rows(a, price(by_spec[a.spec], chain, arch, a.kernel, a.programs, a.num_warps, work, cache)))
    wall = time.perf_counter() - start
    environment = {
        "device": f"static-sm{arch}",
        "what": "static cost report: ahead-of-time compiles, SASS read, predicted (not measured) times",
        "arch": arch,
        "triton": chain.version,
        "ptxas": str(chain.ptxas(arch)),
        "cuobjdump": str(chain.cuobjdump),
        "versions": {**versions, "triton": chain.version, "gemlite": gemlite_version() or "absent"},
        "python": platform.python_version(),
        "commit": commit,
        "command": command,
        "wall_s": round(wall, 1),
        "kernels": len(specs),
        "kernels_from_cache": sum(1 for a in arts if a.cached),  # wall_s is seconds when all are cached
        "compile_failures": failures,
        "anchors_skipped": skipped,
        "anchor_configs": {f"{a.provider} {a.shape.name} M={a.m}": a.config for a in anchor_list},
        "shapes": [s.label for s in shapes],
        "tokens": ms,
        "rank": RANK,
        "devices": {
            k: {"sms": d.sms, "hbm_TBps": round(d.hbm_bytes_per_s / 1e12, 3), "hbm_source": d.hbm_source,
                "tensor_TFLOPs": round(d.tensor_flops_per_s / 1e12, 1), "tensor_source": d.tensor_source,
                "clock_GHz": d.clock_hz / 1e9, "issue_per_clock_per_sm": d.issue_per_clock}
            for k, d in cost.DEVICES.items()
        },  # fmt: skip
        "model": "predicted time per launch = max(bytes / HBM, FLOPs / tensor rate on the busiest SM, "
        "warp-instructions / issue rate on the busiest SM); an op sums its launches; no launch latency",
    }
    (folder / ENV_NAME).write_text(json.dumps(environment, indent=1, default=str) + "\n")
    if plot:
        try:
            for path in plot_static(folder):
                log(f"plot: {path}")
        except Exception as e:  # a plot must not lose the CSV
            log(f"plot failed: {type(e).__name__}: {e}")
    log(f"done in {wall:.0f} s: {folder}")
    return folder


# ------------------------------------------------------------------------------------ plot
PLOT_STYLE = {
    "ours": dict(color="#d62728", linewidth=2.4, marker="o", zorder=5),
    "ours_bf16_fused_down": dict(color="#ff7f0e", linewidth=1.5, marker="o", linestyle="--"),
    "gemlite": dict(color="#2ca02c", marker="^", linewidth=1.5),
    "dense_bf16_gemm": dict(color="#1f77b4", marker="v", linestyle=":"),
    "roofline": dict(color="black", linewidth=1.0, linestyle="-"),
    "nf4_read": dict(color="#7f7f7f", linewidth=1.0, linestyle="--"),
}


def plot_static(folder: Path, dev: str = "h200") -> list[Path]:
    """``static_<op>.png``: predicted time against M per shape (columns) and mode (rows), beside
    the floors (roofline of the op, NF4 read once), the dense bf16 GEMM and GemLite's base GEMM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import figure_legend

    from ..plots import load

    df = load(folder)
    df = df[df["metric"].isin([f"predicted_us_{dev}", f"floor_us_{dev}"])]
    paths = []
    for op in [o for o in OPS if o in set(df["op"])]:
        sub = df[df["op"] == op]
        shapes = list(dict.fromkeys(sub["shape"]))
        modes = [m for m in MODES if m in set(sub["mode"])]
        fig, axes = plt.subplots(len(modes), len(shapes), figsize=(5.2 * len(shapes), 3.6 * len(modes)),
                                 squeeze=False, sharex=True)  # fmt: skip
        for i, mode in enumerate(modes):
            for j, shape in enumerate(shapes):
                ax = axes[i][j]
                cell = sub[(sub["mode"] == mode) & (sub["shape"] == shape)]
                lines = {p: cell[cell["provider"] == p] for p in PLOT_STYLE if p in set(cell["provider"])}
                if mode == "fwd":
                    g = df[(df["op"] == "w4a16_gemm") & (df["shape"] == shape) & (df["provider"] == "gemlite")]
                    if not g.empty:
                        lines["gemlite"] = g
                for prov, line in lines.items():
                    line = line.assign(M=line["M"].astype(int)).sort_values("M")
                    label = prov + (" (base GEMM, one stream)" if prov == "gemlite" else "")
                    ax.plot(line["M"], line["p50"], label=label, **PLOT_STYLE[prov])
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ms = sorted({int(m) for m in cell["M"]})
                ax.set_xticks(ms, [str(m) for m in ms])
                ax.set_title(f"{shape}  {mode}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                if j == 0:
                    ax.set_ylabel(f"predicted us ({dev.upper()})")
                if i == len(modes) - 1:
                    ax.set_xlabel("M (tokens per stream)")
        figure_legend(fig, axes, max_columns=3)
        fig.suptitle(f"{op}: predicted time (static, {folder.name}), r={RANK}", fontsize=11)
        fig.tight_layout(rect=(0, 0.1, 1, 0.95))
        path = folder / f"static_{op}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")  # the legend spans wider than a single column
        plt.close(fig)
        paths.append(path)
    return paths


def run(archs: list[int], versions: list[str | None], out_root: Path, shapes: list[str] = SHAPE_NAMES,
        ms: list[int] = TOKENS, jobs: int = 2, anchors: bool = True, plot: bool = True,
        log: Callable[[str], None] = print, command: str | None = None) -> list[Path]:  # fmt: skip
    command = command or " ".join(["python -m benchmarks.static", *sys.argv[1:]])
    folders = []
    for version in versions:
        for arch in archs:
            folders.append(run_one(arch, version, out_root, [SHAPES[s] for s in shapes], list(ms), jobs, anchors,
                                   plot, log, command))  # fmt: skip
    return folders
