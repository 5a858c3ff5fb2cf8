"""Ops: backend choice, Triton launchers, torch.library registration, the functional API."""

from .backend import get_backend, last_backend, set_backend, use_backend
from .functional import flare_lora_linear

__all__ = ["flare_lora_linear", "get_backend", "last_backend", "set_backend", "use_backend"]
