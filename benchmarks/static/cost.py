"""Occupancy and a predicted time per launch, from the compiled kernel and the launch's shape.

    predicted time of a launch = max(bytes / HBM bandwidth,
                                     FLOPs / tensor-core rate   (on the busiest SM),
                                     warp-instructions / issue rate (on the busiest SM))

No launch latency is added: the decode cells are timed under CUDA-graph replay (benchmarks/README),
and an op's launches are summed as if back to back. Each op row also carries ``launches`` so a
reader can add 2-4 us per launch for eager mode.

The busiest SM: programs are spread evenly, so one SM runs ``ceil(programs / SMs)`` of them; it
issues at most ``min(4, resident warps)`` warp-instructions per clock (4 schedulers, one warp
issues at most one instruction per clock) and owns 1/132 of the tensor-core rate. This is how a
64-program grid (half the GPU idle) and a one-warp program show up in the prediction. HBM
bandwidth is taken as reachable by any grid (optimistic for small grids).

Every constant below names its source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import counts


@dataclass(frozen=True)
class Device:
    name: str
    sms: int
    hbm_bytes_per_s: float
    tensor_flops_per_s: float
    clock_hz: float
    hbm_source: str
    tensor_source: str
    # Hopper (sm_90) per-SM limits: CUDA C Programming Guide, "Compute capabilities" table for 9.0.
    regs_per_sm: int = 65536
    regs_per_subpartition: int = 16384  # 4 sub-partitions (schedulers) per SM
    reg_alloc_unit: int = 256  # registers per warp are allocated in units of 256 (8 per thread)
    smem_per_sm: int = 228 * 1024
    smem_per_block_max: int = 227 * 1024
    smem_reserved_per_block: int = 1024  # the driver's per-block reservation (cuobjdump: SHARED:1024)
    threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    issue_per_clock: int = 4  # warp-instructions per clock per SM (4 schedulers); kernel-notes

    @property
    def issue_per_s(self) -> float:
        """Warp-instructions per second over the whole GPU."""
        return self.issue_per_clock * self.clock_hz * self.sms


# H200: both rates measured on the project's H200 (kernel-notes, "Limits on an H200"): a
# device-to-device copy at about 4.3 TB/s (bytes read + written; datasheet 4.8 TB/s HBM3e) and a
# bf16 8192^3 GEMM at about 790 TFLOP/s (datasheet 989 dense). Clock: 1.98 GHz boost (datasheet;
# kernel-notes). 132 SMs.
H200 = Device(
    name="H200", sms=132, hbm_bytes_per_s=4.3e12, tensor_flops_per_s=790e12, clock_hz=1.98e9,
    hbm_source="measured copy 4.3 TB/s (kernel-notes; datasheet 4.8 TB/s)",
    tensor_source="measured bf16 GEMM 790 TFLOP/s (kernel-notes; datasheet 989)",
)  # fmt: skip

# H100 SXM: datasheet 3.35 TB/s HBM3 and 989 TFLOP/s dense bf16, derated by the H200's measured /
# datasheet ratios (4.3 / 4.8 = 0.90 for copies, 790 / 989 = 0.80 for GEMMs): same GH100 die,
# SM count, boost clock and 700 W limit, so the GEMM rate carries over as is, and a copy reaches
# the same fraction of its (slower) HBM3. Derated figures, not measurements.
_COPY_DERATE = 4.3 / 4.8
_GEMM_DERATE = 790 / 989
H100 = Device(
    name="H100", sms=132, hbm_bytes_per_s=3.35e12 * _COPY_DERATE, tensor_flops_per_s=989e12 * _GEMM_DERATE,
    clock_hz=1.98e9,
    hbm_source="datasheet 3.35 TB/s x 0.896 (the H200's measured/datasheet copy ratio) = 3.0 TB/s",
    tensor_source="datasheet 989 TFLOP/s x 0.80 (the H200's measured/datasheet GEMM ratio) = 790 TFLOP/s",
)  # fmt: skip

DEVICES = {"h100": H100, "h200": H200}


# ------------------------------------------------------------------------------------ occupancy
@dataclass(frozen=True)
class Occupancy:
    blocks: int  # resident blocks (programs) per SM
    warps: int
    limiter: str  # "registers", "shared", "threads", "blocks", or "none fits"
    smem_per_block: int


def occupancy(registers: int, shared_dynamic: int, num_warps: int, dev: Device = H200,
              shared_static: int = 0) -> Occupancy:  # fmt: skip
    """Resident blocks per SM from registers per thread, shared memory per block and warps.

    Registers: a warp takes ``ceil(32 * regs / 256) * 256`` registers from one sub-partition's
    16K; warps per SM = 4 * (16384 // that). Shared: ``dynamic + max(static, 1 KB)`` per block (the
    driver reserves 1 KB per block; Triton's cubins declare exactly that 1 KB as static) out of
    228 KB. Threads: 2048. Blocks: 32.
    """
    per_warp = math.ceil(32 * max(registers, 1) / dev.reg_alloc_unit) * dev.reg_alloc_unit
    warps_by_regs = 4 * (dev.regs_per_subpartition // per_warp)
    smem = shared_dynamic + max(shared_static, dev.smem_reserved_per_block)
    limits = {
        "registers": warps_by_regs // num_warps,
        "shared": dev.smem_per_sm // smem if smem - dev.smem_reserved_per_block <= dev.smem_per_block_max else 0,
        "threads": dev.threads_per_sm // (32 * num_warps),
        "blocks": dev.max_blocks_per_sm,
    }
    limiter = min(limits, key=lambda k: (limits[k], list(limits).index(k)))
    blocks = limits[limiter]
    return Occupancy(blocks, blocks * num_warps, limiter if blocks else "none fits", smem)


# ------------------------------------------------------------------------------------ time
@dataclass(frozen=True)
class Work:
    """What one launch does: its grid, its instructions, its FLOPs and bytes."""

    programs: int
    num_warps: int
    warp_inst_per_program: float
    flops: float
    bytes: float


@dataclass(frozen=True)
class Prediction:
    hbm_s: float
    tensor_s: float
    issue_s: float
    waves: int

    @property
    def floors(self) -> dict[str, float]:
        return {"hbm": self.hbm_s, "tensor": self.tensor_s, "issue": self.issue_s}

    @property
    def time_s(self) -> float:
        return max(self.hbm_s, self.tensor_s, self.issue_s)

    @property
    def bound(self) -> str:
        f = self.floors
        return max(f, key=f.get)


def predict(work: Work, occ: Occupancy, dev: Device = H200) -> Prediction:
    """The three floors of one launch on ``dev`` (see the module docstring)."""
    if work.programs <= 0:
        return Prediction(0.0, 0.0, 0.0, 0)
    blocks = max(occ.blocks, 1)  # a kernel that fits nowhere does not launch; keep the arithmetic finite
    per_sm = math.ceil(work.programs / dev.sms)
    resident_warps = min(per_sm, blocks) * work.num_warps
    rate = min(dev.issue_per_clock, resident_warps) * dev.clock_hz
    issue = per_sm * work.warp_inst_per_program / rate
    tensor = per_sm * (work.flops / work.programs) / (dev.tensor_flops_per_s / dev.sms)
    hbm = work.bytes / dev.hbm_bytes_per_s
    waves = math.ceil(work.programs / (dev.sms * blocks))
    return Prediction(hbm, tensor, issue, waves)


def warp_instructions_per_program(loop_instructions: int, iterations: int, outside_loop: int, num_warps: int) -> float:
    """Whole-program warp-instructions: loop body x iterations + the code outside it once, x warps."""
    return float((loop_instructions * iterations + outside_loop) * num_warps)


# ------------------------------------------------------------------------------------ references
def dense_gemm_s(m: int, n: int, k: int, dev: Device, act_bytes: int = 2) -> float:
    """A dense bf16 GEMM [m, k] x [k, n]: max(FLOPs / GEMM rate, (A + W + C bytes) / bandwidth)."""
    flops = 2.0 * m * n * k
    moved = act_bytes * (m * k + n * k + m * n)
    return max(flops / dev.tensor_flops_per_s, moved / dev.hbm_bytes_per_s)


def nf4_read_s(n: int, k: int, dev: Device) -> float:
    """Reading an NF4 weight once (double quant, blocksize 64) at the copy bandwidth."""
    return counts.nf4_bytes(n, k) / dev.hbm_bytes_per_s
