"""Pure-PyTorch reference: the executable spec of every kernel and op."""

from .flare_lora import FlareGrads, FlareOutput, flare_lora_backward, flare_lora_reference
from .fusion import FUSIONS, AttentionParams, PER_TOKEN_FUSIONS, SEQUENCE_FUSIONS, fuse, fuse_backward

__all__ = [
    "AttentionParams",
    "FUSIONS",
    "PER_TOKEN_FUSIONS",
    "SEQUENCE_FUSIONS",
    "FlareGrads",
    "FlareOutput",
    "flare_lora_backward",
    "flare_lora_reference",
    "fuse",
    "fuse_backward",
]
