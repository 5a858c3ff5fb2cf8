"""The op layer: backend selection, torch.library registration, bad input, edge cases."""

import math
import os
import subprocess
import sys

import pytest
import torch

import flare_kernels
from flare_kernels import FlareLinear4bit, flare_lora_linear, quantize_nf4
from flare_kernels.ops import backend
from flare_kernels.ops.custom_ops import flare_lora_fwd
import cases
from tolerance import assert_tolerance

# Every backend this machine can run: Triton (compiled or interpreted), native CPU when built, the reference.
KERNEL_BACKENDS = ["triton", "torch"] + (["cpu"] if backend.native_available() else [])


def layer_inputs(device, m=5, k=128, n=33, r=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = quantize_nf4((torch.randn(n, k, generator=g) * 0.05).to(device))
    x = torch.randn(m, k, generator=g).to(device, dtype)
    src = torch.randn(m, k, generator=g).to(device, dtype)
    a = (torch.randn(r, k, generator=g) * 0.1).to(device)
    b = (torch.randn(n, r, generator=g) * 0.1).to(device)
    return w, x, src, a, b


# ---------------------------------------------------------------------------- backends
def test_backend_setting_and_last_backend(device):
    w, x, src, a, b = layer_inputs(device)
    with flare_kernels.use_backend("torch"):
        assert flare_kernels.get_backend() == "torch"
        flare_lora_linear(x, w, a, b, 2.0, source=src)
        assert flare_kernels.last_backend() == "torch"
    flare_lora_linear(x, w, a, b, 2.0, source=src)  # auto
    expected = "triton" if device.type == "cuda" else ("cpu" if backend.native_available() else "torch")
    assert flare_kernels.last_backend() == expected
    with pytest.raises(ValueError, match="FLARE_KERNELS_BACKEND"):
        flare_kernels.set_backend("cuda")


def test_backend_from_environment():
    code = "import flare_kernels; print(flare_kernels.get_backend())"
    env = dict(os.environ, FLARE_KERNELS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["FLARE_KERNELS_BACKEND"] = "fast"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "FLARE_KERNELS_BACKEND must be one of" in bad.stderr


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(backend, "TRITON_INTERPRETED", False)
    w, x, src, a, b = layer_inputs("cpu")
    with flare_kernels.use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        flare_lora_linear(x, w, a, b, 2.0, source=src)


def test_cpu_backend_needs_the_native_extension(monkeypatch):
    monkeypatch.setattr(backend, "native_available", lambda: False)
    w, x, src, a, b = layer_inputs("cpu")
    with flare_kernels.use_backend("cpu"), pytest.raises(RuntimeError, match="not built"):
        flare_lora_linear(x, w, a, b, 2.0)


# ---------------------------------------------------------------------------- bad input
def bad_call(device, **overrides):
    w, x, src, a, b = layer_inputs(device)
    kwargs = dict(x=x, weight=w, lora_A=a, lora_B=b, scaling=2.0, source=src, fusion="add_relu")
    kwargs.update(overrides)
    return flare_lora_linear(**kwargs)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda d: dict(source=torch.randn(4, 128, device=d)), ValueError, r"source must have the shape of x.*\(4, 128\).*\(5, 128\)"),
        (lambda d: dict(x=torch.randn(5, 96, device=d), source=None), ValueError, r"x has 96 features \(shape \(5, 96\)\).*in_features=128"),
        (lambda d: dict(source=torch.randn(5, 128, device=d, dtype=torch.float16)), TypeError, "source dtype"),
        (lambda d: dict(x=torch.randint(0, 5, (5, 128), device=d), source=None), TypeError, "x must be float"),
        (lambda d: dict(lora_A=torch.randn(8, 128, device="meta")), ValueError, "lora_A is on meta"),
        (lambda d: dict(source=torch.randn(5, 128, device="meta")), ValueError, "source is on meta"),
        (lambda d: dict(fusion="concat"), ValueError, "unknown fusion 'concat'"),
        (lambda d: dict(lora_A=torch.randn(0, 128, device=d), lora_B=torch.randn(33, 0, device=d)), ValueError, r"rank r must be > 0.*\(0, 128\)"),
        (lambda d: dict(lora_A=torch.randn(8, 64, device=d)), ValueError, r"lora_A must be \[r, in_features\].*\(8, 64\)"),
        (lambda d: dict(lora_B=torch.randn(32, 8, device=d)), ValueError, r"lora_B must be \[out_features, r\] = \[33, 8\].*\(32, 8\)"),
        (lambda d: dict(lora_B=torch.randn(33, 8, device=d, dtype=torch.float64)), TypeError, "share a dtype"),
        (lambda d: dict(bias=torch.randn(32, device=d)), ValueError, r"bias must be \[out_features\] = \[33\]"),
        (lambda d: dict(dropout_p=1.0), ValueError, "dropout_p"),
        (lambda d: dict(scaling=float("nan")), ValueError, "scaling"),
        (lambda d: dict(fusion="cross_attention"), ValueError, "takes 6 parameter tensors, got 0"),
        (lambda d: dict(fusion="cross_attention", fusion_params=[torch.randn(4, 4, device=d), torch.randn(4, device=d)] * 3), ValueError, "shapes"),
        (lambda d: dict(dropout_p=0.1, dropout_mask=torch.ones(5, 128, device=d)), ValueError, "dropout_mask must be a bool tensor"),
        (lambda d: dict(weight=torch.randn(33, 128, device=d)), TypeError, "weight must be an NF4Weight"),
    ],
    ids=[
        "source-shape", "feature-size", "source-dtype", "int-x", "device-lora_A", "device-source", "fusion-name",
        "rank-0", "lora_A-shape", "lora_B-shape", "adapter-dtypes", "bias-shape", "dropout-p", "scaling-nan",
        "cross-attention-params", "cross-attention-shapes", "mask-dtype", "dense-weight",
    ],
)
def test_bad_input_raises_clear_errors(make, error, match, device):
    with pytest.raises(error, match=match):
        bad_call(device, **make(device))


