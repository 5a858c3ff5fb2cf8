"""Where a training step's memory goes: the split behind the end-to-end peak-memory figure.

* ``weights_mib``: the frozen parameters and buffers (NF4 packed bytes and quantization state,
  embeddings, norms; a trained copy's original too).
* ``adapters_optimizer_mib``: the trainable parameters and the optimizer state.
* ``saved_activations_mib``: what the forward leaves alive for the backward: the autograd graph's
  saved tensors, FLARE's source records, the logits and loss.
* ``recompute_peak_mib``: the most the backward adds on top of that: the gradients, temporaries
  and, under gradient checkpointing, the recomputed blocks' activations.
* ``forward_peak_mib``: the most the forward holds at any time (FLARE: the source pass's own
  transient activations fall here, not on top of the saved ones).
* ``step_peak_mib``: weights + adapters and optimizer + the larger of the forward peak and saved
  activations + recompute peak: the step's peak by this count.

Counted by a ``TorchDispatchMode`` over the output storages of every op the step runs (a weakref
on each storage takes it off when it is freed), so the split is the allocator-independent count of
live tensor bytes, the same on a CPU and on CUDA. Temporaries inside one custom-op call (the fused
FLARE op, bitsandbytes' dequantization) live and die within the call and are not seen.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = 2**20


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages op outputs created under the mode, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._keys: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._keys.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results share an input's storage: counted with it, or not at all when it
        # existed before the mode (a parameter's detach() would otherwise count the parameter).
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in self._keys or key in inputs:
                continue
            self._keys.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, nbytes)
        return out


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_split(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 forward: Callable[[], torch.Tensor]) -> dict[str, float]:  # fmt: skip
    """One training step (``forward`` returns the loss), its memory split in MiB (see the module doc).

    The optimizer must have stepped once (its state exists)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = _bytes(p for p in params if not p.requires_grad) + _bytes(model.buffers())
    state = _bytes(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    optimizer.zero_grad(set_to_none=True)
    with LiveBytes() as mem:
        loss = forward()
        saved, forward_peak = mem.live, mem.peak
        mem.peak = mem.live
        loss.backward()
        recompute = mem.peak - saved
    del loss
    optimizer.step()
    static = weights + _bytes(trainable) + state
    return {
        "weights_mib": weights / MIB,
        "adapters_optimizer_mib": (_bytes(trainable) + state) / MIB,
        "saved_activations_mib": saved / MIB,
        "recompute_peak_mib": recompute / MIB,
        "forward_peak_mib": forward_peak / MIB,
        "step_peak_mib": (static + max(forward_peak, saved + recompute)) / MIB,
    }


__all__ = ["LiveBytes", "memory_split"]
