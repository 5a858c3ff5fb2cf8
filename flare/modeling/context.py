"""What the wrapped modules need to know about the current call: the two-stream layout and adapter switch.

A FLARE forward runs one batch ``[source rows; target rows]`` (``2B`` rows) through the stock
transformers layers. The projections, the modules_to_save copies and the backbone hooks read the
layout from a ``ContextVar`` set by ``FlareModel`` for the duration of the call, keyed by the
model's ``Owner`` token so two FLARE models never read each other's state.

Gradient checkpointing re-runs a block's forward during backward, after the ``with`` block that set
the context has exited (and, on CUDA, on the autograd engine's own thread, where a ContextVar set
in the main thread is not visible). The authors' code lost the source states exactly there and
silently trained plain LoRA. ``PreservingCheckpoint`` wraps the checkpoint function that
transformers installs on each block: it captures the context when the block runs forward and
re-enters that same context in the recomputation, so the recomputed block fuses exactly as the
original one did (dropout masks match because torch's checkpoint restores the RNG state).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch


class Owner:
    """Identity token shared by a FlareModel and its wrapped modules (``deepcopy`` copies it once)."""

    __slots__ = ("__weakref__",)

    def __repr__(self) -> str:
        return f"<flare owner {id(self):#x}>"


@dataclass
class TwoStreams:
    """Layout of one two-stream call.

    Rows ``[0, n_source)`` of every batch-major activation are the source (English) stream, rows
    ``[n_source, 2 n_source)`` the target stream, position ``i`` of one aligned with position ``i``
    of the other.

    Attributes:
        n_source: B, the number of sequences per stream.
        source_input_ids, source_attention_mask: [B, L] source tokens for this call (the backbone
            pre-hook prepends them to the target's).
        target_attention_mask: [B, L] the target's mask (None: no padding), the key-padding mask
            of sequence-level fusions.
        site: ``"projection_input"`` or ``"residual"`` (``FlareConfig.source_site``).
        keep_source_rows: return all 2B rows from the backbone (generation: the heads compute the
            source stream's own logits with the frozen originals). Otherwise the backbone returns
            the target rows only, so the heads and losses see target rows only.
        residuals: block index -> [B, L, H] residual-stream input of the source rows (filled by the
            block pre-hooks when ``site == "residual"``).
    """

    n_source: int
    source_input_ids: torch.Tensor
    source_attention_mask: torch.Tensor
    target_attention_mask: torch.Tensor | None = None
    site: str = "projection_input"
    keep_source_rows: bool = False
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class FlareContext:
    """streams: the one-batch layout; captured: the training path's source records
    (``source_pass.CapturedSource``, recording in the source pass, read in the target pass)."""

    streams: TwoStreams | None = None
    adapters_off: bool = False
    captured: object | None = None


_EMPTY: Mapping[Owner, FlareContext] = {}
_ACTIVE: contextvars.ContextVar[Mapping[Owner, FlareContext]] = contextvars.ContextVar("flare_active", default=_EMPTY)


def current(owner: Owner) -> FlareContext | None:
    """The context of ``owner``'s current call, or None outside any FLARE call."""
    return _ACTIVE.get().get(owner)


@contextlib.contextmanager
def activate(owner: Owner, *, streams: TwoStreams | None | type(...) = ..., adapters_off: bool | None = None,
             captured: object | None | type(...) = ...):  # fmt: skip
    """Set (parts of) ``owner``'s context for a block; unspecified parts keep their current value."""
    old = _ACTIVE.get()
    ctx = old.get(owner, FlareContext())
    if streams is not ...:
        ctx = replace(ctx, streams=streams)
    if captured is not ...:
        ctx = replace(ctx, captured=captured)
    if adapters_off is not None:
        ctx = replace(ctx, adapters_off=adapters_off)
    token = _ACTIVE.set({**old, owner: ctx})
    try:
        yield ctx
    finally:
        _ACTIVE.reset(token)


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (checkpoint recomputation happens there)."""
    return torch._C._current_graph_task_id() != -1


_REPLAYING: contextvars.ContextVar[bool] = contextvars.ContextVar("flare_checkpoint_replay", default=False)


def replaying() -> bool:
    """True inside a recomputation that ``PreservingCheckpoint`` runs: its context is the forward's
    own, including "no FLARE call" for a plain forward."""
    return _REPLAYING.get()


class PreservingCheckpoint:
    """Wraps a block's ``_gradient_checkpointing_func`` so recomputation runs in the forward's context.

    transformers calls ``block._gradient_checkpointing_func(partial(forward, block, **kwargs), *args)``
    (``GradientCheckpointingLayer``); the wrapped function is what torch's checkpoint re-runs in
    backward, so re-entering the captured context there restores the two-stream layout, the
    captured residuals and the adapter switch.
    """

    def __init__(self, inner: Callable) -> None:
        self.inner = inner

    def __call__(self, function: Callable, *args, **kwargs):
        captured = _ACTIVE.get()

        def replay(*a, **k):
            # Plain forwards are replayed through here too (captured may be empty), so a projection
            # can tell a legitimate plain recomputation from one that bypassed this wrapper.
            token, marker = _ACTIVE.set(captured), _REPLAYING.set(True)
            try:
                return function(*a, **k)
            finally:
                _REPLAYING.reset(marker)
                _ACTIVE.reset(token)

        return self.inner(replay, *args, **kwargs)

    def __repr__(self) -> str:
        return f"PreservingCheckpoint({self.inner!r})"


def install_checkpoint_wrappers(modules) -> None:
    """Wrap every ``_gradient_checkpointing_func`` found on ``modules`` (idempotent, cheap).

    Called before every FLARE forward, so a checkpointing set up at any time (``FlareModel.
    gradient_checkpointing_enable``, ``peft.prepare_model_for_kbit_training`` before or after
    wrapping, a Trainer flag) is covered.
    """
    for module in modules:
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not isinstance(func, PreservingCheckpoint):
            module._gradient_checkpointing_func = PreservingCheckpoint(func)