def test_fp4_bitsandbytes_weight_is_rejected():
    bnb = pytest.importorskip("bitsandbytes")
    lin = bnb.nn.Linear4bit(128, 33, quant_type="fp4")
    lin.weight = bnb.nn.Params4bit(torch.randn(33, 128), requires_grad=False, quant_type="fp4")._quantize("cpu")
    with pytest.raises(ValueError, match="fp4"):
        bad_call("cpu", weight=lin)
    with pytest.raises(ValueError, match="fp4"):
        FlareLinear4bit.from_bnb(lin)


def test_bitsandbytes_weight_accepted_directly():
    bnb = pytest.importorskip("bitsandbytes")
    w, x, src, a, b = layer_inputs("cpu")
    lin = bnb.nn.Linear4bit(128, 33, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(33, 128), requires_grad=False, quant_type="nf4")._quantize("cpu")
    y = bad_call("cpu", weight=lin)
    y_ref = bad_call("cpu", weight=flare_kernels.NF4Weight.from_bnb(lin))
    assert torch.equal(y, y_ref)


# ---------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_zero_rows(name, device):
    w, _, _, a, b = layer_inputs(device)
    x = torch.randn(0, 128, device=device, requires_grad=True)
    a.requires_grad_(True)
    with flare_kernels.use_backend(name):
        y, y_s = flare_lora_linear(x, w, a, b, 2.0, source=torch.randn(0, 128, device=device), return_source_output=True)
        assert y.shape == (0, 33) and y_s.shape == (0, 33)
        y.sum().backward()
    assert x.grad.shape == (0, 128)
    assert torch.count_nonzero(a.grad) == 0


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("fusion", ["add_relu", "matmul"])
def test_non_contiguous_inputs(name, fusion, device):
    """Strided views give what their contiguous copies give: bit-equal on the kernels, by the
    tolerance rule on the reference."""
    w, _, _, a, b = layer_inputs(device)
    x_big = torch.randn(128, 2, 6, device=device)  # x[l] = x_big[:, 0, l] -> strides (1, 12)
    s_big = torch.randn(6, 3, 128, device=device)
    x = x_big[:, 0, :].t()
    src = s_big[:, 1, :]
    a_t = a.t().contiguous().t()  # [r, K] with strides (1, r)
    assert not x.is_contiguous() and not src.is_contiguous() and not a_t.is_contiguous()
    with flare_kernels.use_backend(name):
        y = flare_lora_linear(x, w, a_t, b, 2.0, source=src, fusion=fusion)
        y_ref = flare_lora_linear(x.contiguous(), w, a.contiguous(), b, 2.0, source=src.contiguous(), fusion=fusion)
    if name != "torch":
        # The kernels read strided rows into the same registers (Triton) or copy them to unit stride
        # first (native): bit-equal by construction.
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        return
    # The reference hands strided operands to BLAS, which picks its kernel and summation order by
    # the strides (1e-6..1e-5 apart on an AVX2 EPYC): the tolerance rule against float64, with the
    # contiguous run as PyTorch's own error.
    with flare_kernels.use_backend("torch"):
        y64 = flare_lora_linear(x.double(), w, a.double(), b.double(), 2.0, source=src.double(), fusion=fusion)
    assert_tolerance(y, y64, y_ref, "strided y")


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_nan_and_inf_propagate_as_in_the_reference(name, device):
    cases.check_nan_and_inf_propagate(name, *layer_inputs(device, m=6))


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_dropout_masks_are_drawn_per_stream_with_keep_probability(name, device):
    """Masks drawn by the op (p > 0, no masks given): y = drop_s(1) + drop_t(1) takes the values
    0, 1/(1-p), 2/(1-p) with probabilities p^2, 2p(1-p), (1-p)^2."""
    k, r, p = 64, 16, 0.4
    w = quantize_nf4(torch.zeros(r, k, device=device))
    a = torch.eye(r, k, device=device)
    b = torch.eye(r, device=device)
    x = torch.ones(128, k, device=device)
    with flare_kernels.use_backend(name):
        y = flare_lora_linear(x, w, a, b, 1.0, source=x.clone(), fusion="add", dropout_p=p)
    kept = 1 / (1 - p)
    values = torch.round(y / kept).long().flatten()
    for v, prob in ((0, p * p), (1, 2 * p * (1 - p)), (2, (1 - p) ** 2)):
        frac = (values == v).float().mean().item()
        assert abs(frac - prob) < 5 * math.sqrt(prob * (1 - prob) / values.numel()), (v, frac, prob)
    torch.testing.assert_close(y, torch.round(y / kept) * kept)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_bias_gradient_when_trainable(name, device):
    w, x, src, a, b = layer_inputs(device)
    bias = torch.randn(33, device=device, requires_grad=True)
    dy = torch.randn(5, 33, device=device)
    with flare_kernels.use_backend(name):
        flare_lora_linear(x, w, a, b, 2.0, source=src, bias=bias).backward(dy)
    torch.testing.assert_close(bias.grad, dy.sum(0))


