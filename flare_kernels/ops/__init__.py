"""Ops: backend choice, Triton launchers, torch.library registration, the functional API."""

from .backend import get_backend, last_backend, set_backend, use_backend
from .functional import flare_lora_linear
from .plan import AMPERE, HOPPER, CallSpec, Launch, LibraryCall, Target, launch_plan

__all__ = [
    "AMPERE", "HOPPER", "CallSpec", "Launch", "LibraryCall", "Target", "flare_lora_linear", "get_backend", "last_backend",
    "launch_plan", "set_backend", "use_backend",
]  # fmt: skip
