"""Side-by-side demo: the fused FLARE layer against bitsandbytes Linear4bit + PEFT LoRA.

Both run on the same 4-bit weights (our layer wraps bitsandbytes' bytes without copying them).
The demo checks that plain QLoRA gives PEFT's outputs and gradients, then times, on this machine:
plain QLoRA (ours vs PEFT) and FLARE with both streams (ours, one pass over the weights, vs the
authors' style: a separate base call for the source stream and the fusion in torch).

    python -m benchmarks.demo [--in 1024 --out 1024 --tokens 256 --rank 8 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import flare_kernels
from flare_kernels import FlareLinear4bit
from flare_kernels.reference import fuse


def build(k: int, n: int, r: int, dtype: torch.dtype):
    import bitsandbytes as bnb
    import peft

    class Model(nn.Module):
        is_loaded_in_4bit = True  # PEFT dispatches bitsandbytes layers on this flag

        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4",
                                          compress_statistics=True)  # fmt: skip
            self.proj.weight = bnb.nn.Params4bit(torch.randn(n, k) * k**-0.5, requires_grad=False,
                                                 quant_type="nf4", compress_statistics=True)._quantize("cpu")  # fmt: skip

        def forward(self, x):
            return self.proj(x)

    model = Model()
    ours = FlareLinear4bit.from_bnb(model.proj, r=r, lora_alpha=2 * r, fusion="add_relu")  # before any bnb forward
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
        ours.lora_A.weight.copy_(layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(layer.lora_B["default"].weight)
    return pm, layer, ours


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--in", dest="k", type=int, default=1024)
    p.add_argument("--out", dest="n", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    pm, layer, ours = build(args.k, args.n, args.rank, dtype)
    pm.train()
    x = torch.randn(args.tokens, args.k, dtype=dtype)
    src = torch.randn(args.tokens, args.k, dtype=dtype)

    # 1. Agreement on plain QLoRA.
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_peft, y_ours = pm(x1), ours(x2)
    dy = torch.randn_like(y_ours)
    y_peft.backward(dy)
    y_ours.backward(dy)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    print(f"flare_kernels backend on {x.device.type}: {flare_kernels.last_backend()}")
    print(f"plain QLoRA vs PEFT (bf16): rel. diff  y {rel(y_ours, y_peft):.1e}  dx {rel(x2.grad, x1.grad):.1e}  "
          f"dA {rel(ours.lora_A.weight.grad, layer.lora_A['default'].weight.grad):.1e}  "
          f"dB {rel(ours.lora_B.weight.grad, layer.lora_B['default'].weight.grad):.1e}")  # fmt: skip

    # 2. Timing, forward + backward, side by side in this run.
    def peft_plain():
        xx = x.clone().requires_grad_(True)
        pm(xx).backward(dy)

    def ours_plain():
        xx = x.clone().requires_grad_(True)
        ours(xx).backward(dy)

    a, b, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]

    def authors_flare():
        # Source stream: a separate no-grad base pass; fusion in torch; then B.
        xx = x.clone().requires_grad_(True)
        with torch.no_grad():
            s_src = a(src.float())
            layer.base_layer(src)
        y = layer.base_layer(xx) + (b(fuse(s_src, a(xx.float()), "add_relu")) * s).to(dtype)
        y.backward(dy)

    def ours_flare():
        xx = x.clone().requires_grad_(True)
        y, _ = ours(xx, src, return_source_output=True)
        y.backward(dy)

    rows = [
        ("plain QLoRA", "bitsandbytes + PEFT", timed(peft_plain, args.repeats)),
        ("plain QLoRA", "flare_kernels", timed(ours_plain, args.repeats)),
        ("FLARE, 2 streams", "authors' style (bnb + PEFT)", timed(authors_flare, args.repeats)),
        ("FLARE, 2 streams", "flare_kernels (one pass)", timed(ours_flare, args.repeats)),
    ]
    print(f"\nforward + backward, {args.tokens} tokens/stream, {args.n}x{args.k} NF4, r={args.rank}, bf16, "
          f"median of {args.repeats} (CPU times are indicative only)")  # fmt: skip
    print(f"{'case':<18}{'provider':<30}{'ms':>9}{'ratio':>8}")
    for i, (case, provider, t) in enumerate(rows):
        baseline = rows[i - i % 2][2]
        print(f"{case:<18}{provider:<30}{t * 1e3:>9.1f}{baseline / t:>7.2f}x")


if __name__ == "__main__":
    main()