# ---------------------------------------------------------------------------- torch.library
def op_args(device, fusion="add_relu", r=8, requires_grad=True):
    w, x, src, a, b = layer_inputs(device, r=r)
    t = w.tensors()
    params = []
    if fusion == "cross_attention":
        params = [torch.randn(r, r, device=device) * 0.3 if i % 2 == 0 else torch.randn(r, device=device) for i in range(6)]
    x.requires_grad_(requires_grad)
    a.requires_grad_(requires_grad)
    b.requires_grad_(requires_grad)
    for p in params:
        p.requires_grad_(requires_grad)
    return (x, src, t.packed, t.absmax, t.code, t.nested_absmax, t.nested_code, t.nested_offset, t.out_features,
            t.blocksize, None, a, b, 2.0, fusion, params, 0.0, None, None, x.shape[0], True, None, None)  # fmt: skip


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("fusion", ["add_relu", "cross_attention"])
def test_opcheck(name, fusion, device):
    """Schema, fake implementation and autograd registration of the forward op (and through its
    backward, the backward op)."""
    with flare_kernels.use_backend(name):
        torch.library.opcheck(flare_lora_fwd, op_args(device, fusion))


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_matches_eager(name, device):
    torch._dynamo.reset()
    layer = FlareLinear4bit.from_linear(torch.nn.Linear(128, 33), r=8, fusion="add_relu").to(device)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(2, 5, 128, device=device)
    src = torch.randn(2, 5, 128, device=device)
    with flare_kernels.use_backend(name):
        y_eager = layer(x, src)
        y_eager.square().sum().backward()
        grads_eager = [p.grad.clone() for p in (layer.lora_A.weight, layer.lora_B.weight)]
        layer.zero_grad()
        compiled = torch.compile(layer, fullgraph=True)
        y = compiled(x, src)
        y.square().sum().backward()
        assert flare_kernels.last_backend() == name
    torch.testing.assert_close(y, y_eager)
    for g, ge in zip((layer.lora_A.weight.grad, layer.lora_B.weight.grad), grads_eager):
        torch.testing.assert_close(g, ge)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("fusion", ["add_relu", "cross_attention"])
