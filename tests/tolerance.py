"""The tolerance rule for every matmul path (after flash-attention's tests).

A result computed at an input precision is compared with a float64 reference; its error may be
at most twice the error of the same computation done by PyTorch at that precision, plus a small
absolute term for results whose low-precision error happens to be near zero.
"""

from __future__ import annotations

import torch

# Absolute slack, relative to the reference's magnitude: a few units of fp32 rounding.
ATOL_REL = 1e-5


def max_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    diff = (a.double() - ref64).abs()
    # NaN positions must agree; compare the rest.
    assert torch.equal(torch.isnan(a), torch.isnan(ref64)), "NaN positions differ from the reference"
    finite = torch.isfinite(ref64)
    assert torch.equal(a.double()[~finite & ~torch.isnan(ref64)], ref64[~finite & ~torch.isnan(ref64)]), "Inf differs"
    return diff[finite].max().item() if finite.any() else 0.0


def assert_tolerance(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, name: str = "") -> None:
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = max_err(out, ref64)
    base = max_err(ref_lowp, ref64)
    finite = ref64[torch.isfinite(ref64)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    atol = ATOL_REL * max(scale, 1.0)
    assert err <= 2 * base + atol, (
        f"{name}: error {err:.3e} > 2 x torch error {base:.3e} + atol {atol:.1e} (|ref| max {scale:.3e})"
    )
