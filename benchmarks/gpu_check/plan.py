"""What the check runs: the gpu test files, the calls our kernels make (as launch-plan specs) and
the kernel specializations they compile, the benchmark preset's cells.

Everything here is computed on any machine (meta tensors, no CUDA): the dry run records it, the
compile phase warms up exactly these specializations.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from .layout import TESTS

PRESET = "gpu-check"
FIRST_TEST_FILES = ("test_gpu_shapes.py", "test_kernels.py")  # the kernels' numerics first, if time runs out
_DTYPES = ("float32", "bfloat16", "float16", "float64")


# ------------------------------------------------------------------------------------ tests
def gpu_test_files(root: Path = TESTS) -> list[Path]:
    """Test files holding gpu-marked tests (only these are collected: the others may need packages
    the GPU image lacks, and their non-gpu tests would be deselected anyway), most important first."""
    found = [p for p in root.rglob("test_*.py") if "mark.gpu" in p.read_text(encoding="utf-8")]
    rank = {name: i for i, name in enumerate(FIRST_TEST_FILES)}
    return sorted(found, key=lambda p: (rank.get(p.name, len(rank)), str(p)))


def import_gpu_cases() -> list:
    """tests/test_gpu_shapes.py's grid (its cases are also what the compile phase warms up)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return list(importlib.import_module("test_gpu_shapes").GPU_CASES)


# ------------------------------------------------------------------------------------ calls, as launch-plan specs
def spec_of_test_case(case) -> "Any":
    """A GPU test case's launch plan input (tests/cases.py owns the mapping)."""
    return case.call_spec()


@functools.cache
def _our_providers() -> dict:
    from ..providers import all_providers
    from ..providers.ours import Ours

    return {p.name: p for p in all_providers() if isinstance(p, Ours)}


def spec_of_bench_case(case, provider: str = "ours") -> "Any":
    """A benchmark provider of our kernels on a benchmark case, as a launch-plan call (None for the
    other providers): the providers' activations (bf16) and LoRA factor dtype (``ours``: fp32,
    ``ours_bf16_{fused,split}_down``: bf16, the down-projection placed so), NF4 double quant,
    blocksize 64."""
    from flare_kernels.ops.plan import CallSpec

    from ..providers import ACT_DTYPE

    p = _our_providers().get(provider)
    if p is None:
        return None
    return CallSpec(m=case.m, k=case.shape.k, n=case.shape.n, r=case.r, dtype=ACT_DTYPE,
                    adapter_dtype=p.adapter_dtype, fusion=case.fusion, source=case.two_stream,
                    source_out=case.two_stream, bias=False, fuse_down=p.fuse_down)  # fmt: skip


def spec_to_json(spec) -> dict:
    d = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "params"}
    for key in ("dtype", "adapter_dtype"):
        d[key] = None if d[key] is None else str(d[key]).removeprefix("torch.")
    d["needs"] = list(d["needs"])
    return d


def spec_from_json(d: dict):
    import torch

    from flare_kernels.ops.plan import CallSpec

    d = dict(d)
    for key in ("dtype", "adapter_dtype"):
        if d[key] is not None:
            assert d[key] in _DTYPES, d[key]
            d[key] = getattr(torch, d[key])
    d["needs"] = tuple(d["needs"])
    return CallSpec(**d)


# ------------------------------------------------------------------------------------ what to compile
def compile_plan(specs: Iterable, target=None, deadline: float | None = None) -> dict:
    """Distinct kernel specializations over ``specs`` (forward + backward of each call) and, per
    spec, the indices of the launches that add a new one: the warm-up's tasks."""
    from flare_kernels.ops.plan import HOPPER, launch_plan

    # What the JIT compiles a launch for (kernel, constexprs, options, argument types, alignment
    # and integer specializations): the static report's own key.
    from ..static.compile import spec_of

    target = target or HOPPER
    seen: dict = {}
    tasks, errors, launches = [], [], 0
    unique = list(dict.fromkeys(specs))  # CallSpec is frozen and hashable
    for n, spec in enumerate(unique):
        if deadline is not None and time.time() > deadline:
            errors.append(f"planning stopped at its deadline: {len(unique) - n} of {len(unique)} calls not planned")
            break
        try:
            plan = launch_plan(spec, target, forward=True, backward=True)
        except Exception as exc:  # a spec the launchers reject is reported, not fatal
            errors.append(f"{spec.id}: {type(exc).__name__}: {exc}")
            continue
        launches += len(plan)
        new = []
        for i, launch in enumerate(plan):
            key = spec_of(launch)
            if key not in seen:
                seen[key] = launch.name
                new.append(i)
        if new:
            tasks.append({"spec": spec_to_json(spec), "launches": new})
    by_kernel: dict[str, int] = {}
    for name in seen.values():
        by_kernel[name] = by_kernel.get(name, 0) + 1
    return {"calls": len(tasks), "launches": launches, "kernels": len(seen), "by_kernel": by_kernel,
            "tasks": tasks, "errors": errors, "target": getattr(target, "name", str(target))}  # fmt: skip


# ------------------------------------------------------------------------------------ what to time
def bench_plan(preset) -> dict:
    """Cases x providers benchmarks.run would time (availability on the device aside)."""
    from ..providers import all_providers

    provs = [p for p in all_providers() if any(preset.runs(p.name, c) for c in preset.cases())]
    plan = {}
    for c in preset.cases():
        names = [p.name for p in provs if p.supports(c) and preset.runs(p.name, c)
                 and "cuda" in getattr(p, "devices", ("cuda",))]  # fmt: skip
        plan[str(c)] = names
    return {"preset": preset.name, "cases": len(plan), "measurements": sum(map(len, plan.values())), "cells": plan}
