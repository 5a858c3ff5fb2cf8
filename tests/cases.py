"""Random FLARE-LoRA problems and how to run them on a backend, shared by the kernel tests."""

from __future__ import annotations

import dataclasses
import zlib

import torch

import flare_kernels
from flare_kernels import flare_lora_linear, quantize_nf4
from flare_kernels.reference.fusion import FUSION_PARAM_COUNT


@dataclasses.dataclass(frozen=True)
class Case:
    m: int = 17  # tokens per stream (rows); sequences of ``seq`` tokens when m % seq == 0
    k: int = 192
    n: int = 67
    r: int = 8
    fusion: str = "add_relu"
    source: bool = True
    bias: bool = True
    dropout: float = 0.0
    dtype: torch.dtype = torch.float32
    adapter: torch.dtype | None = None  # LoRA parameters' dtype; None = the activations'
    blocksize: int = 64
    double_quant: bool = True
    seq: int = 1

    @property
    def id(self) -> str:
        parts = [
            f"M{self.m}", f"K{self.k}", f"N{self.n}", f"r{self.r}", self.fusion,
            "src" if self.source else "nosrc", "bias" if self.bias else "nobias",
            f"p{self.dropout:g}", str(self.dtype).removeprefix("torch."), f"bs{self.blocksize}",
            "dq" if self.double_quant else "plain",
        ]  # fmt: skip
        if self.adapter is not None:
            parts.append("adapter-" + str(self.adapter).removeprefix("torch."))
        if self.seq > 1:
            parts.append(f"L{self.seq}")
        return "-".join(parts)

    def call_spec(self):
        """The case as a ``flare_kernels.ops.plan.CallSpec``: what ``cases.run`` launches (both
        streams' outputs, every gradient it asks for), for the launch plan."""
        from flare_kernels.ops.plan import CallSpec

        return CallSpec(
            m=self.m, k=self.k, n=self.n, r=self.r, dtype=self.dtype, adapter_dtype=self.adapter, fusion=self.fusion,
            source=self.source, bias=self.bias, dropout=self.dropout > 0, blocksize=self.blocksize,
            nested=self.double_quant, seq_len=self.seq if self.seq > 1 else None,
            needs=(True, True, True, self.source and FUSION_PARAM_COUNT[self.fusion] > 0),
        )  # fmt: skip


