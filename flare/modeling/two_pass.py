"""The two-pass definition of a FLARE forward: the executable spec the one-batch path is tested against.

1. Source pass: the frozen base model (adapters off, original modules_to_save, no grad) over the
   English batch, recording at every fusion projection what the fusion reads: the projection's
   input (``source_site="projection_input"``) or its block's residual-stream input (``"residual"``).
2. Target pass: the model over the target batch, every fusion projection's output replaced by
   ``flare_kernels.flare_lora_reference`` fed the recorded source (zero at the source's padded
   positions: there is no English token there) and, for sequence-level fusions, the target's
   attention mask as key-padding mask; other projections run plain LoRA. The heads and loss are
   the model's own.

This is how the authors' code computes FLARE (two separate passes), written with the reference
math and none of FlareModel's batching, hooks or context. It supports ``lora_dropout == 0`` only:
with dropout the two formulations draw different masks.

With ``compute_dtype`` EVERY projection of both passes is computed by the reference in that dtype
(base products included), so the whole forward is pure PyTorch: float32 gives the yardstick error
of "the same computation in PyTorch", and float64 on a ``.double()`` copy of the model the exact
value both are measured against (the flash-attention tolerance rule).
"""

from __future__ import annotations

import contextlib

import torch

from flare_kernels import use_backend
from flare_kernels.reference import flare_lora_reference
from flare_kernels.reference.flare_lora import base_forward, dense_weight
from flare_kernels.reference.fusion import SEQUENCE_FUSIONS

from .inputs import align_streams, check_streams


def _projection_reference(module, x: torch.Tensor, source: torch.Tensor | None, compute_dtype=None,
                          fusion_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """y_t of one projection from its parameters (and the recorded source, if it fuses), by the reference."""
    weight = module.weight  # NF4Weight or the dense Parameter
    params = module.fusion_module.params() if module.fusion_module is not None and source is not None else ()
    cdt = compute_dtype or getattr(module, "compute_dtype", None) or x.dtype
    return flare_lora_reference(
        x, weight, module.lora_A.weight, module.lora_B.weight, module.scaling,
        source=None if source is None else source.to(x.dtype), fusion=module.fusion if source is not None else "none",
        bias=module.bias, fusion_params=params, compute_dtype=cdt,
        fusion_mask=fusion_mask if source is not None and module.fusion in SEQUENCE_FUSIONS else None,
        heads=module.cross_attention_heads,
    ).y  # fmt: skip


def _pure_torch(compute_dtype):
    # The modules' own outputs are replaced by the hooks; running them on the reference backend keeps
    # the pass pure PyTorch and lets it take float64 whatever the kernel backends accept.
    return use_backend("torch") if compute_dtype is not None else contextlib.nullcontext()


def _base_reference(module, x: torch.Tensor, compute_dtype) -> torch.Tensor:
    return base_forward(x, dense_weight(module.weight, compute_dtype), module.bias)


def two_pass_forward(
    flare_model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    source_input_ids: torch.Tensor,
    source_attention_mask: torch.Tensor,
    *,
    compute_dtype: torch.dtype | None = None,
    **kwargs,
):
    """FLARE forward by the two-pass definition; returns the wrapped model's output for the target batch.

    ``compute_dtype``: compute every projection with the reference in this dtype (see the module doc).
    """
    cfg = flare_model.config
    if (cfg.lora_dropout > 0 or cfg.attention_dropout > 0) and flare_model.training:
        raise ValueError("the two-pass definition is defined here without dropout (or in eval mode)")
    input_ids, attention_mask, source_input_ids, source_attention_mask = check_streams(
        input_ids, attention_mask, source_input_ids, source_attention_mask
    )
    pad = getattr(flare_model.base_model.config, "pad_token_id", None)
    input_ids, attention_mask, source_input_ids, source_attention_mask, kwargs = align_streams(
        input_ids, attention_mask, source_input_ids, source_attention_mask,
        side=flare_model.padding_side, pad_token_id=0 if pad is None else int(pad), extra=kwargs,
    )  # fmt: skip
    model = flare_model.base_model
    modules = dict(model.named_modules())
    fusion = flare_model.fusion_projections()
    everything = flare_model.projections() if compute_dtype is not None else {}
    residual = flare_model.config.source_site == "residual"
    recorded: dict[str, torch.Tensor] = {}
    handles = []
    if residual:
        blocks = [modules[b] for b in flare_model.targets.blocks]
        by_block = {m.block_index: path for path, m in fusion.items()}

        def record_block(index):
            def hook(module, args, kw):
                hidden = args[0] if args else kw["hidden_states"]
                for path, m in fusion.items():
                    if m.block_index == index:
                        recorded[path] = hidden.detach()

            return hook

        for index, block in enumerate(blocks):
            if index in by_block:
                handles.append(block.register_forward_pre_hook(record_block(index), with_kwargs=True))
    else:
        for path, m in fusion.items():
            handles.append(
                m.register_forward_pre_hook(lambda mod, args, p=path: recorded.__setitem__(p, args[0].detach()))
            )
    for m in everything.values():  # frozen base products by the reference, in compute_dtype
        handles.append(m.register_forward_hook(lambda mod, args, out: _base_reference(mod, args[0], compute_dtype)))
    try:
        with torch.no_grad(), flare_model.disable_adapters(), _pure_torch(compute_dtype):
            model(input_ids=source_input_ids, attention_mask=source_attention_mask)
    finally:
        for h in handles:
            h.remove()
    keep = source_attention_mask.to(torch.bool)[..., None]
    recorded = {p: torch.where(keep, r, torch.zeros_like(r)) for p, r in recorded.items()}
    key_mask = None if attention_mask is None else attention_mask.to(torch.bool)
    handles = [
        m.register_forward_hook(
            lambda mod, args, out, p=path: _projection_reference(mod, args[0], recorded.get(p), compute_dtype, key_mask)
        )
        for path, m in {**everything, **fusion}.items()
    ]
    try:
        with _pure_torch(compute_dtype):
            return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        for h in handles:
            h.remove()
