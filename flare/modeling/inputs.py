"""Checks and alignment of the two input streams, all done before any model work.

Positions are fused one to one, so both streams must have the same length: decoders pad on the
left (the last real tokens of both streams line up, and generation appends to both at the right),
encoders on the right (position ids start at the first token). ``align_streams`` pads the shorter
stream on that side.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Keyword inputs indexed by token position: shifted when the target is padded on the left.
_POSITION_INDEX_KEYS = ("start_positions", "end_positions")
_PER_TOKEN_FILL = {"labels": -100, "token_type_ids": 0}


def is_decoder_model(model: nn.Module) -> bool:
    """Causal models (padded on the left) vs bidirectional encoders (padded on the right).

    transformers marks every attention module with ``is_causal``; a model is a decoder when its
    self-attention is causal.
    """
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if flags:
        return any(flags)
    return bool(getattr(getattr(model, "config", None), "is_decoder", False))


def model_max_length(model: nn.Module) -> int | None:
    """Longest sequence the model's positions allow (None when unbounded or unknown)."""
    backbone = getattr(model, "base_model", model)
    embeddings = getattr(backbone, "embeddings", None)
    positions = getattr(embeddings, "position_embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if isinstance(positions, nn.Embedding) and padding_idx is not None:
        # RoBERTa-style: position ids start at padding_idx + 1.
        return positions.num_embeddings - padding_idx - 1
    if isinstance(positions, nn.Embedding):
        return positions.num_embeddings
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(limit) if limit else None


def _check_ids(name: str, ids: Any) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D [batch, length] tensor, got {getattr(ids, 'shape', type(ids).__name__)}"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got {ids.dtype}")
    return ids


def _check_mask(name: str, mask: Any, ids: torch.Tensor, ids_name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"{name} must have the shape of {ids_name} {tuple(ids.shape)}, got {getattr(mask, 'shape', type(mask).__name__)}"
        )
    return mask


def check_streams(input_ids, attention_mask, source_input_ids, source_attention_mask):
    """Validate both streams; returns (input_ids, attention_mask, source_input_ids, source_attention_mask).

    A missing target mask means "no padding"; a source without its mask is an error (its padding
    decides which positions are real, and guessing it would misalign the fusion).
    """
    if source_input_ids is None:
        if source_attention_mask is not None:
            raise ValueError("source_attention_mask given without source_input_ids")
        return input_ids, attention_mask, None, None
    if input_ids is None:
        raise ValueError("a source stream needs the target input_ids (inputs_embeds is not supported with a source)")
    input_ids = _check_ids("input_ids", input_ids)
    source_input_ids = _check_ids("source_input_ids", source_input_ids)
    if source_attention_mask is None:
        raise ValueError(
            "source_input_ids given without source_attention_mask: pass the source stream's padding mask "
            "(1 = real token, 0 = padding) so its positions can be aligned with the target's"
        )
    if source_input_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"source and target batch sizes differ: source_input_ids {tuple(source_input_ids.shape)} vs "
            f"input_ids {tuple(input_ids.shape)}; row i of the source must be the translation of row i of the target"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = _check_mask("attention_mask", attention_mask, input_ids, "input_ids")
    source_attention_mask = _check_mask(
        "source_attention_mask", source_attention_mask, source_input_ids, "source_input_ids"
    )
    if source_input_ids.device != input_ids.device:
        raise ValueError(f"source_input_ids is on {source_input_ids.device}, input_ids on {input_ids.device}")
    return input_ids, attention_mask, source_input_ids, source_attention_mask


def _pad(t: torch.Tensor, extra: int, side: str, value) -> torch.Tensor:
    fill = t.new_full((t.shape[0], extra, *t.shape[2:]), value)
    return torch.cat([fill, t] if side == "left" else [t, fill], dim=1)


def align_streams(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    source_input_ids: torch.Tensor,
    source_attention_mask: torch.Tensor,
    *,
    side: str,
    pad_token_id: int,
    extra: dict[str, Any] | None = None,
):
    """Pad the shorter stream to the other's length on ``side`` ("left" or "right").

    ``extra`` holds the target's other inputs: per-token ones with the target's shape (``labels``
    filled with -100, ``token_type_ids`` with 0) are padded along with it, and ``start_positions``
    / ``end_positions`` shift when the target grows on the left; any other per-token tensor is an
    error (we would not know its fill value). Returns (ids, mask, source_ids, source_mask, extra).
    """
    extra = dict(extra or {})
    lt, ls = input_ids.shape[1], source_input_ids.shape[1]
    if lt < ls:
        grow = ls - lt
        for key, value in extra.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() >= 2 and tuple(value.shape[:2]) == tuple(input_ids.shape):
                if key not in _PER_TOKEN_FILL:
                    raise ValueError(
                        f"cannot pad {key!r} of shape {tuple(value.shape)} to the source length {ls}: pad both "
                        "streams to the same length before calling"
                    )
                extra[key] = _pad(value, grow, side, _PER_TOKEN_FILL[key])
            elif key in _POSITION_INDEX_KEYS and side == "left":
                extra[key] = value + grow
        input_ids = _pad(input_ids, grow, side, pad_token_id)
        attention_mask = _pad(attention_mask, grow, side, 0)
    elif ls < lt:
        grow = lt - ls
        source_input_ids = _pad(source_input_ids, grow, side, pad_token_id)
        source_attention_mask = _pad(source_attention_mask, grow, side, 0)
    return input_ids, attention_mask, source_input_ids, source_attention_mask, extra


def check_length(length: int, limit: int | None, what: str = "sequence") -> None:
    if limit is not None and length > limit:
        raise ValueError(f"{what} length {length} exceeds the model's limit of {limit} positions")
