"""Code tables of bitsandbytes' 4-bit and 8-bit blockwise formats, and how values are rounded to them.

Two tables:

* NF4: 16 fp32 values, sorted, index = the 4-bit code stored in a nibble.
* The signed 8-bit "dynamic" map (256 sorted fp32 values in [-1, 1]) that double quantization uses
  for the NF4 absmax statistics.

Rounding a normalized value to a code index is device dependent in bitsandbytes 0.50, and bytes are
only identical if we follow the device's rule:

* NF4 (both devices): nearest code, midpoints computed in fp32, a value exactly on a midpoint goes
  to the lower code (the CUDA decision tree's constants equal these fp32 midpoints).
* 8-bit dynamic, CPU: a 65536-bin lookup table over [-1, 1] (not exact nearest: about 1 value in
  10^4 lands on the neighbour of the nearest code).
* 8-bit dynamic, CUDA: a 7-step pivot binary search followed by a midpoint test.
"""

from __future__ import annotations

import functools

import torch

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# Number of bins of bitsandbytes' CPU lookup table for 8-bit blockwise quantization.
_CPU_LUT_BINS = 65536


@functools.lru_cache(maxsize=None)
def _nf4_code_cpu() -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values as a fp32 tensor on ``device`` (a fresh copy for non-CPU devices)."""
    code = _nf4_code_cpu()
    return code if torch.device(device).type == "cpu" else code.to(device)


@functools.lru_cache(maxsize=None)
def _dynamic_code_cpu() -> torch.Tensor:
    # Signed dynamic map with 7 exponent bits: for exponent e = -6..0, 2**(e+6) linear steps in
    # [0.1, 1] (midpoints of a linspace), scaled by 10**e, both signs; plus 0 and 1.
    # Arithmetic in fp32 as bitsandbytes does, so the table is bit-identical to its QuantState.code.
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted fp32 values)."""
    code = _dynamic_code_cpu()
    return code if torch.device(device).type == "cpu" else code.to(device)


def round_to_nf4(scaled: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest NF4 value for values normalized to [-1, 1]."""
    code = nf4_code(scaled.device)
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints)


@functools.lru_cache(maxsize=4)
def _cpu_lut(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])
    bins = torch.arange(_CPU_LUT_BINS, dtype=torch.float32)
    grid = -1.0 + (2.0 * bins) / float(_CPU_LUT_BINS - 1)
    # Entry i is the number of midpoints strictly below the bin's value.
    return torch.searchsorted(midpoints, grid, side="left")


def round_to_code_cpu(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU rule: clamp to [-1, 1], map to one of 65536 bins, look the bin up."""
    lut = _cpu_lut(code.detach().float().cpu().contiguous().numpy().tobytes()).to(scaled.device)
    t = (scaled.clamp(-1.0, 1.0) + 1.0) * 0.5
    bins = (t * float(_CPU_LUT_BINS - 1) + 0.5).to(torch.int64)  # truncation, as a C cast
    return lut[bins]


def round_to_code_cuda(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CUDA rule: 7 halving steps from the middle of the table, then a midpoint test."""
    code = code.to(scaled.device, torch.float32)
    pivot = torch.full_like(scaled, 127, dtype=torch.int64)
    lower_p = torch.zeros_like(pivot)
    upper_p = torch.full_like(pivot, 255)
    lower = torch.full_like(scaled, -1.0)
    upper = torch.full_like(scaled, 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        right = scaled > val
        lower_p = torch.where(right, pivot, lower_p)
        lower = torch.where(right, val, lower)
        upper_p = torch.where(right, upper_p, pivot)
        upper = torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = torch.where(upper_p == 255, code[255], upper)
    lower = torch.where(lower_p == 0, code[0], lower)
    right = scaled > val
    up_choice = torch.where(scaled > (upper + val) * 0.5, upper_p, pivot)
    down_choice = torch.where(scaled < (lower + val) * 0.5, lower_p, pivot)
    return torch.where(right, up_choice, down_choice)
