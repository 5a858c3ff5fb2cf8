"""The launch plan: every Triton kernel launch an op call makes, as data.

The launchers in ``ops/launch.py`` never call a kernel themselves: they describe each launch as a
``Launch`` (kernel, grid, runtime arguments, constexprs, compile options) and hand it to
``submit``. In a real call ``submit`` runs it at once; inside ``recording()`` it is only appended
to a list. ``launch_plan`` runs the same launchers on meta tensors (shapes, strides and dtypes, no
data) while recording, so the plan is a pure function of the call's shapes, dtypes and flags and
of the device's properties (``Target``), and it cannot drift from what a real call launches: both
come from one code path. The ahead-of-time compile tests and the static cost report
(``benchmarks/static``) compile exactly these launches.

    >>> plan = launch_plan(CallSpec(m=16, k=4096, n=4096, r=16), backward=True)
    >>> [(l.name, l.grid) for l in plan]
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..format.nf4 import NESTED_BLOCKSIZE, NF4Tensors
from ..reference.fusion import FUSIONS
from .fusion_glue import LoraCall


# ------------------------------------------------------------------------------------ the device
@dataclass(frozen=True)
class Target:
    """What the launchers read of a device: its SM count (grid sizing) and whether the kernels run
    under Triton's interpreter (tiles sized for NumPy, dot operands upcast)."""

    num_sms: int
    interpret: bool = False
    name: str = ""

    @classmethod
    def of(cls, device: torch.device, interpret: bool) -> "Target":
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            return cls(num_sms=props.multi_processor_count, interpret=interpret, name=props.name)
        # Interpreted kernels on CPU tensors: two programs per split is enough to exercise the
        # split paths, and keeps NumPy's work small.
        return cls(num_sms=2, interpret=interpret, name=device.type)


# H100 SXM and H200 both have 132 SMs (the GPUs this project is measured on).
HOPPER = Target(num_sms=132, name="H100/H200")
# A100 SXM: 108 SMs (sm_80, the Ampere compile target).
AMPERE = Target(num_sms=108, name="A100")


# ------------------------------------------------------------------------------------ one launch
@dataclass(frozen=True)
class TensorArg:
    """A tensor argument as the JIT sees it: its dtype and whether its address is 16-byte aligned
    (then the JIT compiles with ``tt.divisibility=16`` on the pointer)."""

    dtype: torch.dtype
    aligned: bool


def _arg_spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # Meta tensors have no address; real allocations (torch's caching allocator: 512-byte
        # blocks) are aligned, which is what a plan assumes for every buffer and input.
        aligned = value.device.type == "meta" or value.data_ptr() % 16 == 0
        return TensorArg(value.dtype, aligned)
    return value


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, **options)``.

    ``args`` are the runtime arguments in the kernel's parameter order (tensors, ints, floats);
    ``constexprs`` the compile-time ones by name; ``options`` num_warps, num_stages and
    enable_fp_fusion.
    """

    kernel: Any  # a triton JITFunction (or InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any]
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def module(self) -> str:
        return self.kernel.fn.__module__

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    @property
    def runtime_names(self) -> list[str]:
        """The kernel's runtime parameter names, in order (``args`` line up with them)."""
        return [n for n in self.kernel.arg_names if n not in self.constexprs]

    def arg_specs(self) -> dict[str, Any]:
        """Runtime arguments by name, tensors as ``TensorArg``: what specializes the compile."""
        names = self.runtime_names
        if len(names) != len(self.args):
            raise ValueError(f"{self.name}: {len(self.args)} runtime arguments for parameters {names}")
        return {n: _arg_spec(v) for n, v in zip(names, self.args)}

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


@dataclass
class LibraryCall:
    """A dense GEMM run by torch (cuBLAS on a GPU) between kernel launches: ``c = a @ b^T``
    with a [m, k], b [n, k] in ``dtype``. The static report prices it as a dense GEMM; ``fn``
    runs it."""

    name: str
    m: int
    n: int
    k: int
    dtype: torch.dtype
    fn: Any = field(repr=False, compare=False)

    def run(self) -> None:
        self.fn()


# ------------------------------------------------------------------------------------ recording
_recording: list[list[Launch | LibraryCall]] = []


def submit(launch: Launch | LibraryCall) -> None:
    """Run a launch, or record it when inside ``recording()``."""
    if _recording:
        _recording[-1].append(launch)
    else:
        launch.run()


@contextlib.contextmanager
def recording() -> Iterator[list[Launch | LibraryCall]]:
    """Collect the launches (and library calls) submitted in the block instead of running them."""
    launches: list[Launch | LibraryCall] = []
    _recording.append(launches)
    try:
        yield launches
    finally:
        _recording.pop()


