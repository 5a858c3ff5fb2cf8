"""The training path: the source stream as its own no-grad pass, keeping only what the fusions read.

The one-batch path runs ``[source; target]`` through every stock layer, so attention, norms and
activations keep the source rows' activations and run their backward over 2B rows (zeros for the
source), and gradient checkpointing recomputes the source rows in the backward. The method needs
none of that: the source stream carries no gradient, and the adapters need from it only the vector
each fusion reads (the op saves it for dA). So a training forward runs

1. the source pass: the frozen base backbone (adapters off, original modules_to_save) over the
   English batch under ``torch.no_grad()``, through the same fused projections (``base_forward``).
   It records, once per distinct tensor, what the fusion projections read: their input
   (``source_site="projection_input"``; q and v share one input, hence one record) or their block's
   residual-stream input (``"residual"``), zeroed where the source is padding. It stops (raises
   ``SourceCaptured``) as soon as the last of them is recorded: the rest of the last block, the final
   norm and the head would compute values nobody reads;
2. the target pass: the model over the target batch alone, with grad, every fusion projection
   reading its record (a plain tensor: nothing to recompute, and the checkpoint replay re-enters
   the same context, so under gradient checkpointing the records are saved once, outside the
   checkpoints, and the source pass is never re-run).

This is the two-pass definition (``two_pass.py``) computed with the fused kernels; the difference
from the one-batch path is that each projection reads its 4-bit weights once per stream instead
of once for both. FlareModel takes this path when gradients are enabled (a backward may follow);
under no_grad (evaluation, decoding) the one-batch path keeps its single weight read. Why, in
numbers, is in FlareModel.forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from .context import Owner, activate


class SourceCaptured(Exception):
    """Raised inside the source pass once every fusion input is recorded (stops the forward there)."""


def _zero_padding(source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """source [B, L, K] with the positions the [B, L] mask marks as padding set to 0 (NaN-safe)."""
    if source.dim() != 3 or tuple(mask.shape) != tuple(source.shape[:2]):
        raise ValueError(
            f"FLARE fuses [batch, length, features] activations aligned with the source mask; got source "
            f"{tuple(source.shape)} and mask {tuple(mask.shape)}"
        )
    keep = mask.to(torch.bool)[..., None]
    return torch.where(keep, source, torch.zeros((), dtype=source.dtype, device=source.device))


@dataclass
class CapturedSource:
    """The source stream of one training step, as the fusion projections read it.

    Attributes:
        site: ``FlareConfig.source_site``.
        source_attention_mask: [B, L] (1 = English token); recorded vectors are zero elsewhere.
        target_attention_mask: [B, L] or None, the sequence fusions' key-padding mask.
        fusion_paths: the fusion projections (projection_input site: one record each).
        fusion_blocks: their blocks (residual site: one record each).
        recording: True during the source pass, False in the target pass.
        inputs: fusion projection path -> [B, L, in] recorded input.
        residuals: block index -> [B, L, hidden] recorded block input.
    """

    site: str
    source_attention_mask: torch.Tensor
    target_attention_mask: torch.Tensor | None
    fusion_paths: frozenset[str]
    fusion_blocks: frozenset[int]
    recording: bool = True
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)
    _padded: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ source pass
    def _record(self, x: torch.Tensor) -> torch.Tensor:
        # q and v read the same tensor object: one zero-padded record for both (the saved-activation
        # cost of FLARE is one [tokens, hidden] tensor per block, not per fusion projection).
        hit = self._padded.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        padded = _zero_padding(x.detach(), self.source_attention_mask)
        self._padded[id(x)] = (x, padded)
        return padded

    def record_input(self, path: str, x: torch.Tensor) -> None:
        """Source pass, at a fusion projection: keep its input; stop once all are kept."""
        if self.site != "projection_input":
            return
        self.inputs[path] = self._record(x)
        if self.fusion_paths <= self.inputs.keys():
            raise SourceCaptured

    def record_residual(self, index: int, hidden: torch.Tensor) -> None:
        """Source pass, at a block's input: keep it where the block holds a fusion; stop once all are kept."""
        if self.site != "residual" or index not in self.fusion_blocks:
            return
        self.residuals[index] = self._record(hidden)
        if self.fusion_blocks <= self.residuals.keys():
            raise SourceCaptured

    def finish(self) -> CapturedSource:
        self._padded.clear()  # drop the references to the source pass's own activations
        self.recording = False
        return self

    # ------------------------------------------------------------------ target pass
    def source_for(self, path: str, block_index: int | None, x_t: torch.Tensor) -> torch.Tensor:
        """The recorded source vector the fusion projection ``path`` reads, in x_t's dtype."""
        if self.site == "residual":
            s = self.residuals.get(block_index)
            what = f"residual-stream input of block {block_index}"
        else:
            s = self.inputs.get(path)
            what = "projection input"
        if s is None:
            raise RuntimeError(f"{path}: the source pass recorded no {what} (the projection did not run on the source)")
        if s.shape != x_t.shape:
            raise ValueError(
                f"{path}: the source's recorded {what} has shape {tuple(s.shape)}, the projection input "
                f"{tuple(x_t.shape)}; source_site='residual' needs the block input to have the projection's shape"
            )
        return s if s.dtype == x_t.dtype else s.to(x_t.dtype)

    def fusion_mask(self, x_t: torch.Tensor) -> torch.Tensor | None:
        return key_padding_mask(self.target_attention_mask, x_t)


def key_padding_mask(target_attention_mask: torch.Tensor | None, x_t: torch.Tensor) -> torch.Tensor | None:
    """The sequence-level fusions' key mask for a projection input ``x_t`` [B, T, H]: the target mask's
    last T columns (a KV-cached call sees only the newest ones), as bool."""
    if target_attention_mask is None:
        return None
    mask = target_attention_mask.to(torch.bool)
    return mask[:, mask.shape[1] - x_t.shape[1] :]


def _backbone_kwargs(backbone: nn.Module, source_input_ids, source_attention_mask, extra: dict) -> dict:
    """The backbone call of the source stream: what the one-batch pre-hook gives the source rows."""
    params = inspect.signature(backbone.forward).parameters
    call = {"input_ids": source_input_ids, "attention_mask": source_attention_mask}
    token_types = extra.get("token_type_ids")
    if token_types is not None and "token_type_ids" in params:
        call["token_type_ids"] = torch.zeros_like(token_types)
    positions = extra.get("position_ids")
    if positions is not None:
        if positions.shape[0] != 1:
            raise ValueError(
                f"position_ids of shape {tuple(positions.shape)} cannot be shared with the source stream; "
                "pass [1, L] position ids or none (the model derives them)"
            )
        call["position_ids"] = positions
    if "use_cache" in params:
        call["use_cache"] = False
    return call


def run_source_pass(
    owner: Owner,
    backbone: nn.Module,
    capture: CapturedSource,
    source_input_ids: torch.Tensor,
    source_attention_mask: torch.Tensor,
    extra: dict,
) -> CapturedSource:
    """The frozen backbone over the (aligned) source batch, no grad, recording into ``capture``."""
    call = _backbone_kwargs(backbone, source_input_ids, source_attention_mask, extra)
    with torch.no_grad(), activate(owner, streams=None, adapters_off=True, captured=capture):
        try:
            backbone(**call)
        except SourceCaptured:
            pass
    return capture.finish()
