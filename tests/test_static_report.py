"""The static cost report (benchmarks/static): SASS reading, occupancy, the prediction, the rows, the
README block. One small kernel is compiled for sm_90 with the installed Triton (seconds, cached)."""

import json
import math
import textwrap

import pytest
import torch

from benchmarks import counts, summary
from benchmarks.config import SHAPES, Case
from benchmarks.results import COLUMNS, Row, Writer, read
from benchmarks.static import cost, sass

triton = pytest.importorskip("triton")


# ------------------------------------------------------------------------------------ SASS
LISTING = textwrap.dedent(
    """
    	code for sm_90a
    		Function : k
    	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
            /*0000*/                   LDC R1, c[0x0][0x28] ;
            /*0010*/                   S2R R0, SR_TID.X ;
            /*0020*/                   NOP ;
            /*0030*/                   LDG.E R2, desc[UR4][R4.64] ;
            /*0040*/                   FADD R3, R3, R2 ;
            /*0050*/              @!P0 BRA 0x30 ;
            /*0060*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
            /*0070*/                   FMUL R9, R9, R9 ;
            /*0080*/                   IADD3 R5, R5, 0x1, RZ ;
            /*0090*/               @P1 BRA 0x60 ;
            /*00a0*/                   EXIT ;
            /*00b0*/                   BRA 0xb0;
    """
)


def test_sass_main_loop_is_the_widest_backward_branch():
    fn = sass.parse_sass(LISTING)["k"]
    assert len(fn) == 12
    loops = sass.loops(fn)
    # Two backward branches; the branch to itself after EXIT is padding, not a loop.
    assert [(lp.start, lp.end, lp.instructions) for lp in loops] == [(0x60, 0x90, 4), (0x30, 0x50, 3)]
    main = sass.main_loop(fn)
    assert main.opcodes == {"HMMA": 1, "FMUL": 1, "IADD3": 1, "BRA": 1}
    assert sass.body_instructions(fn) == 10  # 11 up to EXIT, minus the NOP


def test_res_usage_and_spill_logs_parse():
    res = sass.parse_res_usage(
        "Resource usage:\n Common:\n  GLOBAL:0\n Function k:\n  REG:252 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:776\n"
    )
    assert res["k"] == sass.Resources(252, 16, 1024, 0)
    log = "ptxas info : Function properties for k\n 16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n"
    assert sass.parse_spills(log) == (12, 8)


LOOP_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def loop_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n, BLOCK):
        acc += tl.load(x_ptr + i + offs, mask=i + offs < n, other=0.0)
    tl.store(y_ptr + offs, acc)


