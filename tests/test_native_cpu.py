"""The native CPU backend (flare_kernels._C) against the reference, on every instruction set this
CPU supports (so the portable scalar path runs too).

Same rule as the Triton kernels (tests/test_kernels.py, the same cases): error against a float64
reference <= 2 x the error of the reference run by PyTorch at the input precision + a small atol.
Dequantization must be bit-identical to bitsandbytes. Skipped, with the reason, only when the
extension is not built (FLARE_KERNELS_REQUIRE_NATIVE=1 turns that skip into a failure, for CI).
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import flare_kernels
import cases
from cases import Case
from flare_kernels import NF4Weight, flare_lora_linear, native, quantize_nf4
from flare_kernels.format import VALID_BLOCKSIZES

try:  # the Triton kernels' cases (test_kernels imports the Triton launchers)
    from test_kernels import CASES
except ImportError:  # no Triton on this platform: the instruction-set cases below still run
    CASES = []

if not native.available():
    if os.environ.get("FLARE_KERNELS_REQUIRE_NATIVE") == "1":
        raise RuntimeError(f"FLARE_KERNELS_REQUIRE_NATIVE=1 but the native backend is unavailable: {native.load_error()}")
    pytest.skip(f"native CPU backend unavailable: {native.load_error()}", allow_module_level=True)

ISAS = native.supported_isas()
BEST = ISAS[-1]
BASE = Case()


# Every instruction set the extension was built with is a test id; those this CPU lacks skip by
# name, so a run on an AVX2-only CPU says which paths it did not exercise.
@pytest.fixture(params=native.built_isas())
def isa(request):
    if request.param not in ISAS:
        pytest.skip(f"this CPU has no {request.param} (it runs {', '.join(ISAS)})")
    with native.use_isa(request.param):
        yield request.param


def check_against_reference(case: Case, **kwargs):
    cases.check_against_reference(case, "cpu", "cpu", **kwargs)


# ---------------------------------------------------------------------------- the kernel cases
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_cases_match_reference(case):
    """The Triton kernels' cases, on the instruction set the backend picks by default."""
    with native.use_isa(BEST):
        check_against_reference(case)


# Shapes that reach each code path: decode rows (row-dot, 1-2 rows per stream), a few rows, more
# than 128 rows (two AMX row groups, an odd tile), K not a multiple of 64 (padded chunks), blocks
# of 32 (two tables per chunk), blocks running across rows, odd N (tile edges).
PATH_SHAPES = [
    dict(m=1, k=192, n=67),
    dict(m=2, k=128, n=33, source=False),
    dict(m=3, k=96, n=70, blocksize=32),
    dict(m=5, k=160, n=33, blocksize=128),
    dict(m=70, k=320, n=67, r=16, dropout=0.25),
    dict(m=17, k=256, n=40, blocksize=256, double_quant=False, fusion="mul"),
    # decode row-dots: two 32-value tables per chunk; pairs of chunks sharing one table register
    # across blocks (blocksize 128, 5 chunks: an unpaired last one); 2 and 4 rows in fp32 FMAs
    dict(m=1, k=256, n=35, blocksize=32),
    dict(m=2, k=320, n=19, blocksize=128, source=False),
    dict(m=2, k=192, n=21, r=16),
    # row 51's five blocks (255-259) run across two groups of the nested absmax (256 blocks each)
    dict(m=1, k=320, n=60),
    # a few rows on the AMX tiles, blocksize 64: chunk pairs and an unpaired last chunk
    dict(m=4, k=192, n=37),
    # an odd K: rows of W start in the middle of a byte (the element-by-element paths)
    dict(m=3, k=77, n=20, blocksize=32),
    # several row groups and column chunks of the AMX GEMMs (> 256 rows, > 512 outputs)
    dict(m=260, k=320, n=530, source=False),
]
PATH_CASES = [
    dataclasses.replace(BASE, dtype=dt, **shape)
    for dt in (torch.bfloat16, torch.float16, torch.float32)
    for shape in PATH_SHAPES
] + [
    dataclasses.replace(BASE, dtype=torch.bfloat16, adapter=torch.float32, m=3, fusion="matmul", seq=3),
    dataclasses.replace(BASE, dtype=torch.bfloat16, m=8, seq=4, fusion="cross_attention", dropout=0.2),
]


