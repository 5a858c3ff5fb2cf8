"""``NF4Weight.make_shardable``: the weight's tensors become frozen uint8 parameters FSDP2 can shard, holding
the same bytes (no copy), and every path that reads the weight gives bit-identical results."""

import pytest
import torch

from flare_kernels import FlareLinear4bit
from flare_kernels.format.nf4 import SHARDABLE, quantize_nf4


@pytest.mark.parametrize("double_quant", [True, False], ids=["nested", "fp32-absmax"])
def test_shardable_weight_holds_the_same_bytes_and_computes_the_same(double_quant):
    torch.manual_seed(0)
    # 48 x 40 = 1920 values: 30 blocks of 64
    layer = FlareLinear4bit(quantize_nf4(torch.randn(48, 40), double_quant=double_quant), torch.randn(48), r=4)
    torch.nn.init.normal_(layer.lora_B.weight)  # a non-zero adapter, so the whole fused op is compared
    w = layer.weight
    before = w.tensors()
    ptrs = {name: getattr(before, name).data_ptr() for name in SHARDABLE if getattr(before, name) is not None}
    x = torch.randn(3, 5, 40, requires_grad=True)
    y0 = layer(x)
    y0.sum().backward()
    grads0 = (x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
    x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad = None, None, None

    assert w.make_shardable() is w and w.make_shardable() is w  # idempotent
    params = dict(w.named_parameters())
    assert set(params) == set(ptrs) and len(list(w.buffers())) == 0
    for name, p in params.items():
        assert p.dtype == torch.uint8 and p.dim() == 1 and not p.requires_grad, name
        assert p.data_ptr() == ptrs[name], f"{name} was copied"
    after = w.tensors()
    for name in SHARDABLE:
        a, b = getattr(before, name), getattr(after, name)
        assert (a is None) == (b is None), name
        if a is not None:  # same dtype, shape and bits: the kernels see no difference
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    assert torch.equal(w.dequantize(), before.dequantize())

    y1 = layer(x)
    y1.sum().backward()
    assert torch.equal(y0, y1)
    for g0, g1 in zip(grads0, (x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)):
        assert torch.equal(g0, g1)
    # dtype casts of the model leave the bytes alone (they are integers); the fp32 scales keep their bits
    layer.to(torch.float16)
    assert torch.equal(w.dequantize(torch.float32), before.dequantize())
    assert w.device == torch.device("cpu") and w.shardable
