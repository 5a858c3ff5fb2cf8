"""The reference path: its semantics, its gradients (float64 finite differences) and the explicit
backward the ops use (against autograd of the reference forward)."""

import math

import pytest
import torch

from flare_kernels import quantize_nf4
from flare_kernels.reference import FUSIONS, flare_lora_backward, flare_lora_reference, fuse, fuse_backward
from flare_kernels.reference.fusion import FUSION_PARAM_COUNT, SEQUENCE_FUSIONS

F64 = torch.float64


def fusion_params(fusion, r, dtype=F64, requires_grad=False):
    return [
        (torch.randn(r, r, dtype=dtype) * r**-0.5 if i % 2 == 0 else torch.randn(r, dtype=dtype) * 0.1).requires_grad_(requires_grad)
        for i in range(FUSION_PARAM_COUNT[fusion])
    ]  # fmt: skip


def small_problem(fusion, b=2, l=5, k=64, n=7, r=4, dtype=F64, source=True):
    w = quantize_nf4(torch.randn(n, k) * 0.1)
    x = torch.randn(b, l, k, dtype=dtype, requires_grad=True)
    src = torch.randn(b, l, k, dtype=dtype) if source else None
    a = (torch.randn(r, k, dtype=dtype) * 0.2).requires_grad_(True)
    bb = (torch.randn(n, r, dtype=dtype) * 0.2).requires_grad_(True)
    bias = torch.randn(n, dtype=dtype)
    return w, x, src, a, bb, bias, fusion_params(fusion, r, dtype, requires_grad=True)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fuse_gradcheck(fusion):
    s = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    t = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    params = fusion_params(fusion, 4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t, *p: fuse(s, t, fusion, p), (s, t, *params))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fuse_backward_matches_autograd(fusion):
    s = torch.randn(3, 6, 8, dtype=F64, requires_grad=True)
    t = torch.randn(3, 6, 8, dtype=F64, requires_grad=True)
    params = fusion_params(fusion, 8, requires_grad=True)
    dz = torch.randn(3, 6, 8, dtype=F64)
    z = fuse(s, t, fusion, params)
    wanted = [s, t, *params]
    expected = torch.autograd.grad(z, wanted, dz, allow_unused=True)
    ds, dt, dparams = fuse_backward(dz, s.detach(), t.detach(), fusion, [p.detach() for p in params])
    got = [ds, dt, *dparams]
    for name, e, g in zip(["ds", "dt", "Wq", "bq", "Wk", "bk", "Wv", "bv"], expected, got):
        if e is None:  # phi ignores s (fusion "none")
            assert g is None or torch.count_nonzero(g) == 0, name
            continue
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)


def test_fusion_table():
    s = torch.tensor([[-1.0, 2.0]])
    t = torch.tensor([[3.0, -4.0]])
    assert torch.equal(fuse(s, t, "none"), t)
    assert torch.equal(fuse(s, t, "add"), s + t)
    assert torch.equal(fuse(s, t, "mul"), s * t)
    assert torch.equal(fuse(s, t, "add_relu"), torch.tensor([[3.0, 2.0]]))
    assert torch.equal(fuse(s, t, "matmul"), s @ (t.T @ t))
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(s, t, "concat")


def test_sequence_fusions_do_not_mix_sequences():
    s = torch.randn(2, 5, 4)
    t = torch.randn(2, 5, 4)
    params = fusion_params("cross_attention", 4, torch.float32)
    for fusion in SEQUENCE_FUSIONS:
        z = fuse(s, t, fusion, params)
        t2 = t.clone()
        t2[1] += 1.0
        z2 = fuse(s, t2, fusion, params)
        assert torch.equal(z[0], z2[0]), fusion
        assert not torch.equal(z[1], z2[1]), fusion


@pytest.mark.parametrize("fusion", FUSIONS)
def test_without_source_every_fusion_is_plain_lora(fusion):
    w, x, _, a, b, bias, params = small_problem(fusion)
    out = flare_lora_reference(x, w, a, b, 2.0, fusion=fusion, bias=bias, fusion_params=params)
    plain = x @ w.dequantize(F64).T + bias + 2.0 * (x @ a.T) @ b.T
    torch.testing.assert_close(out.y, plain, rtol=1e-12, atol=1e-12)
    assert out.s_source is None


