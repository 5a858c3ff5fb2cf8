"""Multi-head cross-attention fusion with attention-probability dropout: the reference against a
hand-written float64 multi-head attention and nn.MultiheadAttention, its explicit backward, and
every backend through the functional against the reference."""

import dataclasses
import math

import pytest
import torch

import cases
import flare_kernels
from cases import Case
from flare_kernels import flare_lora_linear, native, quantize_nf4
from flare_kernels.reference import AttentionParams, fuse, fuse_backward

F64 = torch.float64


def params(r, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(r, r, generator=g, dtype=F64) * r**-0.5 if i % 2 == 0 else torch.randn(r, generator=g, dtype=F64) * 0.1)
        .requires_grad_(requires_grad)
        for i in range(6)
    ]  # fmt: skip


def hand_attention(s, t, p, heads, keep=None, drop=0.0, mask=None):
    """Per-head loops, nothing shared with the reference: softmax(q_h k_h^T / sqrt(d)) v_h, concatenated."""
    wq, bq, wk, bk, wv, bv = p
    q, k, v = s @ wq.T + bq, t @ wk.T + bk, t @ wv.T + bv
    d = t.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d)
        if mask is not None:
            scores = scores.masked_fill(~mask[..., None, :], float("-inf"))
        probs = scores.softmax(-1)
        if keep is not None:
            probs = probs * keep[..., h, :, :] / (1.0 - drop)
        outs.append(probs @ v[..., sl])
    return torch.cat(outs, -1)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_heads_match_hand_attention_and_multihead_attention(heads):
    s, t = torch.randn(3, 5, 8, dtype=F64), torch.randn(3, 5, 8, dtype=F64)
    p = params(8)
    z = fuse(s, t, "cross_attention", AttentionParams(p, heads))
    torch.testing.assert_close(z, hand_attention(s, t, p, heads), rtol=1e-12, atol=1e-12)
    # nn.MultiheadAttention with the same in-projections and an identity out-projection
    mha = torch.nn.MultiheadAttention(8, heads, batch_first=True, dtype=F64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat(p[0::2]))
        mha.in_proj_bias.copy_(torch.cat(p[1::2]))
        mha.out_proj.weight.copy_(torch.eye(8, dtype=F64))
        mha.out_proj.bias.zero_()
    torch.testing.assert_close(z, mha(s, t, t, need_weights=False)[0], rtol=1e-12, atol=1e-12)


