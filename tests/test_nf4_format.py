"""NF4 storage format: bytes and values bit-identical to bitsandbytes (the oracle)."""

import itertools

import pytest
import torch

from flare_kernels import NF4Weight, quantize_nf4
from flare_kernels.format import VALID_BLOCKSIZES, dynamic_code, nf4_code

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (N, K): row-aligned blocks, blocks running across rows, odd element counts, a single row.
SHAPES = [(33, 192), (7, 4096), (5, 77), (96, 320), (1, 3), (130, 64)]


def bnb_quantize(w, blocksize, double_quant):
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def bnb_dequantize(q, state):
    """bitsandbytes' dequantization, through its generic implementation where its AVX-512 CPU
    kernel indexes scales per row: that kernel assumes K % blocksize == 0 and reads the wrong
    block otherwise (bitsandbytes 0.50.2), while its generic and CUDA paths use the flat layout."""
    n, k = state.shape
    if q.device.type == "cpu" and k % state.blocksize != 0:
        generic = pytest.importorskip("bitsandbytes.backends.default.ops")
        absmax = state.absmax
        if state.nested:
            absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return generic._dequantize_4bit_compute(
            q.view(torch.uint8).reshape(-1), absmax.float(), state.code, state.blocksize, state.shape, state.dtype
        )
    return bnbF.dequantize_4bit(q, state, quant_type="nf4").reshape(n, k)


def test_code_tables_match_bitsandbytes():
    assert torch.equal(nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbF.create_dynamic_map())


@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_quantize_bytes_and_dequantize_match_bitsandbytes(blocksize, double_quant, dtype, device):
    for n, k in SHAPES:
        w = (torch.randn(n, k) * 0.05).to(device, dtype)
        q, state = bnb_quantize(w, blocksize, double_quant)
        ours = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        where = f"shape {(n, k)}"
        assert torch.equal(ours.packed, q.view(torch.uint8).reshape(-1)), f"packed bytes differ, {where}"
        assert torch.equal(ours.absmax, state.absmax), f"absmax differs, {where}"
        if double_quant:
            assert torch.equal(ours.nested_absmax, state.state2.absmax), where
            assert torch.equal(ours.nested_code, state.state2.code), where
            assert torch.equal(ours.nested_offset, state.offset), where
        assert ours.dtype == state.dtype
        assert torch.equal(ours.dequantize(), bnb_dequantize(q, state)), f"dequantized values differ, {where}"


def test_double_quant_rounding_differs_from_nearest_like_bitsandbytes():
    """bitsandbytes' CPU 8-bit rounding goes through a 65536-bin table, which sends about 1 in
    10^4 values to the neighbour of the nearest code; byte identity needs the same rule."""
    w = torch.randn(2048, 256) * 0.05
    q, state = bnb_quantize(w, 32, True)
    ours = quantize_nf4(w, blocksize=32)
    assert torch.equal(ours.absmax, state.absmax)
    absmax = w.reshape(-1, 32).abs().amax(1)
    scaled = (absmax - absmax.mean()).reshape(-1, 256)
    scaled = (scaled / scaled.abs().amax(1, keepdim=True)).reshape(-1)
    code = dynamic_code()
    nearest = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    assert (nearest != ours.absmax).any(), "expected the lookup-table rule to differ somewhere from nearest"


def test_zero_block_and_constant_statistics():
    w = torch.zeros(4, 256)
    w[2:] = torch.randn(2, 256)
    for dq in (True, False):
        q, state = bnb_quantize(w, 64, dq)
        ours = quantize_nf4(w, blocksize=64, double_quant=dq)
        assert torch.equal(ours.packed, q.reshape(-1))
        assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(q, state, quant_type="nf4"))


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_from_bnb_shares_bytes_and_matches(blocksize, double_quant):
    lin = bnb.nn.Linear4bit(192, 67, bias=True, quant_type="nf4", compress_statistics=double_quant,
                            compute_dtype=torch.bfloat16, quant_storage=torch.uint8)  # fmt: skip
    lin.weight = bnb.nn.Params4bit(torch.randn(67, 192) * 0.05, requires_grad=False, quant_type="nf4",
                                   compress_statistics=double_quant, blocksize=blocksize)  # fmt: skip
    lin.weight = lin.weight._quantize("cpu") if not lin.weight.bnb_quantized else lin.weight
    before = bnb_dequantize(lin.weight.data, lin.weight.quant_state)
    for obj in (lin, lin.weight):
        w = NF4Weight.from_bnb(obj)
        assert w.packed.data_ptr() == lin.weight.data.data_ptr(), "from_bnb copied the packed bytes"
        assert w.absmax.data_ptr() == lin.weight.quant_state.absmax.data_ptr()
        assert w.shape == (67, 192) and w.blocksize == blocksize and w.nested == double_quant
        assert torch.equal(w.dequantize(), before)
    assert NF4Weight.from_bnb(lin).compute_dtype == torch.bfloat16


