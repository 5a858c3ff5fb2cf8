"""The training progress bar (loss, tokens/s, memory) and a graceful Ctrl-C.

Memory is the CUDA allocator's peak on GPUs and the process's peak resident set size on CPUs.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import sys
import threading
import time

import torch
from tqdm.auto import tqdm

from .report import run_log


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


class Progress:
    """tqdm over optimizer steps; ``update`` takes the step's loss and token count."""

    def __init__(
        self, total: int, initial: int, desc: str, device: torch.device, enabled: bool, quiet: bool = False
    ) -> None:
        """enabled: show the bar; quiet: no bar, but ``note`` lines on stderr (signs of life per epoch)."""
        self.device, self.quiet = device, quiet
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self.t0 = time.perf_counter()
        self.tokens = 0

    def update(self, loss: float, tokens: int, lr: float) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(
            loss=f"{loss:.4f}",
            tok_s=f"{rate:,.0f}",
            mem=f"{memory_gib(self.device):.2f}GiB",
            lr=f"{lr:.2e}",
            refresh=False,
        )
        self.bar.update(1)

    def write(self, text: str) -> None:
        """A line on screen (above the bar) and in the run's log file."""
        self.bar.write(text, file=sys.stderr)
        run_log.info(text)

    def note(self, text: str) -> None:
        """A line in the log file, and on screen when there is no bar to show the same (--no-progress)."""
        if self.quiet:
            print(text, file=sys.stderr, flush=True)
        run_log.info(text)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)

    def close(self) -> None:
        self.bar.close()


class StopFlag:
    """Set by the first SIGINT/SIGTERM: the loop checkpoints at the next step boundary and leaves.
    A second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
            self.reason = signal.Signals(signum).name
            print(
                f"\nflare: {self.reason} received: stopping at the next step boundary, with a checkpoint "
                "(in the final test evaluation: now); Ctrl-C again to stop at once",
                file=sys.stderr,
                flush=True,
            )

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)
