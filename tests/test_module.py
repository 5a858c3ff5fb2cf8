"""FlareLinear4bit: a drop-in for bitsandbytes Linear4bit + a PEFT LoRA."""

import math

import pytest
import torch
from torch import nn

import flare_kernels
from flare_kernels import FlareLinear4bit, NF4Weight, flare_lora_reference, quantize_nf4
from tolerance import assert_tolerance

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

IN, OUT, R = 192, 67, 8


class OneLayer(nn.Module):
    """A model with one 4-bit projection, as transformers loads it (PEFT dispatches on the flag)."""

    is_loaded_in_4bit = True

    def __init__(self, dense: nn.Linear, compute_dtype=torch.bfloat16):
        super().__init__()
        self.proj = bnb.nn.Linear4bit(IN, OUT, bias=True, compute_dtype=compute_dtype, quant_type="nf4",
                                      compress_statistics=True)  # fmt: skip
        self.proj.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)._quantize("cpu")  # fmt: skip
        self.proj.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)

    def forward(self, x):
        return self.proj(x)


def peft_and_ours(lora_dropout=0.0):
    dense = nn.Linear(IN, OUT)
    model = OneLayer(dense)
    ours = FlareLinear4bit.from_bnb(model.proj, r=R, lora_alpha=16, lora_dropout=lora_dropout)  # before any bnb forward
    cfg = peft.LoraConfig(r=R, lora_alpha=16, lora_dropout=lora_dropout, target_modules=["proj"])
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model.proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and type(layer).__name__ == "Linear4bit"
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)  # make the adapter do something
        ours.lora_A.weight.copy_(layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(layer.lora_B["default"].weight)
    return pm, layer, ours


def reference64(ours, x, source=None):
    out = flare_lora_reference(x.double(), ours.weight, ours.lora_A.weight.double(), ours.lora_B.weight.double(),
                               ours.scaling, source=None if source is None else source.double(), fusion=ours.fusion,
                               bias=ours.bias.double(), compute_dtype=torch.float64)  # fmt: skip
    return out.y


@pytest.mark.parametrize("name", ["triton", "torch"])
def test_matches_peft_bnb_linear4bit_without_source(name):
    pm, layer, ours = peft_and_ours()
    pm.train()
    ours.train()
    x = torch.randn(2, 5, IN, dtype=torch.bfloat16)
    x_p = x.clone().requires_grad_(True)
    x_o = x.clone().requires_grad_(True)
    y_peft = pm(x_p)
    with flare_kernels.use_backend(name):
        y_ours = ours(x_o)
        dy = torch.randn_like(y_ours)
        y_ours.backward(dy)
    y_peft.backward(dy)
    assert y_ours.dtype == y_peft.dtype == torch.bfloat16
    # Both against the float64 reference on the same inputs: ours within 2x PEFT's error.
    ref = reference64(ours, x)
    assert_tolerance(y_ours, ref, y_peft, "y")
    # Gradients of the adapter against PEFT's, by the same rule (float64 autograd as reference).
    a64 = ours.lora_A.weight.detach().double().requires_grad_(True)
    b64 = ours.lora_B.weight.detach().double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    out = flare_lora_reference(x64, ours.weight, a64, b64, ours.scaling, fusion="none", bias=ours.bias.double())
    out.y.backward(dy.double())
    assert_tolerance(ours.lora_A.weight.grad, a64.grad, layer.lora_A["default"].weight.grad, "dA")
    assert_tolerance(ours.lora_B.weight.grad, b64.grad, layer.lora_B["default"].weight.grad, "dB")
    assert_tolerance(x_o.grad, x64.grad, x_p.grad, "dx")


@pytest.mark.parametrize("fusion", ["add_relu", "mul", "cross_attention"])
@pytest.mark.parametrize("name", ["triton", "torch"])
def test_with_source_matches_reference(fusion, name):
    ours = FlareLinear4bit.from_linear(nn.Linear(IN, OUT), r=R, fusion=fusion)
    nn.init.normal_(ours.lora_B.weight, std=0.1)
    x = torch.randn(2, 6, IN)
    src = torch.randn(2, 6, IN)
    params = ours.fusion_module.params() if ours.fusion_module is not None else ()
    with flare_kernels.use_backend(name):
        y, y_src = ours(x, src, return_source_output=True)
    ref = flare_lora_reference(x, ours.weight, ours.lora_A.weight, ours.lora_B.weight, ours.scaling, source=src,
                               fusion=fusion, bias=ours.bias, fusion_params=params, return_source_output=True)  # fmt: skip
    ref64 = flare_lora_reference(x.double(), ours.weight, ours.lora_A.weight.double(), ours.lora_B.weight.double(),
                                 ours.scaling, source=src.double(), fusion=fusion, bias=ours.bias.double(),
                                 fusion_params=[p.double() for p in params], return_source_output=True)  # fmt: skip
    assert_tolerance(y, ref64.y, ref.y, "y")
    assert_tolerance(y_src, ref64.y_source, ref.y_source, "y_source")


def test_init_follows_peft():
    layer = FlareLinear4bit.from_linear(nn.Linear(IN, OUT), r=16, lora_alpha=32)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(IN)  # kaiming_uniform(a=sqrt(5)): sqrt(6 / ((1 + 5) * fan_in))
    a = layer.lora_A.weight
    assert a.shape == (16, IN) and a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert abs(a.mean().item()) < 0.1 * bound
    # A zero-initialized B makes the adapter a no-op at the start, for every fusion.
    x = torch.randn(3, IN)
    with flare_kernels.use_backend("torch"):
        assert torch.equal(layer(x, torch.randn(3, IN)), layer(x))


def test_adapter_state_dict_matches_peft_keys_and_loads():
    pm, layer, ours = peft_and_ours()
    peft_sd = peft.get_peft_model_state_dict(pm)
    prefix = "base_model.model.proj."
    stripped = {k.removeprefix(prefix): v for k, v in peft_sd.items()}
    assert set(stripped) == set(ours.adapter_state_dict())
    fresh = FlareLinear4bit(ours.weight, ours.bias, r=R)
    missing, unexpected = fresh.load_state_dict(stripped, strict=False)
    assert not unexpected and all(k.startswith(("weight.", "bias")) for k in missing)
    x = torch.randn(4, IN)
    with flare_kernels.use_backend("torch"):
        assert torch.equal(fresh(x), ours(x))


def test_only_adapter_is_trainable_and_buffers_hold_the_weight():
    layer = FlareLinear4bit.from_linear(nn.Linear(IN, OUT), fusion="cross_attention")
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight", "fusion_module.q.weight", "fusion_module.q.bias",
                         "fusion_module.k.weight", "fusion_module.k.bias", "fusion_module.v.weight",
                         "fusion_module.v.bias"}  # fmt: skip
    assert not layer.bias.requires_grad
    buffers = {n for n, _ in layer.named_buffers()}
    assert {"weight.packed", "weight.absmax", "weight.nested_absmax"} <= buffers
    x = torch.randn(2, 4, IN)
    with flare_kernels.use_backend("torch"):
        layer(x, torch.randn(2, 4, IN)).sum().backward()
    assert all(p.grad is not None for n, p in layer.named_parameters() if p.requires_grad)


