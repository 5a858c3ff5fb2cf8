"""The compile phase's child (``python -m benchmarks.gpu_check _warm PLAN.json JOBS``): every
kernel specialization of the plan compiled into Triton's cache by parallel processes (on one
process the tests would spend most of their time in the compiler)."""

from __future__ import annotations

import json
import time
from pathlib import Path

COMPILE_JOBS = 12  # warm-up processes (the GPU machines have 16 cores)


def warm_task(task: dict) -> tuple[int, list[str]]:
    """In a worker process: compile (JIT warm-up, nothing launched) the listed launches of one call."""
    import torch

    from flare_kernels.ops.plan import Target, launch_plan

    from .plan import spec_from_json

    dev = torch.device("cuda")
    target = Target.of(dev, interpret=False)
    plan = launch_plan(spec_from_json(task["spec"]), target, forward=True, backward=True)
    done, errors = 0, []
    for i in task["launches"]:
        launch = plan[i]
        # Real (tiny, 16-byte aligned) tensors of the same dtypes: the JIT specializes on dtype and
        # alignment, never on size; the integers (sizes, strides) are the plan's own.
        args = [torch.empty(16, dtype=a.dtype, device=dev) if isinstance(a, torch.Tensor) else a for a in launch.args]
        try:
            launch.kernel.warmup(*args, grid=launch.grid, **launch.constexprs, **launch.options)
            done += 1
        except Exception as exc:
            errors.append(f"{launch.name} ({task['spec'].get('fusion')}, M={task['spec'].get('m')}): "
                          f"{type(exc).__name__}: {str(exc)[:200]}")  # fmt: skip
    return done, errors


def main(argv: list[str]) -> int:
    """``_warm PLAN.json JOBS``: the tasks of ``compile_plan``, ``JOBS`` processes at a time."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    # By its importable name: were this module run as __main__, the function would pickle as
    # __main__.warm_task, which the spawned workers cannot import.
    from benchmarks.gpu_check.warm import warm_task as warm

    tasks = json.loads(Path(argv[0]).read_text())["tasks"]
    jobs = max(1, min(int(argv[1]), len(tasks)))
    done, errors = 0, []
    t0 = time.time()
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(warm, t) for t in tasks]
        for i, f in enumerate(as_completed(futures), 1):
            try:
                d, e = f.result()
            except Exception as exc:
                d, e = 0, [f"worker: {type(exc).__name__}: {exc}"]
            done += d
            errors += e
            if i % 10 == 0 or i == len(futures):
                print(f"compiled {done} kernels ({i}/{len(futures)} calls, {time.time() - t0:.0f} s)", flush=True)
    print("WARM " + json.dumps({"compiled": done, "errors": errors[:20], "error_count": len(errors)}), flush=True)
    return 0
