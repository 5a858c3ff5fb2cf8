"""Drop-in nn.Modules."""

from .adapter import LoraAdapter
from .cross_attention import CrossAttentionFusion
from .flare_linear import FlareLinear
from .flare_linear4bit import FlareLinear4bit

__all__ = ["CrossAttentionFusion", "FlareLinear", "FlareLinear4bit", "LoraAdapter"]