def test_from_linear_quantizes_like_quantize_nf4():
    dense = nn.Linear(IN, OUT)
    layer = FlareLinear4bit.from_linear(dense, blocksize=128, double_quant=False)
    expected = quantize_nf4(dense.weight.data, blocksize=128, double_quant=False)
    assert torch.equal(layer.weight.packed, expected.packed) and torch.equal(layer.weight.absmax, expected.absmax)
    assert torch.equal(layer.bias, dense.bias)
    with pytest.raises(TypeError, match="nn.Linear"):
        FlareLinear4bit.from_linear(nn.Conv1d(2, 2, 1))


def test_dropout_only_in_training():
    layer = FlareLinear4bit.from_linear(nn.Linear(IN, OUT), lora_dropout=0.5)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(4, IN)
    with flare_kernels.use_backend("torch"):
        layer.eval()
        y_eval = layer(x)
        layer.lora_dropout = 0.0
        assert torch.equal(layer(x), y_eval)
        layer.lora_dropout = 0.5
        layer.train()
        assert not torch.equal(layer(x), y_eval)


def test_to_device_and_dtype(device):
    layer = FlareLinear4bit.from_linear(nn.Linear(IN, OUT))
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, IN)
    with flare_kernels.use_backend("torch"):
        y = layer(x)
        layer.to(device)
        assert layer.weight.packed.device.type == device.type
        torch.testing.assert_close(layer(x.to(device)).cpu(), y)
        layer.to(torch.bfloat16)  # adapter and bias cast; the NF4 buffers keep their dtypes
    assert layer.lora_A.weight.dtype == torch.bfloat16 and layer.weight.absmax.dtype == torch.uint8


