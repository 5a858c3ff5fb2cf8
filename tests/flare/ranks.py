"""Multi-process test helpers (gloo on CPU): a free port and a spawn that cannot hang the suite."""

from __future__ import annotations

import socket
import time

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, args: tuple, world: int, timeout: float) -> None:
    """``target(rank, *args)`` on ``world`` processes. A hang (a collective one rank never entered)
    fails instead of blocking the test run: ranks still alive after ``timeout`` s are killed."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {timeout:.0f} s (hung in a collective?)"
    assert [p.exitcode for p in procs] == [0] * world
