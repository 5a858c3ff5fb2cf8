"""A covering set of calls: every kernel specialization the Triton backend can launch, once.

The launchers pick constexprs and tiles from a call's shapes, dtypes and flags; the JIT adds the
arguments equal to 1 and the divisibility of every pointer and integer. ``covering_specs()`` lists
calls (``CallSpec``, Llama-3.1-8B shapes) whose launch plans reach every such switch at least
once: each fusion, each activation and adapter dtype, bias, dropout, plain and nested absmax,
blocksizes 64 and 256, K aligned to the tile or not, the row-count tile classes, one and two
streams, forward and backward. It is not the cross product: what matters is the set of unique
``KernelSpec``s the plans emit (many calls share one), which ``covering_kernel_specs()`` gives.

M = 1 is special beyond its tiles: the JIT turns ``M`` into the constant 1. From 512 rows the
launchers take the "dequant" route (``nf4_dequant_kernel``, torch's GEMM, ``lora_up_kernel``);
the fused kernels' large tiles are reached at M = 96 (and by ``FLARE_KERNELS_GEMM_ROUTE=fused``
at any M, with the same specializations: M only enters as a runtime i32 divisible by 16).
"""

from __future__ import annotations

from typing import Iterable

import torch

from flare_kernels.ops.plan import HOPPER, CallSpec, Launch, Target, launch_plan, replace

from .compile import KernelSpec, spec_of, unique

# Llama-3.1-8B projections: q_proj (4096 -> 4096), gate_proj (4096 -> 14336).
Q_PROJ = dict(k=4096, n=4096)
GATE_PROJ = dict(k=4096, n=14336)
# K that is neither a multiple of the 64-wide K tile nor of 16 (so K and the row strides lose
# their divisibility too), and a K that is a multiple of 64 but not of the 256 blocksize.
UNALIGNED_K = 4100
K_NOT_BLOCK_256 = 4160

ROWS = (1, 16, 64, 96, 512, 4096, 16384)  # decode, the fused tile classes, the dequant route
SEQUENCE_FUSIONS = ("matmul", "matmul_relu", "cross_attention")
PER_TOKEN_FUSIONS = ("none", "add", "mul", "add_relu")


def covering_specs() -> list[CallSpec]:
    """Calls whose forward and backward plans cover every switch (see the module docstring).

    Each flag appears once or twice, on different tile classes, and flags share calls (which
    also covers some of their interactions); the base call (two streams, add_relu, bf16) runs at
    every row count on both Llama shapes. Every flag at three row counts (64 calls) gave 127
    unique specializations, at about 6 s of compile each for the GEMM kernels on one core; this
    set gives under half of that.
    """
    base = CallSpec(m=16, r=16, dtype=torch.bfloat16, fusion="add_relu", **Q_PROJ)
    calls: list[CallSpec] = []
    # Every row count on both shapes: the three tile classes, M = 1 as a constant.
    for m in ROWS:
        calls.append(replace(base, m=m))
        calls.append(replace(base, m=m, **GATE_PROJ))
    # Every fusion. Per-token ones reach the kernels as FUSION ("add" and "mul" ride on the flag
    # calls below, "none" on the one-stream calls); sequence-level ones (rows split into
    # sequences) take the separate down-projection and torch's phi: one spec for all three.
    calls.append(replace(base, m=16, fusion="cross_attention", seq_len=16))
    calls.append(replace(base, m=16, fusion="matmul_relu", seq_len=8))
    calls.append(replace(base, m=96, fusion="matmul", seq_len=32))
    # fp32 activations at a large tile (fp32 tiles double the shared memory), fp16 with the flags.
    calls.append(replace(base, m=96, dtype=torch.float32))
    # Flags, spread over the tile classes and combined: bias, dropout, plain absmax, blocksize
    # 256, K off the tile and off 16, K off the 256 blocksize, one stream (plain LoRA), the
    # source stream fused without its output, an fp32 adapter under 16-bit activations (the
    # down-projection leaves the K loop, or split over K runs in programs of its own; the LoRA
    # products run as 3xTF32, or two TF32 dots against 16-bit activations).
    calls += [
        replace(base, m=1, k=UNALIGNED_K, nested=False, dtype=torch.float16),
        replace(base, m=16, bias=True, dropout=True, nested=False, fusion="mul"),
        replace(base, m=64, k=K_NOT_BLOCK_256, blocksize=256, bias=True, fusion="add"),
        replace(base, m=96, bias=True, dropout=True, blocksize=256),
        replace(base, m=96, k=UNALIGNED_K),
        replace(base, m=64, source=False, fusion="none", dropout=True),
        replace(base, m=96, source=False, fusion="none"),
        replace(base, m=16, source_out=False),
        replace(base, m=16, adapter_dtype=torch.float32, fusion="mul"),
        # decode's 8-row stacked tiles with the down-projection's own programs: fp32 products of
        # dropped-out (fp32) activations
        replace(base, m=1, dropout=True, adapter_dtype=torch.float32),
        replace(base, m=96, dropout=True, adapter_dtype=torch.float32),
    ]
    # The dequant route's kernels: element-wise and per-row dequantization, each activation dtype,
    # the LoRA epilogue with dropout and with fp32 products.
    calls += [
        replace(base, m=4096, k=UNALIGNED_K, nested=False, dtype=torch.float16, bias=True),
        replace(base, m=4096, dtype=torch.float32, blocksize=256),
        replace(base, m=4096, dropout=True, adapter_dtype=torch.float32, source=False, fusion="none"),
        replace(base, m=4096, fusion="matmul", seq_len=512),
    ]
    return list(dict.fromkeys(calls))


