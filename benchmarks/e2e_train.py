"""The end-to-end benchmark's training measurements, the arms' steps interleaved.

The targets are ratios (FLARE step / plain QLoRA step, with checkpointing off and on), and the CPU
this runs on is shared: timing one arm's steps after the other's lets a load change between them
move the ratio (the plain QLoRA step measured 511 and 1,953 ms ten minutes apart on the 2-core
EPYC while other jobs came and went). So every arm's model stays loaded and the steps are timed
round robin, starting each round with the next arm: step i of every arm ran under the same load.
The FLARE arms' source pass alone (``e2e_source_pass``) takes its turn in the same rounds.

Then, arm by arm: peak memory of one step (CUDA: peak allocated above what the step found, plus
the arm's weights and optimizer state; CPU: peak resident-set growth plus the same) and the
memory split (``e2e_memory.py``).
"""

from __future__ import annotations

import gc
import time
from typing import Callable

import torch

from .e2e_memory import memory_split
from .results import Row
from .timing import Timing, summarize

TRAIN_OPS = {False: "e2e_train", True: "e2e_train_gc"}  # gradient checkpointing off / on


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def peak_mib(fn: Callable[[], object], dev: torch.device, resident_bytes: int) -> float | None:
    """Bytes of the model and optimizer state + the peak growth during one step (other arms' models
    stay loaded, so the device-wide peak is not the arm's)."""
    from .timing import _cpu_peak_reset, _cpu_peak_since

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - before + resident_bytes) / 2**20
    before = _cpu_peak_reset()
    fn()
    grown = _cpu_peak_since(before)
    return None if grown is None else (grown + resident_bytes) / 2**20


class ArmTraining:
    """One arm's training step on the benchmark batch, its optimizer and its source pass alone."""

    def __init__(self, arm: str, runner, batch, checkpointing: bool) -> None:
        self.arm, self.runner, self.batch = arm, runner, batch
        self.optimizer = torch.optim.AdamW(runner.parameters(), lr=1e-4)
        runner.model.train()
        runner.set_checkpointing(checkpointing)

    def forward(self):
        ids, mask, src_ids, src_mask = self.batch
        return self.runner.train_forward(ids, mask, src_ids, src_mask, labels=ids)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward().backward()
        self.optimizer.step()

    def source_pass(self) -> None:
        self.runner.source_pass(*self.batch)

    def close(self) -> None:
        self.runner.set_checkpointing(False)
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()


def round_robin(calls: dict[str, Callable[[], object]], dev, warmup: int, steps: int) -> dict[str, Timing]:
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            _sync(dev)
            t0 = time.perf_counter()
            calls[name]()
            _sync(dev)
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {n: summarize(s, "wall clock per step, arms interleaved") for n, s in samples.items()}


def measure_training(runners: dict, batch, size, dev: torch.device,
                     checkpointing: bool) -> tuple[list[Row], dict[str, Timing]]:  # fmt: skip
    """Rows of every arm's training step with checkpointing off or on; returns (rows, step timings)."""
    arms = {arm: ArmTraining(arm, runner, batch, checkpointing) for arm, runner in runners.items()}
    try:
        calls: dict[str, Callable[[], object]] = {arm: a.step for arm, a in arms.items()}
        calls.update({f"{arm}:source": a.source_pass for arm, a in arms.items() if arm != "ours_qlora"})
        timings = round_robin(calls, dev, size.warmup, size.steps)
        tokens = size.train_batch * size.train_len
        mode = "train_gc" if checkpointing else "train"
        rows: list[Row] = []
        for arm, a in arms.items():
            t = timings[arm]
            head = (TRAIN_OPS[checkpointing], arm, mode, size.label, size.r, tokens)
            rows += [
                Row(*head, "step_ms", t.p50, t.p20, t.p80),
                Row(*head, "tokens_per_s", tokens / t.p50 * 1e3, tokens / t.p80 * 1e3, tokens / t.p20 * 1e3),
            ]
            mem = peak_mib(a.step, dev, state_bytes(a.runner.model, a.optimizer))
            if mem is not None:
                rows.append(Row(*head, "peak_mem_mib", mem))
            split = memory_split(a.runner.model, a.optimizer, a.forward)
            rows += [Row("e2e_memory", arm, mode, size.label, size.r, tokens, k, v) for k, v in split.items()]
            s = timings.get(f"{arm}:source")
            if s is not None:
                rows.append(Row("e2e_source_pass", arm, mode, size.label, size.r, tokens, "step_ms", s.p50, s.p20, s.p80))
        return rows, {arm: timings[arm] for arm in arms}
    finally:
        for a in arms.values():
            a.close()


__all__ = ["TRAIN_OPS", "measure_training", "round_robin", "peak_mib", "state_bytes"]
