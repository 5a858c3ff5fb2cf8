"""The time budget: each phase gets its share of what is left of the whole, minus a reserve."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

BUDGET_S = 480.0  # 8 minutes: the device call's limit is 10, and the machine's start is not in it
RESERVE_S = 20.0  # the summary, and processes that take a few seconds to stop
# Share of what is left when a phase starts (a phase that ends early leaves its time to the next).
SHARES = {"compile": 0.10, "tests": 0.50, "bench": 0.28, "predicted": 0.12}
# The tests phase hands pytest a deadline (seconds since the epoch) after which tests/conftest.py
# starts no further GPU test; the junit counts tell those skips apart by their reason.
DEADLINE_ENV = "FLARE_GPU_CHECK_DEADLINE"
BUDGET_SKIP_REASON = "gpu-check time budget spent: not run"


class Budget:
    """Deadlines: each phase gets its share of what is left of the whole (minus a reserve)."""

    def __init__(self, total_s: float, reserve_s: float = RESERVE_S, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.start = clock()
        self.total_s = total_s
        self.end = self.start + total_s - reserve_s
        self.left_phases = list(SHARES)

    def elapsed(self) -> float:
        return self.clock() - self.start

    def phase_end(self, name: str) -> float:
        """Deadline of ``name`` (absolute); the phase is struck off the list of those to come."""
        now = self.clock()
        rest = [p for p in self.left_phases if p in SHARES]
        share = SHARES[name] / sum(SHARES[p] for p in rest) if name in rest else 0.0
        if name in self.left_phases:
            self.left_phases.remove(name)
        return now + max(0.0, self.end - now) * share

    def stamp(self) -> str:
        return f"[gpu-check {self.elapsed():5.0f}s/{self.total_s:.0f}s]"


@dataclasses.dataclass
class Phase:
    name: str
    status: str = "pending"  # ok, truncated, skipped, failed, interrupted, dry-run
    reason: str = ""
    budget_s: float | None = None
    wall_s: float | None = None
    details: dict = dataclasses.field(default_factory=dict)
