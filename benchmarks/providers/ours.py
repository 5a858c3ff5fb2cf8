"""flare_kernels itself: the fused op, its pure-PyTorch reference, and torch.compile of the reference.

``ours`` runs ``flare_kernels.flare_lora_linear`` with the ``auto`` backend: the fused Triton
kernels on CUDA; on a CPU the native C++ kernels when built, else the reference (the fastest
path this package has there). On CUDA two more entries time both placements of the LoRA
down-projection (inside the base K loop or a separate pass; ``FLARE_KERNELS_FUSE_DOWN``), which
the core issue asks to decide by measurement.
"""

from __future__ import annotations

import contextlib

import torch

from .base import ACT_DTYPE, ADAPTER_DTYPE, Layer, LayerWeights, Provider, tensor_bytes


def _nf4_bytes(w) -> int:
    t = w.tensors()
    return tensor_bytes(t.packed, t.absmax, t.code, t.nested_absmax, t.nested_code, t.nested_offset)


def resolved_backend(dev: torch.device) -> str:
    """The backend ``ours`` runs on ``dev`` (``triton``, ``cpu`` or ``torch``), or why none resolves."""
    try:
        import flare_kernels as fk
        from flare_kernels.ops import backend

        with fk.use_backend("auto"):
            return backend.resolve(dev)
    except Exception as exc:  # a broken install must show up in the results, not abort the suite
        return f"unresolved ({type(exc).__name__}: {exc})"


@contextlib.contextmanager
def _fuse_down(value: bool | None):
    if value is None:
        yield
        return
    from flare_kernels.ops import launch

    previous = launch.FUSE_DOWN_DEFAULT
    launch.FUSE_DOWN_DEFAULT = value
    try:
        yield
    finally:
        launch.FUSE_DOWN_DEFAULT = previous


def fuse_down_default() -> bool | None:
    """The package's default placement of the down-projection (None without Triton)."""
    try:
        from flare_kernels.ops import launch
    except ImportError:
        return None
    return launch.FUSE_DOWN_DEFAULT


class Ours(Provider):
    name = "ours"
    label = "flare-kernels (ours)"
    ours = True
    adapter_dtype = ADAPTER_DTYPE
    fuse_down: bool | None = None  # None: the package default

    def build(self, weights: LayerWeights) -> Layer:
        import flare_kernels as fk

        w = weights.nf4()
        a, b = weights.trainable_lora(self.adapter_dtype)
        scaling = weights.scaling

        def fn(inp, case):
            with fk.use_backend("auto"), _fuse_down(self.fuse_down):
                out = fk.flare_lora_linear(
                    inp.x, w, a, b, scaling, source=inp.src, fusion=case.fusion,
                    return_source_output=inp.src is not None,
                )  # fmt: skip
            return out if isinstance(out, tuple) else (out, None)

        return Layer(fn, [a, b], _nf4_bytes(w) + tensor_bytes(a, b))


class OursBf16Down(Ours):
    """``ours`` with bf16 LoRA factors and the down-projection placement forced (Triton only).

    The Triton forward computes the down-projection inside the base K loop only when the adapter
    has the activations' dtype (fp32 adapters, PEFT's QLoRA default and ``ours``' setting here,
    always run it as a separate pass), so the placement (``FLARE_KERNELS_FUSE_DOWN``) is decided
    on this pair: bf16 adapters, in the K loop or as a separate pass.
    """

    ours = False
    adapter_dtype = torch.bfloat16

    def __init__(self, fuse_down: bool) -> None:
        self.fuse_down = fuse_down
        self.name = f"ours_bf16_{'fused' if fuse_down else 'split'}_down"
        self.label = f"ours, bf16 adapter, down-projection {'in the K loop' if fuse_down else 'as a separate pass'}"

    def unavailable(self, dev: torch.device) -> str | None:
        reason = super().unavailable(dev)
        if reason:
            return reason
        backend = resolved_backend(dev)
        if backend == "triton":
            return None
        return f"the down-projection placement is a Triton switch; ours runs {backend} here"


