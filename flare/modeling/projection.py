"""Stream-aware projections: the modules that replace a model's linear layers.

Inside a FLARE call every projection receives ``x = [x_s; x_t]`` ([2B, L, in], source rows first)
and returns ``[y_s; y_t]`` computed in ONE call of the FLARE op, so the 4-bit weights are read
once for both streams and the source rows cost no backward GEMM here (``y_s`` carries no grad)::

    y_s = x_s W0^T + b                                   source rows: frozen base, always
    y_t = x_t W0^T + b + s * phi(A x_s, A x_t) B^T       target rows at fusion projections
    y_t = x_t W0^T + b + s * B A x_t                     target rows elsewhere (fusion "none")

Where the source stream is padding, the fusion reads a zero source vector: a padded position has
no English token, and the hidden state a model computes there is an artifact of its attention
implementation (eager attention spreads a fully masked row uniformly over all keys, so the value
even changes with the sequence length; SDPA returns zeros). Zeroing makes the fusion independent
of both, and cached decoding equal to recomputation. Real source positions never read padded ones
(those keys are masked), so the source stream itself is unchanged.

Outside a FLARE call (no source) the projection is plain (Q)LoRA; with adapters disabled it is
the frozen base layer. With ``source_site="residual"`` the fusion reads the source rows' residual
stream at the block input (captured by a block pre-hook) instead of the projection input, while
the source rows' own base output still comes from their projection input, in the same pass
(the op's ``source_base``). Sequence-level fusions get the target's attention mask as their
key-padding mask, so padded target positions do not enter t^T t or the attention.
"""

from __future__ import annotations

import torch

from flare_kernels import FlareLinear, FlareLinear4bit
from flare_kernels.reference.fusion import SEQUENCE_FUSIONS

from .context import Owner, current, in_backward, replaying
from .mt_fusion import flare_lora_source_grad