def test_opcheck_backward(name, fusion, device):
    from flare_kernels.ops.custom_ops import flare_lora_bwd

    args = op_args(device, fusion, requires_grad=False)
    x, src, packed, absmax, code, nabs, ncode, noff, n, bs, bias, a, b, s, fu, params, p, mt, ms, L, so, sb, fm = args
    with flare_kernels.use_backend(name):
        _, _, s_t, s_s = flare_lora_fwd(*args)
        dy = torch.randn(x.shape[0], n, device=device)
        bwd_args = (dy, x, src, packed, absmax, code, nabs, ncode, noff, n, bs, a, b, s, fu, params, p, mt, ms,
                    s_t, s_s, L, True, True, True, True, None)  # fmt: skip
        torch.library.opcheck(flare_lora_bwd, bwd_args)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_dropout_zero_is_exactly_no_dropout_and_masks_are_reusable(name, device):
    w, x, src, a, b = layer_inputs(device)
    mask_t = torch.rand(x.shape, device=device) > 0.3
    mask_s = torch.rand(x.shape, device=device) > 0.3
    with flare_kernels.use_backend(name):
        assert torch.equal(flare_lora_linear(x, w, a, b, 2.0, source=src, dropout_p=0.0),
                           flare_lora_linear(x, w, a, b, 2.0, source=src))  # fmt: skip
        runs = [flare_lora_linear(x, w, a, b, 2.0, source=src, dropout_p=0.3, dropout_mask=mask_t,
                                  source_dropout_mask=mask_s) for _ in range(2)]  # fmt: skip
        fresh = flare_lora_linear(x, w, a, b, 2.0, source=src, dropout_p=0.3)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], fresh)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("fusion", ["add_relu", "cross_attention"])