# ------------------------------------------------------------------------------------ a call, as data
@dataclass(frozen=True)
class CallSpec:
    """One FLARE-LoRA projection call, described by shapes, dtypes and flags only.

    m rows per stream, x [m, k], W [n, k] NF4, A [r, k], B [n, r]. ``source``: a source stream is
    fused (FLARE) and, with ``source_out``, gets its base product too (both streams in one pass);
    ``seq_len`` splits rows into sequences for the sequence-level fusions (default: one sequence).
    """

    m: int
    k: int
    n: int
    r: int = 16
    dtype: torch.dtype = torch.bfloat16
    adapter_dtype: torch.dtype | None = None  # None: the activations' dtype
    fusion: str = "add_relu"
    source: bool = True
    source_out: bool = True
    bias: bool = False
    dropout: bool = False
    blocksize: int = 64
    nested: bool = True
    seq_len: int | None = None
    fuse_down: bool | None = None  # None: the launcher's default
    needs: tuple[bool, bool, bool, bool] = (True, True, True, False)  # dX, dA, dB, d fusion params
    params: tuple = field(default=(), compare=False)

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.seq_len is not None and self.m % self.seq_len:
            raise ValueError(f"m = {self.m} is not a multiple of seq_len = {self.seq_len}")

    @property
    def id(self) -> str:
        adapter = self.adapter_dtype or self.dtype
        flags = "".join(
            f for f, on in (("-bias", self.bias), ("-drop", self.dropout), ("-nodq", not self.nested)) if on
        )
        streams = "2s" if self.source else "1s"
        return (
            f"{self.fusion}-{streams}-M{self.m}-K{self.k}-N{self.n}-r{self.r}-"
            f"{str(self.dtype).removeprefix('torch.')}-A{str(adapter).removeprefix('torch.')}-bs{self.blocksize}{flags}"
        )

    def meta_call(self) -> LoraCall:
        """The call on meta tensors (no data), as the launchers take it."""
        meta = torch.device("meta")
        m, k, n, r = self.m, self.k, self.n, self.r
        adapter = self.adapter_dtype or self.dtype
        blocks = -(-n * k // self.blocksize)
        weight = NF4Tensors(
            packed=torch.empty(((n * k + 1) // 2,), dtype=torch.uint8, device=meta),
            absmax=torch.empty((blocks,), dtype=torch.uint8 if self.nested else torch.float32, device=meta),
            code=torch.empty((16,), dtype=torch.float32, device=meta),
            nested_absmax=torch.empty((-(-blocks // NESTED_BLOCKSIZE),), device=meta) if self.nested else None,
            nested_code=torch.empty((256,), device=meta) if self.nested else None,
            nested_offset=torch.empty((), device=meta) if self.nested else None,
            out_features=n, in_features=k, blocksize=self.blocksize,
        )  # fmt: skip
        x = torch.empty((m, k), dtype=self.dtype, device=meta)
        source = torch.empty((m, k), dtype=self.dtype, device=meta) if self.source else None
        masks = (
            torch.empty((m, k), dtype=torch.bool, device=meta) if self.dropout else None,
            # The functional drops the source mask where the fusion never reads the source stream.
            torch.empty((m, k), dtype=torch.bool, device=meta)
            if self.dropout and self.source and self.fusion != "none" else None,
        )
        params = self.params
        if self.fusion == "cross_attention" and not params:
            params = tuple(torch.empty(s, dtype=adapter, device=meta) for s in ((r, r), (r,)) * 3)
        return LoraCall(
            x, source, weight,
            torch.empty((n,), dtype=self.dtype, device=meta) if self.bias else None,
            torch.empty((r, k), dtype=adapter, device=meta),
            torch.empty((n, r), dtype=adapter, device=meta),
            2.0, self.fusion, list(params), 0.1 if self.dropout else 0.0, masks,
            self.seq_len or m, None, None,
        )  # fmt: skip


def launch_plan(spec: CallSpec, target: Target = HOPPER, *, forward: bool = True, backward: bool = False,
                library: bool = False) -> list:  # fmt: skip
    """The kernel launches of one call of the Triton backend on ``target``, in order.

    ``forward``: the forward op (both streams' outputs when ``spec.source_out``); ``backward``:
    the backward op for ``spec.needs``; ``library``: keep the ``LibraryCall``s (the large-M
    route's cuBLAS GEMMs) between the ``Launch``es. Pure: nothing is allocated or run (meta
    tensors).
    """
    from . import launch  # imports Triton; this module does not

    call = spec.meta_call()
    with recording() as launches:
        y, y_s, s_t, s_s = launch.forward(call, spec.source_out, spec.fuse_down, target=target)
        if not forward:
            launches.clear()
        if backward:
            launch.backward(call, torch.empty_like(y), s_t, s_s, spec.needs, target=target)
    return [x for x in launches if library or isinstance(x, Launch)]


def replace(spec: CallSpec, **changes) -> CallSpec:
    return dataclasses.replace(spec, **changes)
