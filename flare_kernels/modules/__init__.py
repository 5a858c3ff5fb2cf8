"""Drop-in nn.Modules."""

from .cross_attention import CrossAttentionFusion
from .flare_linear4bit import FlareLinear4bit

__all__ = ["CrossAttentionFusion", "FlareLinear4bit"]