def test_one_head_and_no_dropout_is_bit_identical_to_plain_params():
    s, t = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    p = [x.float() for x in params(8)]
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    plain = fuse(s, t, "cross_attention", p, mask)
    assert torch.equal(fuse(s, t, "cross_attention", AttentionParams(p, 1), mask), plain)
    dz = torch.randn(2, 6, 8)
    for a, b in zip(fuse_backward(dz, s, t, "cross_attention", AttentionParams(p), mask)[2],
                    fuse_backward(dz, s, t, "cross_attention", p, mask)[2]):  # fmt: skip
        assert torch.equal(a, b)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_dropout_with_a_fixed_mask_equals_the_hand_computation(heads):
    s, t = torch.randn(2, 5, 8, dtype=F64), torch.randn(2, 5, 8, dtype=F64)
    p = params(8)
    keep = torch.rand(2, heads, 5, 5) < 0.7
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    z = fuse(s, t, "cross_attention", AttentionParams(p, heads, keep, 0.3), mask)
    torch.testing.assert_close(z, hand_attention(s, t, p, heads, keep, 0.3, mask), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(z, fuse(s, t, "cross_attention", AttentionParams(p, heads), mask))


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("drop", [0.0, 0.4], ids=["nodrop", "drop"])
def test_gradcheck_and_explicit_backward(heads, drop):
    s = torch.randn(2, 4, 8, dtype=F64, requires_grad=True)
    t = torch.randn(2, 4, 8, dtype=F64, requires_grad=True)
    p = params(8, requires_grad=True)
    keep = (torch.rand(2, heads, 4, 4) < 0.6) if drop else None
    mask = torch.tensor([[True] * 4, [True] * 3 + [False]])

    def phi(s, t, *p):
        return fuse(s, t, "cross_attention", AttentionParams(p, heads, keep, drop), mask)

    assert torch.autograd.gradcheck(phi, (s, t, *p))
    z = phi(s, t, *p)
    dz = torch.randn_like(z)
    auto = torch.autograd.grad(z, (s, t, *p), dz)
    ds, dt, dp = fuse_backward(dz, s.detach(), t.detach(), "cross_attention",
                               AttentionParams([x.detach() for x in p], heads, keep, drop), mask)  # fmt: skip
    for a, b in zip(auto, (ds, dt, *dp)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def layer(r=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = quantize_nf4(torch.randn(16, 64, generator=g) * 0.1)
    x = torch.randn(2, 5, 64, generator=g)
    src = torch.randn(2, 5, 64, generator=g)
    a = torch.randn(r, 64, generator=g) * 0.2
    b = torch.randn(16, r, generator=g) * 0.2
    return w, x, src, a, b, [p.float() for p in params(r)]


@pytest.mark.parametrize("heads, r", [(3, 8), (16, 8), (0, 8)])
def test_heads_must_divide_r_with_a_one_line_error(heads, r):
    w, x, src, a, b, p = layer(r)
    with pytest.raises(ValueError) as err:
        flare_lora_linear(x, w, a, b, 2.0, source=src, fusion="cross_attention", fusion_params=p, heads=heads)
    assert "\n" not in str(err.value) and "heads" in str(err.value)
    with pytest.raises(ValueError, match="must divide the LoRA rank"):
        fuse(x[..., :8], x[..., :8], "cross_attention", AttentionParams(p, 3))


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_attention_dropout_p_out_of_range_is_refused(bad):
    w, x, src, a, b, p = layer()
    with pytest.raises(ValueError, match=r"attention_dropout_p must be in \[0, 1\)"):
        flare_lora_linear(x, w, a, b, 2.0, source=src, fusion="cross_attention", fusion_params=p,
                          attention_dropout_p=bad)  # fmt: skip


def test_drawn_attention_dropout_follows_torch_rng_and_backward_uses_the_forward_mask():
    """Same seed, same output and gradients (a resumed run redraws the same masks); the backward
    agrees with autograd of the reference under the mask the forward drew."""
    w, x, src, a, b, p = layer()

    def run(seed):
        torch.manual_seed(seed)
        ap = [t.clone().requires_grad_(True) for t in p]
        aa = a.clone().requires_grad_(True)
        y = flare_lora_linear(x, w, aa, b, 2.0, source=src, fusion="cross_attention", fusion_params=ap, heads=2,
                              attention_dropout_p=0.5)  # fmt: skip
        y.square().sum().backward()
        return y.detach(), [aa.grad, *(t.grad for t in ap)]

    y1, g1 = run(3)
    y2, g2 = run(3)
    y3, _ = run(4)
    assert torch.equal(y1, y2) and all(torch.equal(u, v) for u, v in zip(g1, g2))
    assert not torch.equal(y1, y3)
    # replay the mask the functional drew (bernoulli_ right after seeding: no LoRA dropout here)
    torch.manual_seed(3)
    keep = torch.empty(2, 2, 5, 5, dtype=torch.bool).bernoulli_(0.5)
    y4 = flare_lora_linear(x, w, a, b, 2.0, source=src, fusion="cross_attention", fusion_params=p, heads=2,
                           attention_dropout_p=0.5, attention_dropout_mask=keep)  # fmt: skip
    assert torch.equal(y1, y4)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("heads, drop", [(2, 0.0), (4, 0.3)], ids=["h2", "h4-drop"])
def test_every_backend_matches_the_reference(backend, heads, drop, device):
    """Forward and every gradient against the float64 reference by the tolerance rule, PyTorch at
    the input precision as the yardstick (as cases.check_against_reference, with the settings)."""
    from tolerance import assert_tolerance

    if backend == "cpu" and (device.type != "cpu" or not native.available()):
        pytest.skip("the native backend runs on CPUs, when built")
    if backend == "triton":
        pytest.importorskip("triton")
    case = dataclasses.replace(Case(), fusion="cross_attention", m=24, seq=8)
    keep = (torch.rand(3, heads, 8, 8, generator=torch.Generator().manual_seed(1)) < 1 - drop).to(device)
    kw = dict(heads=heads, attention_dropout_p=drop, attention_dropout_mask=keep if drop else None)
    problem = cases.make_problem(case, device)
    out = cases.run(problem, backend, case.dtype, **kw)
    low = cases.run(problem, "torch", case.dtype, **kw)
    ref = cases.run(problem, "torch", F64, inputs_from=case.dtype, **kw)
    plain = cases.run(problem, "torch", case.dtype)
    assert not torch.allclose(low.y, plain.y)  # the settings reached the computation
    assert_tolerance(out.y, ref.y, low.y, "y")
    for name, g in ref.grads.items():
        assert_tolerance(out.grads[name], g, low.grads[name], f"d{name}")


def test_opcheck_with_heads_and_an_attention_dropout_mask(device):
    """Schema, fake implementation and autograd registration with the three trailing inputs set."""
    from flare_kernels.ops.custom_ops import flare_lora_fwd

    _, x, src, a, b, p = layer()
    t = quantize_nf4((torch.randn(16, 64) * 0.1).to(device)).tensors()
    x, src, a, b = (v.to(device) for v in (x, src, a, b))
    x2, s2 = x.reshape(10, 64).requires_grad_(True), src.reshape(10, 64)
    p = [v.to(device).requires_grad_(True) for v in p]
    keep = (torch.rand(2, 2, 5, 5) < 0.7).to(device)
    args = (x2, s2, t.packed, t.absmax, t.code, t.nested_absmax, t.nested_code, t.nested_offset, t.out_features,
            t.blocksize, None, a.requires_grad_(True), b.requires_grad_(True), 2.0, "cross_attention", p, 0.0, None,
            None, 5, True, None, None, 2, 0.3, keep)  # fmt: skip
    with flare_kernels.use_backend("torch"):
        torch.library.opcheck(flare_lora_fwd, args)
