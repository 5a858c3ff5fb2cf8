"""``TrainableCopy``: a module trained in full (``modules_to_save``) beside its frozen original.

The paper's Llama recipe trains ``lm_head`` and ``embed_tokens``; encoders train their fresh
classification head. The source stream is the frozen base model, so in a two-stream call the
source rows go through the original (no grad) and the target rows through the trained copy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .context import Owner, current


def _split(value, n: int, half: int):
    """Rows [0, n) (half=0) or [n, 2n) (half=1) of a tensor with 2n leading rows; other values as they are."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 2 * n:
        return value[:n] if half == 0 else value[n:]
    return value


class TrainableCopy(nn.Module):
    """Holds ``original_module`` (frozen) and ``trained_module`` (a trainable deep copy).

    Outside a FLARE call: the trained copy (or the original with adapters disabled). Inside one:
    inputs whose leading dim is 2B are split, source rows -> original under no_grad, target rows
    -> trained copy, outputs concatenated; inputs with B rows (heads after the backbone returned
    the target rows only) go to the trained copy.
    """

    def __init__(self, original: nn.Module, owner: Owner, path: str) -> None:
        super().__init__()
        for p in original.parameters():
            if type(p).__name__ in ("Params4bit", "Int8Params"):
                raise ValueError(
                    f"modules_to_save: {path!r} holds quantized weights and cannot be trained in full; keep it "
                    f"dense when loading, e.g. BitsAndBytesConfig(..., llm_int8_skip_modules=['{path.rsplit('.', 1)[-1]}'])"
                )
        self.original_module = original
        self.trained_module = copy.deepcopy(original)
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        for p in self.trained_module.parameters():
            p.requires_grad_(p.is_floating_point())
        self._flare_owner = owner
        self.flare_path = path

    def forward(self, *args, **kwargs):
        ctx = current(self._flare_owner)
        if ctx is not None and ctx.adapters_off:
            return self.original_module(*args, **kwargs)
        streams = ctx.streams if ctx is not None else None
        if streams is None:
            return self.trained_module(*args, **kwargs)
        lead = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        n = streams.n_source
        if lead is None or lead.shape[0] == n:
            return self.trained_module(*args, **kwargs)
        if lead.shape[0] != 2 * n:
            raise RuntimeError(
                f"{self.flare_path}: expected {n} (target) or {2 * n} ([source; target]) rows, got {tuple(lead.shape)}"
            )
        with torch.no_grad():
            y_s = self.original_module(
                *(_split(a, n, 0) for a in args), **{k: _split(v, n, 0) for k, v in kwargs.items()}
            )
        y_t = self.trained_module(*(_split(a, n, 1) for a in args), **{k: _split(v, n, 1) for k, v in kwargs.items()})
        if not isinstance(y_t, torch.Tensor):
            raise TypeError(
                f"{self.flare_path}: modules_to_save supports modules returning one tensor, got {type(y_t)}"
            )
        return torch.cat([y_s.to(y_t.dtype), y_t], dim=0)

    # transformers looks these up on input/output embeddings (resize, tying checks, generation).
    @property
    def weight(self) -> torch.Tensor:
        return self.trained_module.weight

    def extra_repr(self) -> str:
        return f"path={self.flare_path!r}"
