"""The device's ceilings, measured in the same run as the cases they judge.

* copy: ``dst.copy_(src)`` of a large buffer, bytes read + written (an H200 gave about 4.3 TB/s,
  kernel-notes.md); sized well past the L2 cache.
* GEMM: a square bf16 ``torch.matmul`` on random data (8192^3 on a GPU: about 790 TFLOP/s on an
  H200; 2048^3 on a CPU).
The rates are the medians; their p20/p80 come from the p80/p20 times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .results import Row
from .timing import TimerConfig, Timing, bench


@dataclass(frozen=True)
class Roofline:
    copy_gbps: float
    gemm_tflops: float
    copy_bytes: int
    gemm_n: int
    copy_timing: Timing
    gemm_timing: Timing

    @property
    def ridge_flop_per_byte(self) -> float:
        return self.gemm_tflops * 1e12 / (self.copy_gbps * 1e9)

    def rows(self) -> list[Row]:
        def rate(amount: float, t: Timing, scale: float) -> tuple[float, float, float]:
            return amount / (t.p50 * 1e-3) / scale, amount / (t.p80 * 1e-3) / scale, amount / (t.p20 * 1e-3) / scale

        c = rate(2 * self.copy_bytes, self.copy_timing, 1e9)
        g = rate(2 * self.gemm_n**3, self.gemm_timing, 1e12)
        return [
            Row("roofline", "device", "copy", f"copy:{self.copy_bytes}B", "", "", "copy_gbps", *c),
            Row("roofline", "device", "gemm", f"gemm_bf16:{self.gemm_n}^3", "", "", "gemm_tflops", *g),
            Row("roofline", "device", "copy", f"copy:{self.copy_bytes}B", "", "", "time_ms",
                self.copy_timing.p50, self.copy_timing.p20, self.copy_timing.p80),  # fmt: skip
            Row("roofline", "device", "gemm", f"gemm_bf16:{self.gemm_n}^3", "", "", "time_ms",
                self.gemm_timing.p50, self.gemm_timing.p20, self.gemm_timing.p80),  # fmt: skip
        ]


def measure(dev: torch.device, cfg: TimerConfig, *, small: bool = False) -> Roofline:
    if dev.type == "cuda":
        copy_bytes, n = 2 * 2**30, 8192
    else:
        copy_bytes, n = (32 if small else 256) * 2**20, 1024 if small else 2048
    # More samples than a case gets: every roofline fraction of the run divides by these two numbers.
    cpu_cfg = TimerConfig(cpu_warmup=1, cpu_min_reps=5, cpu_max_reps=20, cpu_budget_s=2.0,
                          warmup_ms=cfg.warmup_ms, rep_ms=max(cfg.rep_ms, 200.0))  # fmt: skip

    src = torch.ones(copy_bytes // 2, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_t = bench(lambda: (lambda: dst.copy_(src)), dev, m=10**9, cfg=cpu_cfg)
    src = dst = None  # free the buffers before the GEMM operands
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn((n, n), generator=g, device=dev, dtype=torch.bfloat16)
    b = torch.randn((n, n), generator=g, device=dev, dtype=torch.bfloat16)
    gemm_t = bench(lambda: (lambda: torch.matmul(a, b)), dev, m=10**9, cfg=cpu_cfg)
    return Roofline(
        copy_gbps=2 * copy_bytes / (copy_t.p50 * 1e-3) / 1e9,
        gemm_tflops=2 * n**3 / (gemm_t.p50 * 1e-3) / 1e12,
        copy_bytes=copy_bytes,
        gemm_n=n,
        copy_timing=copy_t,
        gemm_timing=gemm_t,
    )
