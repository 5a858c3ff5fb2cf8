"""Data-parallel training under ``torchrun`` / ``accelerate launch`` (DDP).

The launcher sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); we join the
process group (NCCL on GPUs, gloo on CPUs), put each process on ``cuda:LOCAL_RANK`` and wrap the
FlareModel in ``DistributedDataParallel``:

* no buffer sync before each forward (``broadcast_buffers=False``, ``forward_sync_buffers=False`` in
  torch >= 2.13): the NF4 weights are frozen buffers, identical on every rank by
  construction; re-broadcasting them before every forward would move the whole 4-bit model.
* gradients of the trainable adapter are averaged by DDP; the loss is pre-multiplied by the world
  size so the step equals one process on the whole global batch (batching.py).
* gradient accumulation skips the all-reduce on all but the last micro-batch (``no_sync``).

``--distributed fsdp`` (``FLARE_DISTRIBUTED=fsdp``, or ``accelerate launch`` with an FSDP config):
before DDP, the frozen tensors (the NF4 bytes included) are sharded over the processes with FSDP2,
one all-gather group per decoder block, and DDP then sees only the adapters (see ``fsdp.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import os

import torch
import torch.distributed as tdist


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """All-reduced sum (a copy on the training device; the input is untouched)."""
        # NCCL reduces CUDA tensors only: a CPU tensor handed to it fails, so the copy lives on our device
        value = value.detach().to(self.device, copy=True)
        if self.enabled:
            tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
        return value

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on at least one (a decision all ranks must share)."""
        if not self.enabled:
            return flag
        value = torch.tensor(int(flag), device=self.device)
        tdist.all_reduce(value, op=tdist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process (any picklable value; other ranks' ``obj`` is ignored)."""
        if not self.enabled:
            return obj
        box = [obj]
        # the pickled bytes travel as a tensor: on the training device, as NCCL requires
        tdist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def strategy_from_env() -> str:
    """``FLARE_DISTRIBUTED`` (what ``flare train --distributed`` sets), else FSDP when ``accelerate launch``
    runs with an FSDP config (it sets ACCELERATE_USE_FSDP), else DDP."""
    from .fsdp import STRATEGIES

    name = os.environ.get("FLARE_DISTRIBUTED", "").strip().lower()
    if not name:
        return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") else "ddp"
    if name not in STRATEGIES:
        raise ValueError(f"FLARE_DISTRIBUTED={name!r}: expected one of {', '.join(STRATEGIES)}")
    return name


def init_distributed(device_name: str = "auto") -> Dist:
    """Join the process group if launched by torchrun / accelerate (WORLD_SIZE > 1)."""
    strategy = strategy_from_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=60))
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, strategy=strategy)


def wrap(model, dist: Dist, *, find_unused: bool = False):
    """The module the training loop calls: DDP around the model when distributed (its frozen tensors
    sharded first under ``--distributed fsdp``)."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if dist.strategy == "fsdp":
        from .fsdp import is_sharded, resident_bytes, shard
        from .report import run_log

        if not is_sharded(model):
            whole = resident_bytes(model)["nf4"]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, shard(model, dist.device, dist.world)
            )
            run_log.info(
                "--distributed fsdp: frozen weights sharded over %d processes; 4-bit weights on rank %d: %.2f of %.2f MB",
                dist.world, dist.rank, resident_bytes(model)["nf4"] / 1e6, whole / 1e6,
            )  # fmt: skip

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers (the old name warns); 2.11 knows only the old.
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync_buffers = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused, **no_sync_buffers)


def no_sync(module, skip: bool):
    """Skip DDP's gradient all-reduce for an accumulation micro-batch."""
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def gathered(model):
    """A context in which a model sharded by ``--distributed fsdp`` is whole on every rank, so one rank can
    run it alone (all ranks must enter it: it all-gathers); a no-op for any other model."""
    from .fsdp import gathered as fsdp_gathered, is_sharded

    return fsdp_gathered(model) if is_sharded(model) else contextlib.nullcontext(model)


def unwrap(module):
    return getattr(module, "module", module)
