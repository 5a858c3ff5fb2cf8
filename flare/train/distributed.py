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

FSDP for QLoRA (documented, not run or tested here). The usual bitsandbytes route is
``BitsAndBytesConfig(..., bnb_4bit_quant_storage=torch.bfloat16)``: the packed NF4 bytes then live in
bf16 ``Params4bit`` parameters that FSDP can flatten and shard together with the bf16 embeddings and
norms, launched with ``accelerate launch --use_fsdp`` (``fsdp_use_orig_params: true``, so frozen and
trainable tensors may share a flat parameter; ``fsdp_cpu_ram_efficient_loading: true``). Wrap the
model with FLARE *before* FSDP. Caveat with FLARE's projections: they hold the NF4 bytes as frozen
*buffers* (``NF4Weight.from_bnb`` views any quant_storage dtype as uint8 without copying), and FSDP
shards parameters, not buffers, so each GPU keeps all 4-bit weights (about 3.6 GB for Llama
3.1 8B: 7.0 B weights at 4.13 bits) and FSDP shards only the unquantized and trainable tensors. An
8B-9B model fits one GPU in 4 bits, so DDP is the multi-GPU path this package supports and tests.
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


def init_distributed(device_name: str = "auto") -> Dist:
    """Join the process group if launched by torchrun / accelerate (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=60))
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def wrap(model, dist: Dist, *, find_unused: bool = False):
    """The module the training loop calls: DDP around the model when distributed."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

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


def unwrap(module):
    return getattr(module, "module", module)
