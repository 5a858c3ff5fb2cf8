"""FSDP2 for QLoRA: the frozen 4-bit weights sharded across processes, the adapters replicated.

A 70B model in NF4 is about 35 GB: more than a 24 GB GPU holds, and most of an 80 GB one once
FLARE's two streams double the activations. Here each rank keeps 1/world of every frozen tensor
(NF4 bytes, scales, norms, embeddings) and FSDP2 all-gathers one decoder block at a time, for its
forward and again for its backward (then frees it)::

    fully_shard(block) for every decoder block      the block's frozen tensors: one all-gather group
    fully_shard(embeddings), fully_shard(lm_head)    one group each (untied)
    fully_shard(flare_model)                         the rest (final norm)
    DistributedDataParallel(flare_model)             the adapters: replicated, gradients all-reduced

* NF4 data as parameters: ``NF4Weight.make_shardable`` holds packed bytes, absmax codes, nested
  scales and code maps as frozen uint8 parameters (views, no copy; any bitsandbytes
  ``quant_storage`` is bytes).
  FSDP2 pads dim 0 to a multiple of world and shards it; the fused kernels read the gathered bytes
  (no dequantized copy is ever gathered). FSDP2's mixed precision never casts integer parameters,
  so the fp32 scales keep their bits.
* Adapters are left out of FSDP (``ignored_params``) and averaged by DDP in fp32 (the adapters'
  dtype): the same reduction as DDP training, so checkpoints, ``--resume``, best-adapter selection and
  ``save_pretrained`` (PEFT layout) work unchanged from any rank count, with nothing to gather. Cost:
  every rank keeps the adapter and its AdamW state: r=8 on all linear layers of Llama 3.1 70B is
  104 M parameters, 1.0 GB as fp32 weights + grads + 8-bit AdamW moments (a trainable lm_head
  copy, 1.05 B bf16 weights, would add 6.3 GB a rank: keep modules_to_save empty for 70B).
* Mixed precision: the frozen tensors are already in the compute dtype (bf16 as the runner loads
  them on a GPU, with bf16 autocast), so FSDP2 casts nothing (``param_dtype=None``: a cast to bf16
  of an fp32 tensor would make sharded training differ from one process). The adapters are fp32 on
  every device, so their reduction is fp32 everywhere; on a CPU everything runs in fp32 (the
  runner's CPU compute dtype), which gloo reduces natively.
* Rank-0-only work (validation, the test evaluation) runs inside :func:`gathered`: every rank
  gathers the whole model (a collective), then rank 0 evaluates with no collective per layer.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from flare_kernels.format.nf4 import NF4Weight

STRATEGIES = ("ddp", "fsdp")


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    return FSDPModule, MixedPrecisionPolicy, fully_shard


def shard(model: nn.Module, device: torch.device, world: int, *, param_dtype: torch.dtype | None = None) -> list[str]:
    """Shard ``model``'s (a FlareModel's) frozen tensors over ``world`` processes, one group per decoder block.

    Returns the names of the frozen parameters and of all buffers: DDP must leave them alone (its
    start-up broadcast would overwrite rank 1's shards with rank 0's). Call it on every rank.
    """
    from torch.distributed.device_mesh import init_device_mesh

    _, MixedPrecisionPolicy, fully_shard = _fsdp()
    blocks = getattr(getattr(model, "targets", None), "blocks", None)
    if not blocks:
        raise ValueError("--distributed fsdp shards per decoder block: wrap the model with flare.get_flare_model first")
    for m in model.modules():
        if isinstance(m, NF4Weight):
            m.make_shardable()
    trainable = {p for p in model.parameters() if p.requires_grad}
    mesh = init_device_mesh(device.type, (world,))
    # reduce_dtype only matters for sharded trainable parameters: there are none (adapters are ignored)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    groups = [model.base_model.get_submodule(path) for path in blocks]
    # The embeddings and the output head get groups of their own: left to the root group they would stay
    # gathered for the whole step (FSDP2 keeps the root unsharded between forward and backward), 2 x 2.1 GB
    # in bf16 for Llama 3.1 70B's 128256 x 8192. Tied ones (one tensor) stay in the root group.
    heads = [getattr(model.base_model, f"get_{side}_embeddings", lambda: None)() for side in ("input", "output")]
    heads = [h for h in heads if h is not None and any(not p.requires_grad for p in h.parameters())]
    if len(heads) == 2 and {id(p) for p in heads[0].parameters()} & {id(p) for p in heads[1].parameters()}:
        heads = []
    for module in groups + heads:
        fully_shard(module, mesh=mesh, mp_policy=policy, ignored_params=trainable)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    return frozen + [n for n, _ in model.named_buffers()]


def is_sharded(model: nn.Module) -> bool:
    FSDPModule, _, _ = _fsdp()
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every frozen tensor of a sharded model whole on every rank inside the block (a collective: all
    ranks enter it), so one rank may run forwards alone. A model FSDP did not shard passes through."""
    FSDPModule, _, _ = _fsdp()
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in groups:
            m.reshard()
            # back to fully_shard's defaults: blocks free their weights after forward, the root keeps its own
            # (FSDP2 sets the root to False: its backward follows at once)
            m.set_reshard_after_forward(m is not model, recurse=False)


class NF4Meter:
    """Bytes of the 4-bit weights a rank holds at any moment: every ``NF4Weight`` tensor's storage (its
    local shard when sharded) plus the gathered copies FSDP2 has allocated right now (a resharded one has
    its storage resized to 0). Built once, read cheaply (``held()``) as often as every op."""

    def __init__(self, model: nn.Module) -> None:
        self._local = []
        for m in model.modules():
            if isinstance(m, NF4Weight):
                for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
                    self._local.append(t.to_local() if hasattr(t, "to_local") else t)
        # FSDP2's FSDPParam of each NF4 tensor (private API, torch 2.13): its _unsharded_param, once created,
        # is the gathered copy the kernels read
        self._gathered = []
        for m in model.modules():
            state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
            group = getattr(state, "_fsdp_param_group", None)
            for fp in getattr(group, "fsdp_params", ()):
                if isinstance(fp._module_info.module, NF4Weight):
                    self._gathered.append(fp)

    def held(self) -> int:
        total = sum(t.untyped_storage().nbytes() for t in self._local)
        for fp in self._gathered:
            gathered = getattr(fp, "_unsharded_param", None)
            if gathered is not None:
                total += gathered.untyped_storage().nbytes()
        return total


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds now: ``nf4``, the 4-bit weights (``NF4Meter``: shards, plus any gathered copy
    still allocated); ``adapters``, the trainable parameters (replicated)."""
    adapters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"nf4": NF4Meter(model).held(), "adapters": adapters}