def plan_launches(calls: Iterable[CallSpec], target: Target = HOPPER) -> list[tuple[CallSpec, Launch]]:
    """Every launch of every call's forward and backward plan, with the call it came from."""
    return [
        (call, launch)
        for call in calls
        for launch in launch_plan(call, target, forward=True, backward=True)
    ]


def covering_kernel_specs(target: Target = HOPPER) -> dict[KernelSpec, list[CallSpec]]:
    """The unique specializations over ``covering_specs()``, each with the calls that launch it."""
    owners: dict[KernelSpec, list[CallSpec]] = {}
    for call, launch in plan_launches(covering_specs(), target):
        owners.setdefault(spec_of(launch), []).append(call)
    return owners


def unique_specs(target: Target = HOPPER) -> list[KernelSpec]:
    """The unique specializations over ``covering_specs()``, in first-launch order."""
    return unique(covering_kernel_specs(target))


def tile_classes(specs: Iterable[KernelSpec]) -> list[KernelSpec]:
    """One spec per (kernel, tile shape, num_warps, activation dtype, adapter dtype): the
    specializations that differ in code layout rather than in a switch. Used for the archs
    compiled on a budget (sm_80, sm_100)."""
    chosen: dict[tuple, KernelSpec] = {}
    for spec in specs:
        c, sig = spec.constexprs, spec.signature
        activation = next((sig[p] for p in ("xt_ptr", "dy_ptr", "x0_ptr") if p in sig), None)
        tiles = tuple(c.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C"))
        key = (spec.name, tiles, spec.options.get("num_warps"), activation, c.get("LORA_DTYPE"))
        chosen.setdefault(key, spec)
    return list(chosen.values())


# ------------------------------------------------------------------------------------ the JIT's view
def _materialize(value, device: str = "cpu"):
    """A meta call's tensors as real (uninitialised) CPU tensors with the same shapes and strides."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_materialize(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v, device) for v in value)
    return value


def probe_launches() -> list[Launch]:
    """Launches recorded from calls on real CPU tensors (nothing runs), chosen to exercise the
    JIT's specialization: an activation at an address 2 bytes past 16-byte alignment, M = 1 (a
    constant), K divisible by 16 and not, dropout masks, bias, fp32 adapters, one stream."""
    from flare_kernels.ops import launch as launchers
    from flare_kernels.ops.plan import recording

    probes = [
        CallSpec(m=1, k=4096, n=4096, r=16),
        CallSpec(m=16, k=UNALIGNED_K, n=4096, r=16, bias=True, dropout=True),
        CallSpec(m=64, k=4096, n=4096, r=16, adapter_dtype=torch.float32, fusion="mul"),
        CallSpec(m=130, k=4096, n=4096, r=8, dtype=torch.float16, source=False, fusion="none"),
        CallSpec(m=32, k=4096, n=4096, r=16, fusion="matmul", seq_len=16),
    ]
    launches: list[Launch] = []
    for spec in probes:
        call = _materialize(spec.meta_call())
        m, k = call.x.shape
        buf = torch.empty(m * k + 1, dtype=call.x.dtype)
        call = call._replace(x=buf[1:].view(m, k))  # unaligned: data_ptr % 16 == 2 (or 4 in fp32)
        with recording() as recorded:
            y, _, s_t, s_s = launchers.forward(call, spec.source_out, target=HOPPER)
            launchers.backward(call, torch.empty_like(y), s_t, s_s, spec.needs, target=HOPPER)
        launches += [x for x in recorded if isinstance(x, Launch)]  # not the library GEMMs
    return launches


def jit_agreement() -> list[str]:
    """Where ``spec_of`` and the running Triton's own JIT binder disagree, over ``probe_launches()``
    and over single argument values (ints around the i32/i64 bounds, 1, multiples of 16, floats,
    bools, aligned and unaligned tensors). Empty when they agree."""
    from .compile import jit_spec, specialize_arg

    problems = []
    for launch in probe_launches():
        ours, theirs = spec_of(launch), jit_spec(launch.kernel, launch.args, launch.constexprs, launch.options)
        if ours != theirs:
            a, b = ours.to_dict(), theirs.to_dict()
            diff = {f: (a[f], b[f]) for f in a if a[f] != b[f]}
            for f in ("signature", "constexprs", "attrs"):
                if f in diff:
                    keys = set(a[f]) | set(b[f])
                    diff[f] = {n: (a[f].get(n), b[f].get(n)) for n in sorted(keys) if a[f].get(n) != b[f].get(n)}
            problems.append(f"{launch.name}: spec_of vs JIT {diff}")

    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = type(make_backend(GPUTarget("cuda", 90, 32)))
    buf = torch.empty(64, dtype=torch.bfloat16)
    values = [1, 0, 2, 15, 16, 48, -16, -1, 2**31 - 1, 2**31 - 16, 2**31, 2**31 + 16, -(2**31), -(2**31) - 16,
              2**63 - 1, 2**63, 1.0, 0.5, True, False, None, buf, buf[1:], buf[8:],
              torch.empty(4, dtype=torch.uint8), torch.empty(4, dtype=torch.bool), torch.empty(4, dtype=torch.float32),
              torch.empty(4, dtype=torch.float16), torch.empty(4, dtype=torch.int32)]  # fmt: skip
    for v in values:
        ty, const, div = specialize_arg(v)
        jit_ty, jit_attr = native_specialize_impl(backend, v, False, True, True)
        ours = (ty, const if ty == "constexpr" else ("D" if div else ""))
        theirs = (jit_ty, jit_attr if jit_ty == "constexpr" else (jit_attr or ""))
        if ours != theirs:
            shown = f"tensor({v.dtype}, ptr % 16 = {v.data_ptr() % 16})" if isinstance(v, torch.Tensor) else repr(v)
            problems.append(f"{shown}: spec_of gives {ours}, the JIT {theirs}")
    return problems


if __name__ == "__main__":  # python -m benchmarks.static.coverage jit: the JIT check under this process's triton
    import json
    import sys

    if sys.argv[1:] == ["jit"]:
        print(json.dumps(jit_agreement()))


def tile_extremes(specs: Iterable[KernelSpec]) -> list[KernelSpec]:
    """Every kernel at least once: the smallest and the largest output tile of each GEMM kernel
    (bf16) and one spec of each skinny LoRA kernel (a smoke set for the archs and versions
    compiled on a budget: sm_80 and sm_100 under the pinned Triton, sm_100 under the installed
    one, whose ptxas takes the longest)."""
    chosen: dict[tuple, KernelSpec] = {}
    classes = tile_classes(specs)
    gemm = [s for s in classes if s.name in ("flare_fwd_kernel", "flare_dx_kernel")
            and s.constexprs.get("LORA_DTYPE") == "tl.bfloat16"]  # fmt: skip
    for spec in sorted(gemm, key=lambda s: s.constexprs["BLOCK_M"] * s.constexprs["BLOCK_N"]):
        chosen.setdefault((spec.name, "small"), spec)
        chosen[(spec.name, "large")] = spec
    for spec in classes:
        if spec.name not in ("flare_fwd_kernel", "flare_dx_kernel"):
            chosen.setdefault((spec.name, "any"), spec)
    return unique(chosen.values())