@pytest.mark.parametrize("fusion", ["add_relu", "cross_attention"])
def test_source_gets_no_gradient_and_A_gets_both_streams(fusion):
    w, x, src, a, b, bias, params = small_problem(fusion)
    src.requires_grad_(True)
    out = flare_lora_reference(x, w, a, b, 2.0, source=src, fusion=fusion, fusion_params=params,
                               return_source_output=True)  # fmt: skip
    assert out.y_source is not None and not out.y_source.requires_grad
    torch.testing.assert_close(out.y_source, src @ w.dequantize(F64).T)
    out.y.sum().backward()
    assert src.grad is None
    # dA = ds_t^T x_t + ds_s^T x_s, with a non-zero source term.
    with torch.no_grad():
        s_s, s_t = src @ a.T, x @ a.T
    s_s.requires_grad_(True)
    s_t.requires_grad_(True)
    z = fuse(s_s, s_t, fusion, [p.detach() for p in params])
    dz = 2.0 * torch.ones_like(out.y) @ b.detach()
    g_s, g_t = torch.autograd.grad(z, (s_s, s_t), dz)
    rows = lambda t: t.detach().reshape(-1, t.shape[-1])  # noqa: E731
    expected = rows(g_t).T @ rows(x) + rows(g_s).T @ rows(src)
    torch.testing.assert_close(a.grad, expected)
    assert g_s.abs().sum() > 0


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
def test_reference_gradcheck_float64(fusion, dropout):
    """Reference gradients for x, A, B and the fusion parameters against finite differences."""
    w, x, src, a, b, bias, params = small_problem(fusion, b=2, l=3, k=64, n=5, r=3)
    masks = {}
    if dropout:
        masks = dict(dropout_mask=torch.rand(2, 3, 64) > dropout, source_dropout_mask=torch.rand(2, 3, 64) > dropout)

    def f(x, a, b, *p):
        return flare_lora_reference(x, w, a, b, 1.5, source=src, fusion=fusion, bias=bias, dropout_p=dropout,
                                    fusion_params=p, **masks).y  # fmt: skip

    assert torch.autograd.gradcheck(f, (x, a, b, *params))


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("source", [True, False], ids=["src", "nosrc"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
def test_explicit_backward_matches_autograd(fusion, source, dropout):
    w, x, src, a, b, bias, params = small_problem(fusion, source=source)
    masks = {}
    if dropout:
        masks = dict(dropout_mask=torch.rand(x.shape) > dropout,
                     source_dropout_mask=torch.rand(x.shape) > dropout if source else None)  # fmt: skip
    if not source:
        params = []
    out = flare_lora_reference(x, w, a, b, 1.5, source=src, fusion=fusion, dropout_p=dropout, fusion_params=params, **masks)
    dy = torch.randn_like(out.y)
    wanted = [x, a, b, *params]
    expected = torch.autograd.grad(out.y, wanted, dy)
    g = flare_lora_backward(dy, x.detach(), src, w, a.detach(), b.detach(), 1.5, fusion=fusion,
                            s_target=out.s_target.detach(),
                            s_source=None if out.s_source is None else out.s_source.detach(),
                            dropout_p=dropout, fusion_params=[p.detach() for p in params], **masks)  # fmt: skip
    got = [g.dx, g.d_lora_A, g.d_lora_B, *g.d_fusion_params]
    assert len(got) == len(expected)
    for name, e, gg in zip(["dx", "dA", "dB", "Wq", "bq", "Wk", "bk", "Wv", "bv"], expected, got):
        torch.testing.assert_close(gg, e, rtol=1e-10, atol=1e-10, msg=name)


def test_reference_precision_follows_bitsandbytes_and_peft():
    """Base product in the compute dtype (W0 dequantized to it), LoRA branch in the adapter dtype."""
    w = quantize_nf4(torch.randn(16, 64) * 0.1)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    a = torch.randn(4, 64) * 0.1
    b = torch.randn(16, 4) * 0.1
    out = flare_lora_reference(x, w, a, b, 2.0, fusion="none")
    base = torch.nn.functional.linear(x, w.dequantize(torch.bfloat16))
    update = (torch.nn.functional.linear(torch.nn.functional.linear(x.float(), a), b) * 2.0).to(torch.bfloat16)
    assert out.y.dtype == torch.bfloat16
    assert torch.equal(out.y, base + update)


def test_dropout_draws_independent_masks_per_stream():
    """p > 0 without masks: each stream gets its own keep-mask with keep probability 1 - p."""
    k, r, p = 64, 64, 0.4
    w = quantize_nf4(torch.zeros(r, k))  # base product zero
    a = torch.eye(r, k)  # s = drop(x)[:, :r]
    b = torch.eye(r)
    x = torch.ones(256, k)
    y = flare_lora_reference(x, w, a, b, 1.0, source=x.clone(), fusion="add", dropout_p=p).y
    kept = 1 / (1 - p)
    # y = drop_s(1) + drop_t(1) in {0, kept, 2 kept} with probabilities p^2, 2p(1-p), (1-p)^2.
    values = torch.round(y / kept).long().flatten()
    n = values.numel()
    for v, prob in ((0, p * p), (1, 2 * p * (1 - p)), (2, (1 - p) ** 2)):
        frac = (values == v).float().mean().item()
        sigma = math.sqrt(prob * (1 - prob) / n)
        assert abs(frac - prob) < 5 * sigma, (v, frac, prob)
    assert torch.allclose(y, torch.round(y / kept) * kept)


@pytest.mark.parametrize("fusion", SEQUENCE_FUSIONS)
def test_fusion_mask_makes_sequence_fusions_independent_of_padding(fusion):
    """A padded sequence fuses its real positions exactly as the unpadded one does."""
    r, real, pad = 4, 5, 3
    params = fusion_params(fusion, r)
    s, t = torch.randn(1, real, r, dtype=F64), torch.randn(1, real, r, dtype=F64)
    z_unpadded = fuse(s, t, fusion, params)
    s_pad = torch.cat([s, torch.randn(1, pad, r, dtype=F64) * 100], dim=1)
    t_pad = torch.cat([t, torch.randn(1, pad, r, dtype=F64) * 100], dim=1)
    mask = torch.tensor([[True] * real + [False] * pad])
    z = fuse(s_pad, t_pad, fusion, params, mask)
    torch.testing.assert_close(z[:, :real], z_unpadded, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(fuse(s_pad, t_pad, fusion, params)[:, :real], z_unpadded)
    # A sequence without any real position fuses to zeros (no NaN from an empty softmax).
    empty = fuse(s_pad, t_pad, fusion, params, torch.zeros_like(mask))
    assert torch.isfinite(empty).all()


@pytest.mark.parametrize("fusion", SEQUENCE_FUSIONS)
def test_masked_fuse_backward_matches_autograd(fusion):
    s = torch.randn(3, 6, 4, dtype=F64, requires_grad=True)
    t = torch.randn(3, 6, 4, dtype=F64, requires_grad=True)
    params = fusion_params(fusion, 4, requires_grad=True)
    mask = torch.rand(3, 6) > 0.3
    mask[2] = False  # a sequence of padding only
    dz = torch.randn(3, 6, 4, dtype=F64)
    expected = torch.autograd.grad(fuse(s, t, fusion, params, mask), [s, t, *params], dz, allow_unused=True)
    ds, dt, dparams = fuse_backward(dz, s.detach(), t.detach(), fusion, [p.detach() for p in params], mask)
    for name, e, g in zip(["ds", "dt", "Wq", "bq", "Wk", "bk", "Wv", "bv"], expected, [ds, dt, *dparams]):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-12, atol=1e-12, msg=name)
    assert torch.autograd.gradcheck(lambda s, t, *p: fuse(s, t, fusion, p, mask), (s, t, *params))


def test_source_base_gives_the_source_output_while_the_source_is_fused():
    w, x, src, a, b, bias, params = small_problem("add_relu")
    base_rows = torch.randn_like(x)
    out = flare_lora_reference(x, w, a, b, 2.0, source=src, fusion="add_relu", bias=bias, source_base=base_rows,
                               return_source_output=True)  # fmt: skip
    plain = flare_lora_reference(x, w, a, b, 2.0, source=src, fusion="add_relu", bias=bias, return_source_output=True)
    assert torch.equal(out.y, plain.y)
    torch.testing.assert_close(out.y_source, base_rows @ w.dequantize(F64).T + bias)
