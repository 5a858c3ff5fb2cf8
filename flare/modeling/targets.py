"""Which modules of a transformers model a ``FlareConfig`` selects, resolved before anything changes.

Vocabulary:
    block       one repeated transformer layer (a ``GradientCheckpointingLayer``, else an element of
                an ``nn.ModuleList`` that holds linear layers); outermost only.
    projection  an ``nn.Linear`` (bitsandbytes ``Linear4bit`` included) inside a block.
    backbone    ``model.base_model`` in transformers' sense (``LlamaModel``, ``XLMRobertaModel``):
                what the two-stream batch runs through; heads sit outside it.

Names match a module path when they are equal to it or end it after a dot (``"q_proj"`` matches
``"model.layers.3.self_attn.q_proj"``), as in PEFT. Encoders spell the attention projections
differently; ``ALIASES`` lets the decoder spelling (the config default) find them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..config import ALL_LINEAR, FlareConfig

ALIASES = {
    "q_proj": ("query",),
    "k_proj": ("key",),
    "v_proj": ("value",),
    "o_proj": ("attention.output.dense",),
}


def name_matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


@dataclass
class Targets:
    """Resolved selection. Paths are ``named_modules`` paths of the transformers model."""

    backbone: str
    blocks: list[str]
    adapted: dict[str, int]  # projection path -> index of its block
    fusion: list[str]
    modules_to_save: list[str]
    quantized: dict[str, bool] = field(default_factory=dict)  # projection path -> bitsandbytes 4-bit?

    def is_fusion(self, path: str) -> bool:
        return path in self._fusion_set

    def __post_init__(self) -> None:
        self._fusion_set = set(self.fusion)


def _is_gc_layer(module: nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: fall back to ModuleList elements
        return False
    return isinstance(module, GradientCheckpointingLayer)


def find_blocks(model: nn.Module) -> list[str]:
    """Paths of the outermost repeated transformer layers, in forward order."""
    named = list(model.named_modules())
    candidates = [name for name, m in named if name and _is_gc_layer(m)]
    if not candidates:
        for name, m in named:
            if (
                isinstance(m, nn.ModuleList)
                and len(m) > 0
                and all(any(isinstance(s, nn.Linear) for s in child.modules()) for child in m)
            ):
                candidates.extend(f"{name}.{i}" for i in range(len(m)))
    blocks = [c for c in candidates if not any(c.startswith(o + ".") for o in candidates if o != c)]
    return blocks


def find_backbone(model: nn.Module) -> str:
    """Path of transformers' ``base_model`` (``""`` when the model is its own backbone)."""
    backbone = getattr(model, "base_model", model)
    for name, m in model.named_modules():
        if m is backbone:
            return name
    return ""


def _block_of(path: str, blocks: list[str]) -> int | None:
    for i, b in enumerate(blocks):
        if path.startswith(b + "."):
            return i
    return None


def _check_linear(path: str, module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear, False for a dense one; raises for unsupported kinds."""
    weight = getattr(module, "weight", None)
    cls = type(module).__name__
    if type(weight).__name__ == "Int8Params" or "8bit" in cls:
        raise ValueError(f"{path}: 8-bit bitsandbytes layers are not supported; load the model in 4-bit (nf4) or dense")
    state = getattr(weight, "quant_state", None)
    if type(weight).__name__ == "Params4bit":
        if state is None:
            raise ValueError(f"{path}: this bitsandbytes Linear4bit is not quantized yet (move it to its device first)")
        if state.quant_type != "nf4":
            raise ValueError(
                f"{path}: only nf4 4-bit weights are supported, got {state.quant_type!r} "
                "(load with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'))"
            )
        return True
    return False


def _resolve_names(names, pool: list[str], what: str, available: list[str]) -> list[str]:
    """Paths of ``pool`` matched by each name (aliases tried when a name matches nothing)."""
    selected: list[str] = []
    for name in names:
        hits = [p for p in pool if name_matches(p, name)]
        if not hits:
            for alias in ALIASES.get(name, ()):
                hits = [p for p in pool if name_matches(p, alias)]
                if hits:
                    break
        if not hits:
            raise ValueError(
                f"{what}: {name!r} matches no linear projection inside the transformer blocks. "
                f"Available projection names: {available}"
            )
        selected.extend(h for h in hits if h not in selected)
    return selected


def _short_names(paths: list[str], blocks: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        i = _block_of(p, blocks)
        short = p[len(blocks[i]) + 1 :] if i is not None else p
        if short not in out:
            out.append(short)
    return out


def resolve_targets(model: nn.Module, config: FlareConfig) -> Targets:
    """Select the modules ``config`` names in ``model``; every error is raised here, before any change."""
    from .projection import PROJECTION_TYPES

    if any(isinstance(m, PROJECTION_TYPES) for m in model.modules()):
        raise ValueError("this model already carries FLARE adapters; wrap the original transformers model")
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__}: found no transformer blocks (repeated layers holding linear projections)"
        )
    linears = [
        (p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear) and _block_of(p, blocks) is not None
    ]
    pool = [p for p, _ in linears]
    if not pool:
        raise ValueError(f"{type(model).__name__}: the transformer blocks hold no nn.Linear / Linear4bit projections")
    available = _short_names(pool, blocks)

    if config.lora_modules == ALL_LINEAR:
        lora = list(pool)
    else:
        lora = _resolve_names(config.lora_modules, pool, "lora_modules", available)
    fusion = _resolve_names(config.fusion_modules, pool, "fusion_modules", available) if config.fuses else []
    adapted_paths = lora + [p for p in fusion if p not in lora]
    modules = dict(model.named_modules())
    quantized = {p: _check_linear(p, modules[p]) for p in adapted_paths}
    adapted = {p: _block_of(p, blocks) for p in sorted(adapted_paths, key=pool.index)}

    save: list[str] = []
    for name in config.modules_to_save:
        hits = [p for p in modules if p and name_matches(p, name)]
        if not hits:
            raise ValueError(f"modules_to_save: {name!r} matches no module of {type(model).__name__}")
        for h in hits:
            if any(h.startswith(o + ".") for o in hits if o != h):
                continue  # nested inside another match: trained as part of it
            if h in adapted or any(a.startswith(h + ".") for a in adapted):
                raise ValueError(f"modules_to_save: {h!r} is (or contains) a LoRA-adapted projection")
            if h in blocks or any(b.startswith(h + ".") for b in blocks):
                raise ValueError(f"modules_to_save: {h!r} is (or contains) a whole transformer block")
            if h not in save:
                save.append(h)

    if config.fuses and config.source_site == "residual":
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        for p in fusion:
            in_features = modules[p].in_features
            if hidden is not None and in_features != hidden:
                raise ValueError(
                    f"source_site='residual': {p} reads {in_features} features but the residual stream has "
                    f"{hidden}; fuse only projections that read the block input (q/k/v)"
                )
    return Targets(
        backbone=find_backbone(model),
        blocks=blocks,
        adapted=adapted,
        fusion=[p for p in adapted if p in set(fusion)],
        modules_to_save=save,
        quantized=quantized,
    )