def test_saved_for_backward_holds_no_dequantized_weight(name, fusion, device):
    """Autograd keeps the activations, masks, rank-r intermediates, adapter and the 4-bit weight as
    stored: nothing of the size of a dense W0 [N, K] in a floating dtype."""
    n, k, r, m = 96, 128, 8, 5
    layer = FlareLinear4bit.from_linear(torch.nn.Linear(k, n), r=r, fusion=fusion, lora_dropout=0.2).to(device)
    x = torch.randn(m, k, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with flare_kernels.use_backend(name), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, torch.randn(m, k, device=device)).sum().backward()
    assert saved, "nothing saved?"
    dense = [t for t in saved if t.is_floating_point() and t.numel() >= n * k]
    assert not dense, f"saved dense tensors: {[tuple(t.shape) for t in dense]}"
    floats = sum(t.numel() * t.element_size() for t in saved if t.is_floating_point())
    # x, source (m x k each), s_t, s_s (m x r), A, B (+ fusion params), NF4 statistics
    expected = 4 * (2 * m * k + 2 * m * r + 2 * r * (k + n) + 3 * (r * r + r)) + 4 * (n * k // 64 // 256 + 1 + 256 + 16 + 1)
    assert floats <= expected, (floats, expected)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_inference_fast_path_matches_the_op(name, device):
    """Without anything to differentiate the functional calls the op's body directly; same bits."""
    w, x, src, a, b = layer_inputs(device)
    with flare_kernels.use_backend(name):
        with torch.no_grad():
            y_fast, ys_fast = flare_lora_linear(x, w, a, b, 2.0, source=src, return_source_output=True)
        y_op, ys_op = flare_lora_linear(x, w, a.requires_grad_(True), b, 2.0, source=src, return_source_output=True)
    assert y_op.grad_fn is not None and y_fast.grad_fn is None
    assert torch.equal(y_fast, y_op.detach()) and torch.equal(ys_fast, ys_op)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("fusion", ["matmul", "matmul_relu", "cross_attention"])
def test_fusion_mask_on_every_backend(name, fusion, device):
    """Padding-independence through the op: real positions of a padded batch equal the unpadded run."""
    w, _, _, a, b = layer_inputs(device)
    r = a.shape[0]
    params = [torch.randn(r, r, device=device) * 0.3 if i % 2 == 0 else torch.randn(r, device=device) * 0.1
              for i in range(6)] if fusion == "cross_attention" else []  # fmt: skip
    x, src = torch.randn(1, 5, 128, device=device), torch.randn(1, 5, 128, device=device)
    pad = torch.randn(1, 3, 128, device=device) * 10
    x_pad, src_pad = torch.cat([x, pad], 1), torch.cat([src, pad.flip(1)], 1)
    mask = torch.tensor([[True] * 5 + [False] * 3], device=device)
    x_pad.requires_grad_(True)
    with flare_kernels.use_backend(name):
        y = flare_lora_linear(x, w, a, b, 2.0, source=src, fusion=fusion, fusion_params=params)
        y_pad = flare_lora_linear(x_pad, w, a, b, 2.0, source=src_pad, fusion=fusion, fusion_params=params,
                                  fusion_mask=mask)  # fmt: skip
        y_pad.sum().backward()
    torch.testing.assert_close(y_pad[:, :5], y, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(x_pad.grad).all()


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_source_base_on_every_backend(name, device):
    w, x, src, a, b = layer_inputs(device)
    base_rows = torch.randn_like(x)
    with flare_kernels.use_backend(name):
        y, y_s = flare_lora_linear(x, w, a, b, 2.0, source=src, source_base=base_rows, return_source_output=True)
        y_plain = flare_lora_linear(x, w, a, b, 2.0, source=src)
        _, y_s_expected = flare_lora_linear(x, w, a, b, 2.0, source=base_rows, return_source_output=True)
    if name != "triton":
        # The reference and the native kernels compute y from x, s_t and s_s alone, by the same calls
        # with or without source_base (y_s is a separate product): bit-equal by construction.
        torch.testing.assert_close(y, y_plain, rtol=0, atol=0)
    else:
        # Triton takes another path with source_base (no down-projection fused into the base K loop,
        # and the two-stream tile choice), so s_t and y are summed in another order: both runs by the
        # tolerance rule against float64, with the reference in fp32 as PyTorch's own error.
        with flare_kernels.use_backend("torch"):
            y32 = flare_lora_linear(x, w, a, b, 2.0, source=src)
            y64 = flare_lora_linear(x.double(), w, a.double(), b.double(), 2.0, source=src.double())
        assert_tolerance(y, y64, y32, "y with source_base")
        assert_tolerance(y_plain, y64, y32, "y without source_base")
    torch.testing.assert_close(y_s, y_s_expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="source_base"):
        flare_lora_linear(x, w, a, b, 2.0, source_base=base_rows)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_fusion_none_keeps_no_source_rows_for_backward(name, device):
    """A non-fusion projection passes the source rows' base product but saves neither the source
    rows nor a source dropout mask."""
    layer = FlareLinear4bit.from_linear(torch.nn.Linear(128, 96), fusion="none", lora_dropout=0.2).to(device)
    x = torch.randn(6, 128, device=device, requires_grad=True)
    src = torch.randn(6, 128, device=device)
    saved = []
    with flare_kernels.use_backend(name), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, y_s = layer(x, src, return_source_output=True)
        y.sum().backward()
    assert not any(t is src or (t.shape == src.shape and torch.equal(t, src)) for t in saved)
    assert sum(t.dtype == torch.bool and t.shape == x.shape for t in saved) == 1  # the target's mask only


def test_base_forward_is_the_frozen_layer():
    dense = torch.nn.Linear(128, 96)
    layer = FlareLinear4bit.from_linear(dense)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    x = torch.randn(4, 128)
    with flare_kernels.use_backend("torch"):
        expected = torch.nn.functional.linear(x, layer.weight.dequantize(torch.float32), layer.bias)
        assert torch.equal(layer.base_forward(x), expected)
        assert not torch.equal(layer(x), expected)