def zero_padding(source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """source [B, L, K] with the positions the [B, L_total] mask marks as padding set to 0.

    ``L <= L_total``: with a KV cache the call holds the LAST L positions of the sequence.
    ``torch.where`` rather than a product, so a NaN at a padded position cannot leak through.
    """
    if source.dim() != 3 or mask.dim() != 2 or mask.shape[0] != source.shape[0] or mask.shape[1] < source.shape[1]:
        raise ValueError(
            f"FLARE fuses [batch, length, features] activations aligned with the source mask; got source "
            f"{tuple(source.shape)} and mask {tuple(mask.shape)}"
        )
    keep = mask[:, mask.shape[1] - source.shape[1] :].to(torch.bool)[..., None]
    return torch.where(keep, source, torch.zeros((), dtype=source.dtype, device=source.device))


class StreamRouting:
    """Mixin over a FLARE-LoRA layer class (``FlareLinear4bit`` or ``FlareLinear``).

    ``bind`` attaches it to a FlareModel; ``forward(x)`` then reads the model's context.
    """

    _flare_owner: Owner | None = None
    flare_path: str = ""
    block_index: int | None = None
    is_fusion: bool = False
    _last_two_stream: bool = False

    def bind(self, owner: Owner, path: str, block_index: int | None, is_fusion: bool) -> StreamRouting:
        self._flare_owner = owner
        self.flare_path = path
        self.block_index = block_index
        self.is_fusion = is_fusion
        return self

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None, *, return_source_output: bool = False,
                **kwargs):  # fmt: skip
        """x: [2B, ..., in] inside a FLARE call, [B, ..., in] outside -> same leading shape, [..., out].

        An explicit ``source`` (or ``return_source_output``) bypasses the routing: the layer then
        behaves exactly as the kernel module it extends.
        """
        if source is not None or return_source_output:
            return self.layer_forward(x, source, return_source_output=return_source_output, **kwargs)
        ctx = current(self._flare_owner) if self._flare_owner is not None else None
        if ctx is None:
            if self._last_two_stream and in_backward() and not replaying():
                # A checkpointed block is being recomputed without the context its forward ran in
                # (the last forward here was two-stream, and the replay bypassed PreservingCheckpoint):
                # recomputing plain LoRA would give gradients of a different function.
                raise RuntimeError(
                    f"{self.flare_path}: gradient checkpointing recomputed this projection outside the FLARE "
                    "two-stream context, which would silently drop the fusion (the authors' bug). Enable "
                    "checkpointing through FlareModel.gradient_checkpointing_enable or transformers' "
                    "activation_checkpointing_enable, whose per-block checkpoint function FlareModel wraps."
                )
            if not in_backward():
                self._last_two_stream = False
            return self.layer_forward(x)
        captured = ctx.captured
        if captured is not None and captured.recording:
            return self._record_source(x, captured)
        if ctx.adapters_off:
            return self.base_forward(x)
        if captured is not None:
            return self._fuse_captured(x, captured)
        streams = ctx.streams
        if streams is None:
            return self.layer_forward(x)
        n = streams.n_source
        if x.shape[0] != 2 * n:
            raise RuntimeError(
                f"{self.flare_path}: expected the [source; target] batch of {2 * n} rows, got input of shape "
                f"{tuple(x.shape)}; FLARE needs batch-major activations in the transformer blocks"
            )
        if not in_backward():
            self._last_two_stream = True
        x_s, x_t = x[:n], x[n:]
        if not self.is_fusion:
            # fusion "none": the adapter ignores x_s; its frozen base product comes from the same pass.
            y_t, y_s = self.layer_forward(x_t, x_s, return_source_output=True)
            return torch.cat([y_s, y_t.to(y_s.dtype)], dim=0)
        fusion_mask = None
        if self.fusion in SEQUENCE_FUSIONS and streams.target_attention_mask is not None:
            mask = streams.target_attention_mask.to(torch.bool)
            fusion_mask = mask[:, mask.shape[1] - x_t.shape[1] :]  # with a KV cache: the last positions
        if streams.site == "residual":
            h = streams.residuals.get(self.block_index)
            if h is None:
                raise RuntimeError(f"{self.flare_path}: no residual-stream input captured for block {self.block_index}")
            if h.shape != x_t.shape:
                raise ValueError(
                    f"{self.flare_path}: source_site='residual' needs the block input to have the projection's "
                    f"input shape, got residual {tuple(h.shape)} and projection input {tuple(x_t.shape)}"
                )
            # Fuse the residual stream; the source rows' own output is still their projection's.
            y_t, y_s = self.layer_forward(
                x_t, zero_padding(h.to(x_t.dtype), streams.source_attention_mask), return_source_output=True,
                source_base=x_s, fusion_mask=fusion_mask,
            )  # fmt: skip
        else:
            # y_s at padded source positions becomes base(0): read by no real position (masked keys).
            y_t, y_s = self.layer_forward(
                x_t, zero_padding(x_s, streams.source_attention_mask), return_source_output=True,
                fusion_mask=fusion_mask,
            )  # fmt: skip
        return torch.cat([y_s, y_t.to(y_s.dtype)], dim=0)

    def _record_source(self, x: torch.Tensor, captured) -> torch.Tensor:
        """The training path's source pass (``source_pass``): the frozen base, the fusion input kept."""
        if self.is_fusion:
            captured.record_input(self.flare_path, x)  # raises SourceCaptured after the last one
        return self.base_forward(x)

    def _fuse_captured(self, x: torch.Tensor, captured) -> torch.Tensor:
        """The training path's target pass: x is the target stream alone; fusions read the records."""
        if not in_backward():
            self._last_two_stream = True  # a recomputation must re-enter this context too
        if not self.is_fusion:
            return self.layer_forward(x)
        source = captured.source_for(self.flare_path, self.block_index, x)
        mask = captured.fusion_mask(x) if self.fusion in SEQUENCE_FUSIONS else None
        if source.requires_grad:
            # FLARE MT: the source is a trained map's output; the ops would treat it as a constant.
            return flare_lora_source_grad(self, x, source, mask)
        return self.layer_forward(x, source, fusion_mask=mask)


class FlareProjection4bit(StreamRouting, FlareLinear4bit):
    """A bitsandbytes ``Linear4bit`` replaced by the fused NF4 FLARE-LoRA module."""

    def layer_forward(self, x, source=None, **kwargs):
        return FlareLinear4bit.forward(self, x, source, **kwargs)


class FlareProjectionDense(StreamRouting, FlareLinear):
    """A dense ``nn.Linear`` with a FLARE-LoRA adapter (reference math, autograd)."""

    def layer_forward(self, x, source=None, **kwargs):
        return FlareLinear.forward(self, x, source, **kwargs)


PROJECTION_TYPES = (FlareProjection4bit, FlareProjectionDense)