@dataclasses.dataclass
class Problem:
    case: Case
    weight: flare_kernels.NF4Weight
    x: torch.Tensor  # fp32 master copies
    source: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    bias: torch.Tensor | None
    params: list[torch.Tensor]
    masks: tuple[torch.Tensor | None, torch.Tensor | None]
    dy: torch.Tensor
    scaling: float = 2.0

    def shape(self) -> tuple[int, ...]:
        seq = self.case.seq
        return (self.case.m // seq, seq, self.case.k) if seq > 1 else (self.case.m, self.case.k)


def make_problem(case: Case, device: torch.device | str, draw: int = 0) -> Problem:
    """Random inputs for ``case``, fixed by the case and ``draw`` (independent draws per value)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{case.id}/{draw}".encode()))

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    seq = case.seq
    lead = (case.m // seq, seq) if seq > 1 else (case.m,)
    w = quantize_nf4(rand(case.n, case.k, scale=0.05), blocksize=case.blocksize, double_quant=case.double_quant)
    x = rand(*lead, case.k)
    src = rand(*lead, case.k) if case.source else None
    a = rand(case.r, case.k, scale=case.k**-0.5)
    b = rand(case.n, case.r, scale=0.2)  # non-zero, unlike the init, so the LoRA term is tested
    bias = rand(case.n, scale=0.1) if case.bias else None
    params = [rand(case.r, case.r, scale=case.r**-0.5) if i % 2 == 0 else rand(case.r, scale=0.1)
              for i in range(FUSION_PARAM_COUNT[case.fusion])]  # fmt: skip
    masks = (None, None)
    if case.dropout > 0:
        keep = 1.0 - case.dropout
        masks = (
            (torch.rand(*lead, case.k, generator=g) < keep).to(device),
            (torch.rand(*lead, case.k, generator=g) < keep).to(device) if case.source else None,
        )
    dy = rand(*lead, case.n)
    return Problem(case, w, x, src, a, b, bias, params, masks, dy)


@dataclasses.dataclass
class Result:
    y: torch.Tensor
    y_source: torch.Tensor | None
    grads: dict[str, torch.Tensor]


def run(problem: Problem, backend: str, dtype: torch.dtype, adapter_dtype: torch.dtype | None = None, *,
        inputs_from: torch.dtype | None = None, adapter_inputs_from: torch.dtype | None = None,
        **kwargs) -> Result:  # fmt: skip
    """Forward and backward (with the problem's dy) on ``backend``; activations in ``dtype``.

    ``inputs_from`` / ``adapter_inputs_from``: round the activations / adapter tensors to these
    dtypes first (the float64 reference takes the low-precision run's inputs, so that only the
    computation's error is compared).
    """
    adapter_dtype = adapter_dtype or dtype
    first = inputs_from or dtype
    first_adapter = adapter_inputs_from or inputs_from or adapter_dtype

    def act(t):
        return t.to(first).to(dtype, copy=True)

    def adapter(t):
        return t.to(first_adapter).to(adapter_dtype, copy=True).requires_grad_(True)

    x = act(problem.x).requires_grad_(True)
    src = None if problem.source is None else act(problem.source)
    a = adapter(problem.lora_A)
    b = adapter(problem.lora_B)
    params = [adapter(p) for p in problem.params]
    bias = None if problem.bias is None else act(problem.bias)
    with flare_kernels.use_backend(backend):
        y, y_s = flare_lora_linear(
            x, problem.weight, a, b, problem.scaling, source=src, fusion=problem.case.fusion, bias=bias,
            dropout_p=problem.case.dropout, dropout_mask=problem.masks[0], source_dropout_mask=problem.masks[1],
            fusion_params=params, return_source_output=True, **kwargs,
        )
        assert flare_kernels.last_backend() == backend
        y.backward(act(problem.dy))
    grads = {"x": x.grad, "lora_A": a.grad, "lora_B": b.grad}
    if src is not None:
        grads.update({f"param{i}": p.grad for i, p in enumerate(params)})
    return Result(y.detach(), y_s, grads)


def check_against_reference(case: Case, device, backend: str, **kwargs) -> None:
    """Forward (both streams) and every gradient of ``backend`` against the float64 reference on
    the same inputs, by the tolerance rule; PyTorch at the input precision is the yardstick."""
    from tolerance import assert_tolerance

    problem = make_problem(case, device)
    out = run(problem, backend, case.dtype, case.adapter, **kwargs)
    low = run(problem, "torch", case.dtype, case.adapter)
    ref = run(problem, "torch", torch.float64, inputs_from=case.dtype, adapter_inputs_from=case.adapter or case.dtype)
    assert_tolerance(out.y, ref.y, low.y, "y")
    if case.source:
        assert_tolerance(out.y_source, ref.y_source, low.y_source, "y_source")
    else:
        assert out.y_source is None
    for name, g in ref.grads.items():
        assert out.grads[name] is not None, f"no gradient for {name}"
        assert_tolerance(out.grads[name], g, low.grads[name], f"d{name}")


def check_nan_and_inf_propagate(backend: str, w, x, src, a, b) -> None:
    """NaN and Inf in the inputs (6 rows) come out where the reference puts them; other rows stay finite."""
    from tolerance import assert_tolerance

    x, src = x.clone(), src.clone()
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    src[4, 7] = float("-inf")
    with flare_kernels.use_backend(backend):
        y = flare_lora_linear(x, w, a, b, 2.0, source=src)
    with flare_kernels.use_backend("torch"):
        y64 = flare_lora_linear(x.double(), w, a.double(), b.double(), 2.0, source=src.double())
        y32 = flare_lora_linear(x, w, a, b, 2.0, source=src)
    assert torch.isnan(y[1]).all()
    assert_tolerance(y, y64, y32, "y")
    assert torch.isfinite(y[[0, 3, 5]]).all()