@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: c.id)
def test_every_instruction_set_matches_reference(case, isa):
    check_against_reference(case)


# ---------------------------------------------------------------------------- dequantization
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_dequantize_bit_identical_to_bitsandbytes(blocksize, double_quant, isa):
    bnb = pytest.importorskip("bitsandbytes")
    from test_nf4_format import SHAPES, bnb_dequantize, bnb_quantize

    for dname, dtype in DTYPES.items():
        for n, k in SHAPES:
            w = (torch.randn(n, k) * 0.05).to(dtype)
            q, state = bnb_quantize(w, blocksize, double_quant)
            expected = bnb_dequantize(q, state)
            ours = native.dequantize(NF4Weight.from_bnb(bnb.nn.Params4bit(q, requires_grad=False, quant_state=state)), dtype)
            assert torch.equal(bits(ours), bits(expected)), f"{isa} {dname} shape {(n, k)}"


@pytest.mark.parametrize("scale", [1e-6, 3e-5, 1e4], ids=["fp16-subnormal", "small", "large"])
def test_dequantize_extreme_scales(scale, isa):
    """Scales whose fp16 values are subnormal or near the top of the range round like torch."""
    w = quantize_nf4(torch.randn(24, 256) * scale, blocksize=64)
    for dtype in DTYPES.values():
        assert torch.equal(bits(native.dequantize(w, dtype)), bits(w.dequantize(dtype))), dtype


