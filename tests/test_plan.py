"""The launch plan: ``launch_plan`` (meta tensors, nothing run) lists exactly the launches a real
call makes, so the ahead-of-time compile tests compile what runs."""

import pytest
import torch

import cases
from cases import Case
from flare_kernels.ops import plan
from flare_kernels.ops.plan import HOPPER, CallSpec, Target, TensorArg, launch_plan

pytest.importorskip("triton")


def _key(launch: plan.Launch):
    """What decides the compiled kernel and its launch; floats (scaling, keep scale) are run-time
    values that never specialize, so only their type is kept."""
    specs = {k: (type(v).__name__ if isinstance(v, float) else v) for k, v in launch.arg_specs().items()}
    return launch.name, launch.grid, launch.constexprs, launch.options, specs


PLAN_CASES = [
    Case(),
    Case(fusion="none", bias=False),
    Case(source=False, dropout=0.25),
    Case(fusion="mul", dropout=0.25, dtype=torch.bfloat16),
    Case(fusion="cross_attention", m=24, seq=8, dtype=torch.bfloat16, adapter=torch.float32),
    Case(fusion="matmul", m=24, seq=8, dropout=0.25, blocksize=32, k=96, double_quant=False),
    Case(m=65, r=16, dtype=torch.float16, adapter=torch.float32),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: c.id)
def test_plan_lists_exactly_the_launches_of_a_real_call(case, monkeypatch, device):
    ran: list[plan.Launch] = []
    real_run = plan.Launch.run

    def run_and_record(self):
        ran.append(self)
        real_run(self)

    monkeypatch.setattr(plan.Launch, "run", run_and_record)
    cases.run(cases.make_problem(case, device), "triton", case.dtype, case.adapter)
    target = Target.of(torch.device(device), interpret=device.type != "cuda")
    planned = launch_plan(case.call_spec(), target, forward=True, backward=True)
    assert [_key(launch) for launch in ran] == [_key(launch) for launch in planned]


@pytest.mark.parametrize("case", [Case(), Case(fusion="cross_attention", m=24, seq=8, dropout=0.25, bias=False)],
                         ids=lambda c: c.id)
def test_plan_of_the_dequant_route_lists_its_launches_and_gemms(case, monkeypatch, device):
    from flare_kernels.ops import launch

    monkeypatch.setattr(launch, "GEMM_ROUTE", "dequant")
    ran: list = []
    for cls in (plan.Launch, plan.LibraryCall):
        def run_and_record(self, _real=cls.run):
            ran.append(self)
            _real(self)

        monkeypatch.setattr(cls, "run", run_and_record)
    cases.run(cases.make_problem(case, device), "triton", case.dtype, case.adapter)
    target = Target.of(torch.device(device), interpret=device.type != "cuda")
    planned = launch_plan(case.call_spec(), target, forward=True, backward=True, library=True)

    def key(x):
        if isinstance(x, plan.LibraryCall):
            return x.name, x.m, x.n, x.k, x.dtype
        return _key(x)

    assert [key(x) for x in ran] == [key(x) for x in planned]
    names = [x.name for x in planned]
    # forward: s, W, a GEMM per stream, the LoRA term; backward: dZ, W, the dX GEMM, its LoRA term, dA, dB
    assert names.count("nf4_dequant_kernel") == 2 and names.count("gemm") == 3 and names.count("lora_up_kernel") == 2
    assert "flare_fwd_kernel" not in names and "flare_dx_kernel" not in names


def test_plan_is_pure_and_sized_by_the_target():
    spec = CallSpec(m=16, k=4096, n=4096, r=16)
    a = launch_plan(spec, HOPPER, backward=True)
    b = launch_plan(spec, HOPPER, backward=True)
    assert [_key(x) for x in a] == [_key(x) for x in b]
    # Every tensor is a meta tensor: nothing was allocated on a device.
    assert all(t.device.type == "meta" for launch in a for t in launch.args if isinstance(t, torch.Tensor))
    # The row splits of the dA reduction follow the SM count.
    reduce_hopper = [x for x in launch_plan(CallSpec(m=4096, k=4096, n=4096), HOPPER, forward=False, backward=True)
                     if x.name == "lora_reduce_kernel"]  # fmt: skip
    reduce_small = [x for x in launch_plan(CallSpec(m=4096, k=4096, n=4096), Target(num_sms=8), forward=False,
                                           backward=True) if x.name == "lora_reduce_kernel"]  # fmt: skip
    assert reduce_hopper[0].programs > reduce_small[0].programs


def test_plan_for_a_gpu_target_compiles_the_gpu_kernels():
    """Built in an interpreter process, a GPU target still gets the GPU tiles and INTERPRET=False."""
    launches = launch_plan(CallSpec(m=96, k=4096, n=4096, fusion="add_relu"), HOPPER, backward=True)
    assert {x.name for x in launches} >= {"flare_fwd_kernel", "flare_dx_kernel", "lora_reduce_kernel"}
    assert all(x.constexprs["INTERPRET"] is False for x in launches)
    fwd = launches[0]
    assert fwd.name == "flare_fwd_kernel" and fwd.constexprs["BLOCK_N"] == 128
    assert fwd.arg_specs()["xt_ptr"] == TensorArg(torch.bfloat16, aligned=True)
    # From 512 rows per stream: W dequantized once, the GEMMs by torch (cuBLAS).
    big = launch_plan(CallSpec(m=4096, k=4096, n=4096, fusion="add_relu"), HOPPER, backward=True, library=True)
    assert [x.name for x in big] == [
        "lora_down_kernel", "nf4_dequant_kernel", "gemm", "gemm", "lora_up_kernel",  # forward
        "lora_down_kernel", "nf4_dequant_kernel", "gemm", "lora_up_kernel", "lora_reduce_kernel", "lora_reduce_kernel",
    ]
    assert [(x.m, x.n, x.k) for x in big if x.name == "gemm"] == [(4096, 4096, 4096)] * 3


def test_call_spec_rejects_bad_input():
    with pytest.raises(ValueError, match="fusion must be one of"):
        CallSpec(m=1, k=64, n=64, fusion="concat")
    with pytest.raises(ValueError, match="multiple of seq_len"):
        CallSpec(m=10, k=64, n=64, fusion="matmul", seq_len=4)


def test_unaligned_tensor_is_reported_as_such():
    base = torch.empty(65, dtype=torch.bfloat16)
    launch = plan.Launch(type("K", (), {"arg_names": ["p"], "fn": None})(), (1,), (base[1:],), {}, {})
    assert launch.arg_specs() == {"p": TensorArg(torch.bfloat16, aligned=False)}


def test_weights_past_32_bit_offsets_are_refused():
    """The kernels index packed bytes with 32-bit offsets: 2**32 weights (2**31 bytes) or more is a
    clear error before any launch, not a wrapped address."""
    with pytest.raises(ValueError, match="32-bit offsets"):
        launch_plan(CallSpec(m=1, k=65536, n=65536))
    assert launch_plan(CallSpec(m=1, k=65536, n=32768))  # 2**31 weights: 2**30 bytes, fine