class Reference(Provider):
    """``flare_kernels.flare_lora_reference`` under torch autograd: the executable spec.

    Where ``ours`` itself runs the reference (a CPU without the native backend) the inference
    forward is the same computation, so it is not timed twice; the training modes still differ
    (autograd saves the dequantized weight, ours' registered backward dequantizes again).
    """

    name = "reference"
    label = "reference (eager PyTorch)"

    def redundant(self, case, ours_backend: str) -> bool:
        return ours_backend == "torch" and case.mode == "fwd"

    def build(self, weights: LayerWeights) -> Layer:
        from flare_kernels.reference import flare_lora_reference

        w = weights.nf4()
        a, b = weights.trainable_lora()
        scaling = weights.scaling

        def fn(inp, case):
            out = flare_lora_reference(
                inp.x, w, a, b, scaling, source=inp.src, fusion=case.fusion, compute_dtype=ACT_DTYPE,
                return_source_output=inp.src is not None,
            )  # fmt: skip
            return out.y, out.y_source

        return Layer(fn, [a, b], _nf4_bytes(w) + tensor_bytes(a, b))


def _reference_on_tensors(x, src, packed, absmax, code, nested_absmax, nested_code, nested_offset, a, b,
                          n: int, k: int, blocksize: int, scaling: float, fusion: str):  # fmt: skip
    from flare_kernels.format.nf4 import NF4Tensors
    from flare_kernels.reference import flare_lora_reference

    w = NF4Tensors(packed, absmax, code, nested_absmax, nested_code, nested_offset, n, k, blocksize)
    out = flare_lora_reference(
        x, w, a, b, scaling, source=src, fusion=fusion, compute_dtype=ACT_DTYPE, return_source_output=src is not None
    )
    return out.y, out.y_source


_COMPILED = None


def compiled_reference():
    """One compiled function for every case (the weights are arguments, so nothing is constant-folded)."""
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo

        # Every (shape, M, mode) is a new specialization of the same code object: without a
        # larger cache dynamo would silently fall back to eager after 8 of them.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 4096
            )
        # Only the token dimension is dynamic (marked per call): one compilation per (shape, op,
        # grad mode, M = 1 or M > 1) instead of one per M (7 to 13 s each on a 2-core CPU), with
        # N, K and the blocksize static. dynamic=True made them symbolic as well, and the compiled
        # forward of a 4096 x 4096 layer ran 3x slower than eager on the CPU (1.1 to 1.5 s against
        # 0.3 to 0.4 s); automatic dynamic shapes made N symbolic after the first shape (2x slower).
        torch._dynamo.config.automatic_dynamic_shapes = False
        _COMPILED = torch.compile(_reference_on_tensors)
    return _COMPILED


class ReferenceCompiled(Provider):
    """``torch.compile`` of the reference (inductor, default mode), the weights as arguments."""

    name = "reference_compiled"
    label = "torch.compile(reference)"

    def build(self, weights: LayerWeights) -> Layer:
        w = weights.nf4()
        t = w.tensors()
        a, b = weights.trainable_lora()
        scaling = weights.scaling
        compiled = compiled_reference()

        def fn(inp, case):
            if case.m > 1:  # dynamo specializes sizes 0 and 1: M = 1 compiles on its own
                for rows in (inp.x, inp.src):
                    if rows is not None:
                        torch._dynamo.mark_dynamic(rows, 0)
            return compiled(
                inp.x, inp.src, t.packed, t.absmax, t.code, t.nested_absmax, t.nested_code, t.nested_offset,
                a, b, t.out_features, t.in_features, t.blocksize, scaling, case.fusion,
            )  # fmt: skip

        return Layer(fn, [a, b], _nf4_bytes(w) + tensor_bytes(a, b))