@triton.jit
def straight_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 2.0)
'''


def test_loop_of_a_compiled_kernel(tmp_path_factory):
    from benchmarks.static.compile import KernelSpec, compile_specs
    from benchmarks.static.toolchain import toolchain

    # A fixed folder name keeps the compile cache warm across runs (its key hashes the file).
    src = tmp_path_factory.getbasetemp().parent / "static-report-kernels" / "tiny_kernels.py"
    src.parent.mkdir(parents=True, exist_ok=True)
    if not src.exists() or src.read_text() != LOOP_KERNEL:
        src.write_text(LOOP_KERNEL)
    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    specs = [
        KernelSpec(f"{src}:loop_kernel", sig, {"BLOCK": 256}, {"x_ptr": 16, "y_ptr": 16}, {"num_warps": 2}),
        KernelSpec(f"{src}:straight_kernel", {k: v for k, v in sig.items() if k != "n"}, {"BLOCK": 256},
                   {"x_ptr": 16, "y_ptr": 16}, {"num_warps": 2}),
    ]  # fmt: skip
    arts = compile_specs(specs, 90, None, jobs=1)
    assert all(a.ok for a in arts), [a.error for a in arts]
    chain = toolchain(None)
    looped = sass.analyze(arts[0].cubin, chain.cuobjdump)
    straight = sass.analyze(arts[1].cubin, chain.cuobjdump)
    assert looped.loop is not None and straight.loop is None
    assert 0 < looped.loop.instructions < looped.body
    assert looped.loop.opcodes.get("LDG", 0) >= 1  # the load is inside the loop
    assert looped.resources.registers > 0 and looped.resources.stack == 0
    assert straight.loop_instructions == straight.body
    assert sass.analyze_cached(arts[0].cubin, chain.cuobjdump) == looped  # computed, then read back
    assert sass.analyze_cached(arts[0].cubin, chain.cuobjdump) == looped


# ------------------------------------------------------------------------------------ occupancy and time
@pytest.mark.parametrize(
    "regs, shared, warps, blocks, limiter",
    [
        (252, 69120, 4, 2, "registers"),  # 8064 -> 8192 regs/warp: 2 warps per scheduler = 8 warps
        (32, 0, 1, 32, "blocks"),  # 64 blocks by registers, 32 is the cap
        (128, 200 * 1024, 8, 1, "shared"),  # 2 by registers, 228K // 201K = 1 by shared memory
        (64, 0, 32, 1, "registers"),  # 2048 regs/warp -> 32 warps: one 1024-thread block fills the register file
        (24, 0, 4, 16, "threads"),  # 768 regs/warp -> 84 warps = 21 blocks by registers; 2048 threads = 16
    ],
)
def test_occupancy_by_hand(regs, shared, warps, blocks, limiter):
    occ = cost.occupancy(regs, shared, warps, shared_static=1024)
    assert (occ.blocks, occ.limiter) == (blocks, limiter)
    assert occ.warps == blocks * warps


def test_occupancy_none_fits_past_227_kb():
    assert cost.occupancy(32, 230 * 1024, 4).blocks == 0


def test_predicted_time_picks_the_largest_floor():
    dev = cost.H200
    occ = cost.occupancy(128, 0, 4)
    hbm = cost.predict(cost.Work(1320, 4, 100.0, 0.0, 4.3e9), occ, dev)
    assert hbm.bound == "hbm" and math.isclose(hbm.time_s, 1e-3)
    tensor = cost.predict(cost.Work(1320, 4, 100.0, 790e12 * 1e-3, 1.0), occ, dev)
    assert tensor.bound == "tensor" and math.isclose(tensor.time_s, 1e-3)
    # 64 programs of 4 warps (half the GPU idle): one program per SM issues 4 per clock.
    issue = cost.predict(cost.Work(64, 4, 4 * 1.98e9 * 1e-3, 1.0, 1.0), occ, dev)
    assert issue.bound == "issue" and math.isclose(issue.time_s, 1e-3) and issue.waves == 1
    # One-warp programs issue at most one instruction per clock each.
    one = cost.predict(cost.Work(132, 1, 1.98e9 * 1e-3, 0.0, 0.0), cost.occupancy(32, 0, 1), dev)
    assert math.isclose(one.issue_s, 1e-3)
    assert cost.predict(cost.Work(132 * 2 * 3, 4, 1, 0, 0), occ, dev).waves == math.ceil(792 / (132 * occ.blocks))


def test_h100_constants_are_the_derated_datasheet():
    assert math.isclose(cost.H100.hbm_bytes_per_s, 3.35e12 * 4.3 / 4.8)
    assert math.isclose(cost.H100.tensor_flops_per_s, 790e12)
    assert cost.H200.issue_per_s == 4 * 1.98e9 * 132


def test_dense_reference_and_nf4_read():
    dev = cost.H200
    assert math.isclose(cost.dense_gemm_s(4096, 4096, 4096, dev), 2 * 4096**3 / 790e12)
    assert math.isclose(cost.nf4_read_s(4096, 4096, dev), counts.nf4_bytes(4096, 4096) / 4.3e12)
    assert 1.8e-6 < cost.nf4_read_s(4096, 4096, dev) < 2.1e-6  # kernel-notes: about 1.9 to 2 us


# ------------------------------------------------------------------------------------ launches and rows
def test_describe_launch_counts_the_ops_flops():
    from benchmarks.static.report import describe_launch
    from flare_kernels.ops.plan import HOPPER, CallSpec, launch_plan

    # 96 rows on gate_up (224 programs): the one-pass fused forward (decode sizes and grids on half
    # the GPU split K; 128 rows and up take the dequant route)
    shape = SHAPES["llama3.1-8b.gate_up"]
    call = CallSpec(m=96, k=shape.k, n=shape.n, r=16, adapter_dtype=torch.bfloat16)
    [fwd] = launch_plan(call, HOPPER)
    work = describe_launch(fwd)
    assert work["flops"] == counts.flops(Case("flare_add_relu", shape, 16, 96, "fwd"))
    assert work["per_pass"] == fwd.constexprs["BLOCK_N"] * fwd.constexprs["BLOCK_K"] and not work["per_elem"]
    assert work["iterations"] == math.ceil(shape.k / fwd.constexprs["BLOCK_K"])
    # fp32 adapters unsplit (split over K the down-projection runs in the forward's own programs)
    down = next(ln for ln in launch_plan(CallSpec(m=96, k=shape.k, n=shape.n, adapter_dtype=torch.float32), HOPPER)
                if ln.name == "lora_down_kernel")  # fmt: skip
    assert describe_launch(down)["per_elem"]


def _priced(kernel="flare_fwd_kernel", regs=200, loop=1000, per_pass=4096):
    from benchmarks.static.compile import Artifact, KernelSpec
    from benchmarks.static.report import Priced

    art = Artifact(KernelSpec("m:k", {}), 90, "3.9.0", True, metadata={"shared_bytes": 65536, "num_warps": 4,
                                                                        "spill_stores": 0})  # fmt: skip
    loop_ = sass.Loop(0, 16 * loop, loop, {"HMMA": 8})
    k = sass.KernelSass(kernel, sass.Resources(regs, 0, 1024, 0), loop_, loop + 200)
    p = Priced(kernel, 64, 4, per_pass, kernel.startswith("lora"), 64, 1e9, 9e6, art, k)
    p.occ = cost.occupancy(regs, 65536, 4, shared_static=1024)
    per_prog = cost.warp_instructions_per_program(loop, 64, 200, 4)
    work = cost.Work(64, 4, per_prog, p.flops, p.bytes)
    p.preds = {d: cost.predict(work, p.occ, cost.DEVICES[d]) for d in ("h100", "h200")}
    return p


def test_case_rows_are_in_the_benchmark_schema(tmp_path):
    from benchmarks.static.report import OpCase, case_rows

    c = OpCase("flare_add_relu", "ours", SHAPES["llama3.1-8b.q"], "fwd", 1, [])
    rows = case_rows(c, [_priced("lora_down_kernel", loop=100, per_pass=8192), _priced()])
    with Writer(tmp_path, "static-sm90", "triton=3.9.0", "abc", resume=False) as w:
        w.write(rows)
    back = read(tmp_path / "results.csv")
    assert tuple(back[0]) == COLUMNS
    op = {r["metric"]: float(r["p50"]) for r in back if r["provider"] == "ours"}
    assert op["launches"] == 2 and op["registers"] == 200
    assert math.isclose(op["warp_inst_per_weight"], 1000 * 4 / 4096, rel_tol=1e-5)
    per_launch = {r["metric"] for r in back if r["provider"] == "ours:lora_down_kernel"}
    assert "warp_inst_per_elem" in per_launch and "warp_inst_per_weight" not in per_launch
    launch_sum = sum(float(r["p50"]) for r in back if r["metric"] == "predicted_launch_us_h200")
    assert not [r for r in back if r["provider"].startswith("ours:") and r["metric"].startswith("predicted_us")]
    assert math.isclose(op["predicted_us_h200"], launch_sum, rel_tol=1e-5)
    shares = [op[f"bound_{k}_h200"] for k in ("hbm", "tensor", "issue")]
    assert math.isclose(sum(shares), 1.0, rel_tol=1e-6)


def test_summary_block_for_a_static_folder(tmp_path):
    folder = tmp_path / "static-sm90-triton3.9.0"
    shape = "llama3.1-8b.q:4096x4096"
    with Writer(folder, "static-sm90", "triton=3.9.0", "abc", resume=False) as w:
        base = dict(registers=252, spill_bytes=0, warp_inst_per_weight=1.09, programs=64, waves=1, launches=1,
                    predicted_us_h100=9.5, predicted_us_h200=9.0, bound_hbm_h200=0.0, bound_tensor_h200=0.0,
                    bound_issue_h200=1.0)  # fmt: skip
        w.write([Row("flare_add_relu", "ours", "fwd", shape, 16, 1, k, v) for k, v in base.items()])
        w.write([Row("flare_add_relu", "roofline", "fwd", shape, 16, 1, "floor_us_h200", 2.0)])
        anchor = dict(registers=64, warp_inst_per_weight=0.26, programs=8192, predicted_us_h200=4.1)
        w.write([Row("w4a16_gemm", "gemlite", "fwd", shape, "", 1, k, v) for k, v in anchor.items()])
    (folder / "environment.json").write_text(json.dumps({"arch": 90, "triton": "3.9.0", "commit": "abc"}))
    text = summary.render(tmp_path)
    assert "Static cost report, sm_90, triton 3.9.0" in text and "predicted" in text
    assert "| flare_add_relu | fwd | 1 | ours | 252 | 0 | 1.09 | 64 | 1 | 9.5 | 9.0 | issue | 2.0 |  |" in text
    assert "| w4a16_gemm | fwd | 1 | gemlite | 64 |  | 0.26 | 8192 |" in text
    assert summary.result_dirs(tmp_path) == []  # never rendered as a measured device
    assert summary.result_dirs(tmp_path, static=True) == [folder]
