"""Hooks that make the stock transformers backbone run ``[source rows; target rows]`` as one batch.

``FlareModel`` calls the full model (backbone + head) with the TARGET inputs only, the source
tokens waiting in the context. The backbone's pre-hook prepends them (``input_ids``,
``attention_mask``, zero ``token_type_ids``), so every layer runs 2B rows; the post-hook hands
only the target rows back, so the model's own head, pooling and loss code see exactly what they
would see in a plain call on the target batch (loss over target rows only). In generation the
post-hook keeps all rows: the head then also produces the source stream's logits.

Block pre-hooks capture the source rows' residual-stream input for ``source_site="residual"``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .context import Owner, current


def _slice_rows(value, n: int):
    """Target rows of every tensor (or tuple of tensors) in a model output that has 2n leading rows."""
    if isinstance(value, torch.Tensor):
        return value[n:] if value.dim() > 0 and value.shape[0] == 2 * n else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_slice_rows(v, n) for v in value)
    return value


class BackboneHooks:
    """Pre/post forward hooks on the backbone plus, for the residual site, pre-hooks on the blocks."""

    def __init__(self, backbone: nn.Module, owner: Owner, blocks: list[nn.Module], capture_residuals: bool) -> None:
        self.owner = owner
        self.signature = inspect.signature(backbone.forward)
        self.handles = [
            backbone.register_forward_pre_hook(self._pre, with_kwargs=True),
            backbone.register_forward_hook(self._post),
        ]
        if capture_residuals:
            for index, block in enumerate(blocks):
                self.handles.append(block.register_forward_pre_hook(self._residual_hook(index), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _streams(self):
        ctx = current(self.owner)
        return None if ctx is None else ctx.streams

    # ---------------------------------------------------------------- backbone
    def _pre(self, module, args, kwargs):
        streams = self._streams()
        if streams is None:
            return None
        bound = self.signature.bind_partial(*args, **kwargs)
        call: dict = {}
        for name, value in bound.arguments.items():
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                call.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError("FLARE cannot route extra positional backbone arguments")
            else:
                call[name] = value
        ids = call.get("input_ids")
        if ids is None:
            raise ValueError("a FLARE call with a source stream needs input_ids (inputs_embeds is not supported)")
        n = streams.n_source
        if ids.shape[0] != n or streams.source_input_ids.shape[1:] != ids.shape[1:]:
            raise RuntimeError(
                f"backbone got input_ids {tuple(ids.shape)} but the source stream is "
                f"{tuple(streams.source_input_ids.shape)}"
            )
        mask = call.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if mask.dim() != 2:
            raise ValueError(f"FLARE needs a 2-D [batch, length] attention_mask, got shape {tuple(mask.shape)}")
        call["input_ids"] = torch.cat([streams.source_input_ids.to(ids.device), ids], dim=0)
        call["attention_mask"] = torch.cat([streams.source_attention_mask.to(mask), mask], dim=0)
        token_types = call.get("token_type_ids")
        if token_types is not None:
            call["token_type_ids"] = torch.cat([torch.zeros_like(token_types), token_types], dim=0)
        positions = call.get("position_ids")
        if positions is not None and positions.shape[0] != 1:
            raise ValueError(
                f"position_ids of shape {tuple(positions.shape)} cannot be shared with the source stream; "
                "pass [1, L] position ids or none (the model derives them)"
            )
        return (), call

    def _post(self, module, args, output):
        streams = self._streams()
        if streams is None or streams.keep_source_rows:
            return None
        n = streams.n_source
        if isinstance(output, tuple) and not hasattr(output, "keys"):
            return _slice_rows(output, n)
        for key in list(output.keys()):
            value = output[key]
            if isinstance(value, (torch.Tensor, tuple)):
                output[key] = _slice_rows(value, n)
        return output

    # ---------------------------------------------------------------- residual site
    def _residual_hook(self, index: int) -> ResidualCapture:
        return ResidualCapture(self, index)


class ResidualCapture:
    """Block pre-hook storing the source rows' residual-stream input (``source_site="residual"``).

    A small object rather than a closure: ``copy.deepcopy`` copies objects (so a copied model's hooks
    follow the copy's owner) but shares function objects, which would keep reading the original's.
    """

    def __init__(self, hooks: BackboneHooks, index: int) -> None:
        self.hooks = hooks
        self.index = index

    def __call__(self, module, args, kwargs):
        ctx = current(self.hooks.owner)
        captured = None if ctx is None else ctx.captured
        recording = captured is not None and captured.recording
        streams = None if ctx is None else ctx.streams
        if not recording and (streams is None or streams.site != "residual"):
            return
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None:
            raise RuntimeError(
                f"block {self.index}: cannot find its hidden_states input to capture the residual stream"
            )
        if recording:  # the training path's source pass (source_pass.py); may stop the pass here
            captured.record_residual(self.index, hidden)
            return
        # The source stream is frozen: its residual stream enters the fusion without grad.
        streams.residuals[self.index] = hidden[: streams.n_source].detach()