def test_extra_repr():
    text = repr(FlareLinear4bit.from_linear(nn.Linear(IN, OUT), r=4, lora_alpha=8, fusion="mul"))
    for part in ("in_features=192", "out_features=67", "r=4", "scaling=2", "fusion='mul'", "blocksize=64", "double_quant=True"):
        assert part in text


def test_bad_construction():
    w = quantize_nf4(torch.randn(OUT, IN))
    with pytest.raises(ValueError, match="r must be a positive integer"):
        FlareLinear4bit(w, r=0)
    with pytest.raises(ValueError, match="unknown fusion"):
        FlareLinear4bit(w, fusion="sum")
    with pytest.raises(ValueError, match="bias must be"):
        FlareLinear4bit(w, torch.randn(3))
    with pytest.raises(TypeError, match="NF4Weight"):
        FlareLinear4bit(torch.randn(OUT, IN))
    with pytest.raises(ValueError, match="lora_dropout"):
        FlareLinear4bit(w, lora_dropout=1.5)
    assert isinstance(w, NF4Weight)


@pytest.mark.parametrize("name", ["triton", "torch"])
def test_under_autocast_adapter_runs_in_the_autocast_dtype_like_peft(name):
    pm, layer, ours = peft_and_ours()
    pm.train()
    ours.train()
    x = torch.randn(2, 5, IN, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), flare_kernels.use_backend(name):
        y_peft = pm(x)
        y_ours = ours(x)
        y_ours.sum().backward()
    assert ours.lora_A.weight.grad.dtype == torch.float32  # gradients reach the fp32 parameters
    a = ours.lora_A.weight.detach().bfloat16().double()
    b = ours.lora_B.weight.detach().bfloat16().double()
    ref = flare_lora_reference(x.double(), ours.weight, a, b, ours.scaling, fusion="none", bias=ours.bias.double(),
                               compute_dtype=torch.float64).y  # fmt: skip
    assert_tolerance(y_ours, ref, y_peft.to(y_ours.dtype), "y")


@pytest.mark.parametrize("fusion", ["add_relu", "cross_attention"])
def test_dense_flare_linear_shares_the_frozen_weight_and_matches_the_reference(fusion):
    dense = nn.Linear(IN, OUT)
    layer = flare_kernels.FlareLinear(dense, r=R, fusion=fusion)
    assert layer.weight is dense.weight and not dense.weight.requires_grad and not dense.bias.requires_grad
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(2, 6, IN, requires_grad=True)
    src = torch.randn(2, 6, IN)
    y, y_src = layer(x, src, return_source_output=True)
    params = layer.fusion_module.params() if layer.fusion_module is not None else ()
    ref = flare_lora_reference(x, dense.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, source=src,
                               fusion=fusion, bias=dense.bias, fusion_params=params, return_source_output=True)  # fmt: skip
    assert torch.equal(y, ref.y) and torch.equal(y_src, ref.y_source)
    torch.testing.assert_close(layer.base_forward(x), dense(x))
    y.sum().backward()
    assert dense.weight.grad is None and layer.lora_A.weight.grad is not None
    assert set(layer.adapter_state_dict()) >= {"lora_A.weight", "lora_B.weight"}