def _quantized_linear(n=64, k=128, dq=True, storage=torch.uint8):
    lin = bnb.nn.Linear4bit(k, n, bias=False, quant_type="nf4", compress_statistics=dq, quant_storage=storage)
    lin.weight = bnb.nn.Params4bit(torch.randn(n, k) * 0.05, requires_grad=False, quant_type="nf4",
                                   compress_statistics=dq, quant_storage=storage)  # fmt: skip
    lin.weight = lin.weight._quantize("cpu")
    return lin


def test_from_bnb_other_quant_storage():
    """FSDP-style quant_storage (bf16 words holding the packed bytes) is viewed as bytes, not copied."""
    lin = _quantized_linear(storage=torch.bfloat16)
    w = NF4Weight.from_bnb(lin)
    assert w.packed.data_ptr() == lin.weight.data.data_ptr()
    q = lin.weight.data.view(torch.uint8)
    assert torch.equal(w.dequantize(), bnbF.dequantize_4bit(q, lin.weight.quant_state, quant_type="nf4"))


def test_from_bnb_rejects_fp4():
    lin = bnb.nn.Linear4bit(128, 64, quant_type="fp4")
    lin.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="fp4")._quantize("cpu")
    with pytest.raises(ValueError, match="fp4"):
        NF4Weight.from_bnb(lin)


def test_from_bnb_rejects_unquantized():
    with pytest.raises(TypeError, match="quant_state"):
        NF4Weight.from_bnb(torch.nn.Linear(4, 4))


def test_from_bnb_after_bitsandbytes_cpu_repack():
    """After an eval-mode forward bitsandbytes holds its CPU-only layout (when the CPU has
    AVX512-BF16): from_bnb must not read it as NF4. It recovers the codes exactly and the bf16
    scales bitsandbytes computes with, warning about the rounding."""
    lin = _quantized_linear(n=64, k=128)
    original = NF4Weight.from_bnb(lin)  # wrapped first: keeps the original tensors alive
    codes_before = original.codes().clone()
    lin.eval()
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y_bnb = lin(x)
    if not getattr(lin.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack on this CPU (no AVX512-BF16)")
    # The earlier wrap still reads the original bytes.
    assert torch.equal(original.codes(), codes_before)
    with pytest.warns(UserWarning, match="repacked"):
        w = NF4Weight.from_bnb(lin)
    assert torch.equal(w.codes(), codes_before)
    assert not w.nested
    expected = original.absmax_fp32().to(torch.bfloat16).float()
    assert torch.equal(w.absmax_fp32(), expected)
    y_ours = x.float() @ w.dequantize(torch.float32).t()
    assert torch.allclose(y_ours, y_bnb.float(), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(blocksize=48), "blocksize"),
        (dict(blocksize=8192), "blocksize"),
    ],
)
def test_quantize_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_nf4(torch.randn(8, 64), **kwargs)


def test_quantize_rejects_bad_tensors():
    with pytest.raises(ValueError, match="2-D"):
        quantize_nf4(torch.randn(64))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        quantize_nf4(torch.randint(0, 3, (8, 64)))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.randn(0, 64))


def test_weight_constructor_checks_sizes():
    w = quantize_nf4(torch.randn(8, 64), double_quant=False)
    with pytest.raises(ValueError, match="packed has"):
        NF4Weight(w.packed[:-1], w.absmax, (8, 64), 64)
    with pytest.raises(ValueError, match="absmax"):
        NF4Weight(w.packed, w.absmax[:-1], (8, 64), 64)


def test_dtype_casts_keep_the_format_and_device_moves(device):
    w = quantize_nf4(torch.randn(16, 128) * 0.1)
    ref = w.dequantize()
    module = torch.nn.Module()
    module.w = w
    module.to(torch.bfloat16)
    module.half()
    assert w.absmax.dtype == torch.uint8 and w.nested_absmax.dtype == torch.float32
    assert w.code.dtype == torch.float32 and w.nested_offset.dtype == torch.float32
    assert torch.equal(w.dequantize(), ref)
    module.to(device)
    assert w.packed.device.type == device.type and w.nested_code.device.type == device.type
    assert torch.equal(w.dequantize().cpu(), ref)


def test_state_dict_round_trip():
    a = quantize_nf4(torch.randn(16, 128))
    b = quantize_nf4(torch.randn(16, 128))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.dequantize(), b.dequantize())
    assert set(a.state_dict()) == {"packed", "absmax", "code", "nested_absmax", "nested_code", "nested_offset"}


@pytest.mark.parametrize("bits", list(itertools.product([64, 128], [True, False])))
def test_bits_per_weight(bits):
    blocksize, dq = bits
    w = quantize_nf4(torch.randn(256, 4096), blocksize=blocksize, double_quant=dq)
    stored = sum(t.numel() * t.element_size() for t in (w.packed, w.absmax, w.nested_absmax) if t is not None)
    per_weight = 8 * stored / (256 * 4096)
    expected = 4 + (8 if dq else 32) / blocksize + (32 / (256 * blocksize) if dq else 0)
    assert per_weight == pytest.approx(expected, rel=1e-3)
