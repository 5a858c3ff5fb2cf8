"""The tolerance rule for every matmul path (after flash-attention's tests).

A result computed at an input precision is compared with a float64 reference computed from the
same (rounded) inputs. Its error may be at most twice the error of the same computation done by
PyTorch at that precision, plus a small absolute term:

* half a unit in the last place of the result's dtype at the reference's largest magnitude: any
  correctly rounded result can be off by that much, and on tiny tensors (hypothesis draws N = 2)
  PyTorch's own error is a single sample that may happen to be far below it;
* 1e-5 of that magnitude, for fp32 accumulation-order differences when PyTorch's error is ~0.
"""

from __future__ import annotations

import torch

ATOL_REL = 1e-5


def max_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    diff = (a.double() - ref64).abs()
    assert torch.equal(torch.isnan(a), torch.isnan(ref64)), "NaN positions differ from the reference"
    inf = torch.isinf(ref64)
    assert torch.equal(a.double()[inf], ref64[inf]) and torch.equal(torch.isinf(a), inf), "Inf differs"
    finite = torch.isfinite(ref64)
    return diff[finite].max().item() if finite.any() else 0.0


def half_ulp(magnitude: float, dtype: torch.dtype) -> float:
    if magnitude == 0.0 or not dtype.is_floating_point:
        return 0.0
    info = torch.finfo(dtype)
    exponent = max(torch.tensor(magnitude).log2().floor().item(), torch.tensor(info.tiny).log2().item())
    return 0.5 * info.eps * 2.0**exponent


def assert_tolerance(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, name: str = "") -> None:
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = max_err(out, ref64)
    base = max_err(ref_lowp, ref64)
    finite = ref64[torch.isfinite(ref64)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    atol = half_ulp(scale, out.dtype) + ATOL_REL * max(scale, 1.0)
    assert err <= 2 * base + atol, (
        f"{name}: error {err:.3e} > 2 x torch error {base:.3e} + atol {atol:.1e} (|ref| max {scale:.3e}, {out.dtype})"
    )
