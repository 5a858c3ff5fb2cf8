"""``FlareConfig``: which projections get a LoRA adapter, which of them fuse the English source, and how.

Validated on construction, so a typo fails before any model is touched. Serializes to plain JSON
(``to_dict`` / ``from_dict``) for ``flare_config.json`` beside a PEFT adapter.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flare_kernels.reference.fusion import FUSIONS, SEQUENCE_FUSIONS

SOURCE_SITES = ("projection_input", "residual")
ALL_LINEAR = "all-linear"


def _names(value: Any, what: str, *, allow_all_linear: bool = False) -> tuple[str, ...] | str:
    """A tuple of module names (a bare string is one name, not a sequence of letters)."""
    if allow_all_linear and value == ALL_LINEAR:
        return ALL_LINEAR
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) and not isinstance(value, (set, frozenset)):
        raise TypeError(f"{what} must be a sequence of module names, got {value!r}")
    out = tuple(value)
    for name in out:
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"{what} must contain non-empty module names, got {name!r} in {out!r}")
    return out


@dataclass
class FlareConfig:
    """Settings of a FLARE (or plain LoRA) adapter on a transformers model.

    Args:
        r: LoRA rank (positive int).
        lora_alpha: scaling numerator; the adapter output is scaled by ``lora_alpha / r``.
        lora_dropout: dropout on the adapter input, drawn independently per stream, in [0, 1).
        fusion: phi, one of ``flare_kernels.FUSIONS`` (``"none"`` = plain LoRA everywhere).
        fusion_modules: names of the projections whose adapter fuses the source stream (matched
            against module paths: equal, or ending in ``"." + name``). ``q_proj`` / ``v_proj`` /
            ``k_proj`` / ``o_proj`` also match the encoder spellings ``query`` / ``value`` /
            ``key`` / ``attention.output.dense`` when the model has no module of that name.
            Fusion modules always get an adapter, whatever ``lora_modules`` says.
        lora_modules: ``"all-linear"`` (every linear projection inside the transformer blocks;
            heads excluded) or a sequence of module names matched as above.
        source_site: what the fusion reads from the source stream. ``"projection_input"``
            (default): the source stream's input of the same projection. ``"residual"``: the
            residual-stream input of the block holding the projection, as the authors' code did
            (their target vector is still the post-norm projection input).
        cross_attention_heads: heads of the ``cross_attention`` fusion, dividing r (each head
            attends over r / heads dims, as nn.MultiheadAttention); 1 = the single-head fusion.
        attention_dropout: dropout on the ``cross_attention`` fusion's attention probabilities
            (training mode only), in [0, 1); the authors used 0.1 for XLM-R.
        modules_to_save: modules trained in full (a trainable copy beside the frozen original),
            e.g. ``("lm_head", "embed_tokens")`` in the paper's Llama recipe or ``("classifier",)``
            for a fresh classification head. The source stream always runs the frozen original.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    fusion: str = "add_relu"
    fusion_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lora_modules: tuple[str, ...] | str = ALL_LINEAR
    source_site: str = "projection_input"
    modules_to_save: tuple[str, ...] = field(default_factory=tuple)
    cross_attention_heads: int = 1
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        self.r = int(self.r)
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, numbers.Real)
            or not self.lora_alpha > 0
        ):
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, numbers.Real)
            or not (0.0 <= self.lora_dropout < 1.0)
        ):
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.lora_dropout = float(self.lora_dropout)
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; expected one of {FUSIONS}")
        heads = self.cross_attention_heads
        if isinstance(heads, bool) or not isinstance(heads, numbers.Integral) or heads <= 0:
            raise ValueError(f"cross_attention_heads must be a positive integer, got {heads!r}")
        self.cross_attention_heads = int(heads)
        if self.fusion == "cross_attention" and self.r % self.cross_attention_heads:
            raise ValueError(f"cross_attention_heads={heads} must divide the LoRA rank r={self.r}")
        p = self.attention_dropout
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 <= p < 1.0):
            raise ValueError(f"attention_dropout must be in [0, 1), got {p!r}")
        self.attention_dropout = float(p)
        if self.source_site not in SOURCE_SITES:
            raise ValueError(f"source_site must be one of {SOURCE_SITES}, got {self.source_site!r}")
        self.fusion_modules = _names(self.fusion_modules, "fusion_modules")
        self.lora_modules = _names(self.lora_modules, "lora_modules", allow_all_linear=True)
        if self.lora_modules == ():
            raise ValueError(f"lora_modules must name at least one module (or be {ALL_LINEAR!r})")
        self.modules_to_save = _names(self.modules_to_save, "modules_to_save")

    # ------------------------------------------------------------------ derived
    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @property
    def fuses(self) -> bool:
        """Whether any adapter mixes in the source stream (else the model is plain LoRA)."""
        return self.fusion != "none" and len(self.fusion_modules) > 0

    @property
    def sequence_level(self) -> bool:
        """phi mixes the positions of a sequence (matmul, matmul_relu, cross_attention)."""
        return self.fusion in SEQUENCE_FUSIONS

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("fusion_modules", "modules_to_save"):
            d[key] = list(d[key])
        if d["lora_modules"] != ALL_LINEAR:
            d["lora_modules"] = list(d["lora_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlareConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown FlareConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)