# ---------------------------------------------------------------------------- edge cases
def layer(m=5, k=128, n=33, r=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = quantize_nf4(torch.randn(n, k, generator=g) * 0.05)
    x = torch.randn(m, k, generator=g).to(dtype)
    src = torch.randn(m, k, generator=g).to(dtype)
    a = (torch.randn(r, k, generator=g) * 0.1).to(dtype)
    b = (torch.randn(n, r, generator=g) * 0.1).to(dtype)
    return w, x, src, a, b


def test_auto_picks_native_on_cpu_tensors():
    w, x, src, a, b = layer()
    with flare_kernels.use_backend("auto"):
        flare_lora_linear(x, w, a, b, 2.0, source=src)
    assert flare_kernels.last_backend() == "cpu"


def test_zero_rows(isa):
    w, _, _, a, b = layer()
    x = torch.randn(0, 128, requires_grad=True)
    a.requires_grad_(True)
    with flare_kernels.use_backend("cpu"):
        y, y_s = flare_lora_linear(x, w, a, b, 2.0, source=torch.randn(0, 128), return_source_output=True)
        assert y.shape == (0, 33) and y_s.shape == (0, 33)
        y.sum().backward()
    assert x.grad.shape == (0, 128)
    assert torch.count_nonzero(a.grad) == 0


@pytest.mark.parametrize("fusion", ["add_relu", "matmul"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_contiguous_inputs_give_the_same_bits(fusion, dtype, isa):
    w, _, _, a, b = layer(dtype=dtype)
    x_big = torch.randn(128, 2, 6).to(dtype)
    s_big = torch.randn(6, 3, 128).to(dtype)
    x = x_big[:, 0, :].t()  # strides (1, 12)
    src = s_big[:, 1, :]
    a_t = a.t().contiguous().t()
    assert not x.is_contiguous() and not src.is_contiguous() and not a_t.is_contiguous()
    with flare_kernels.use_backend("cpu"):
        y = flare_lora_linear(x, w, a_t, b, 2.0, source=src, fusion=fusion)
        y_ref = flare_lora_linear(x.contiguous(), w, a, b, 2.0, source=src.contiguous(), fusion=fusion)
    assert torch.equal(y, y_ref)


def test_nan_and_inf_propagate_as_in_the_reference(isa):
    cases.check_nan_and_inf_propagate("cpu", *layer(m=6))


def test_results_do_not_depend_on_threads_or_calls():
    w, x, src, a, b = layer(m=40, k=256, n=70, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    with flare_kernels.use_backend("cpu"):
        first = flare_lora_linear(x, w, a, b, 2.0, source=src)
        torch.set_num_threads(1)
        try:
            single = flare_lora_linear(x, w, a, b, 2.0, source=src)
        finally:
            torch.set_num_threads(threads)
        again = flare_lora_linear(x, w, a, b, 2.0, source=src)
    assert torch.equal(first, single) and torch.equal(first, again)


def test_float64_runs_the_reference():
    """No float64 kernel: the backend computes it as the reference does (gradient checks use it)."""
    w, x, src, a, b = layer()
    x, src, a, b = (t.double() for t in (x, src, a, b))
    a.requires_grad_(True)
    with flare_kernels.use_backend("cpu"):
        y = flare_lora_linear(x, w, a, b, 2.0, source=src)
        y.sum().backward()
        assert flare_kernels.last_backend() == "cpu"
    with flare_kernels.use_backend("torch"):
        a2 = a.detach().clone().requires_grad_(True)
        y_ref = flare_lora_linear(x, w, a2, b, 2.0, source=src)
        y_ref.sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(a.grad, a2.grad)


# ---------------------------------------------------------------------------- bad input, ISA choice
def weight_args(w):
    t = w.tensors()
    return [t.packed, t.absmax, t.code, t.nested_absmax, t.nested_code, t.nested_offset]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda o, w, x: o.linear(x.double(), None, *weight_args(w), 33, 64, None, None, None, 1.0), TypeError, "float32, float16 or bfloat16"),
        (lambda o, w, x: o.linear(x[:, :64], None, *weight_args(w), 33, 64, None, None, None, 1.0), ValueError, "packed must have"),
        (lambda o, w, x: o.linear(x, None, *weight_args(w), 33, 48, None, None, None, 1.0), ValueError, "blocksize must be a power of two"),
        (lambda o, w, x: o.linear(x, None, *weight_args(w)[:3], None, None, None, 33, 64, None, None, None, 1.0), TypeError, "absmax must be Float"),
        (lambda o, w, x: o.linear(x, None, *weight_args(w), 33, 64, torch.randn(32), None, None, 1.0), ValueError, r"bias must have shape \[33\]"),
        (lambda o, w, x: o.linear(x, None, *weight_args(w), 33, 64, None, torch.randn(5, 8), None, 1.0), ValueError, "z needs lora_B"),
        (lambda o, w, x: o.linear(x, x[:, :64], *weight_args(w), 33, 64, None, None, None, 1.0), ValueError, "source has"),
        (lambda o, w, x: o.lora_down(x, torch.randn(8, 64), None, None, None, 1.0, 1.0), ValueError, r"v must have shape \[8, 128\]"),
        (lambda o, w, x: o.lora_down(x, torch.randn(8, 128), torch.ones(5, 128), None, None, 1.0, 1.0), TypeError, "keep-mask"),
        (lambda o, w, x: o.lora_down(x, torch.randn(8, 128), torch.ones(4, 128, dtype=torch.bool), None, None, 1.0, 1.0), ValueError, r"mask must have shape \[5, 128\]"),
        (lambda o, w, x: o.linear_dx(torch.randn(5, 32), *weight_args(w), 33, 128, 64, None, None, None, 1.0), ValueError, "dy has 32 columns"),
        (lambda o, w, x: o.rank_reduce(torch.randn(4, 8), x, None, None, None, None, 1.0), ValueError, r"l must be \[5, r\]"),
    ],
    ids=["dtype", "in-features", "blocksize", "absmax-dtype", "bias-shape", "z-without-B", "source-features",
         "v-shape", "mask-dtype", "mask-shape", "dy-columns", "l-rows"],  # fmt: skip
)
def test_ops_reject_bad_input(call, error, match):
    w, x, _, _, _ = layer()
    with pytest.raises(error, match=match):
        call(native.ops(), w, x)


def test_isa_selection():
    assert native.isa() == BEST
    assert ISAS[0] == "scalar" and set(ISAS) <= set(native.built_isas())
    with native.use_isa("scalar"):
        assert native.isa() == "scalar"
    assert native.isa() == BEST
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        native.set_isa("sse9")
    assert native.isa() == BEST


def test_isa_from_environment():
    code = "from flare_kernels import native; print(native.isa())"
    env = dict(os.environ, FLARE_KERNELS_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


def test_build_matches_installed_torch():
    assert native.build_info()["torch"] == torch.__version__
