"""Greedy decoding of a FLARE MT model with a KV cache.

One stream only: the prompt's positions read their aligned NLLB source (``MTCapture``), and each
generated position reads a zero source, since no NLLB token of the input text aligns with it (the
fusion's "no source" value phi(0, A x_t)). The NLLB encoder and the map run once, on the prompt.
"""

from __future__ import annotations

import torch

from .context import activate
from .generation import decoding_setup
from .inputs import check_length
from .mt_source import MTCapture


@torch.no_grad()
def mt_generate(flare_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mt_inputs: dict, *,
                max_new_tokens: int, eos_token_id=None, pad_token_id: int | None = None,
                use_cache: bool = True) -> torch.Tensor:  # fmt: skip
    """[B, L] left-padded prompts + their FLARE MT inputs -> [B, L + T] ids (greedy)."""
    model = flare_model.base_model
    if flare_model.padding_side != "left" or not (callable(getattr(model, "can_generate", None)) and model.can_generate()):
        raise TypeError("generate needs a causal decoder model")
    if flare_model.config.fuses and flare_model.config.sequence_level:
        raise ValueError(
            f"fusion {flare_model.config.fusion!r} mixes all positions of a sequence (future ones included), "
            "so it cannot be decoded token by token; generate supports the per-token fusions add, mul, add_relu"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_length(input_ids.shape[1] + max_new_tokens, flare_model.max_length, "prompt + max_new_tokens")
    capture = MTCapture(flare_model.mt_source(**mt_inputs))
    eos, pad_token_id, keep_last, cache_arg = decoding_setup(model, eos_token_id, pad_token_id)
    b = input_ids.shape[0]
    tgt, tgt_mask, step, cache = input_ids, attention_mask, input_ids, None
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    eos_t = torch.tensor(eos, dtype=input_ids.dtype, device=input_ids.device)
    for _ in range(max_new_tokens):
        if not use_cache:
            step, cache = tgt, None
        capture.offset = tgt.shape[1] - step.shape[1]
        capture.target_attention_mask = tgt_mask
        call = dict(input_ids=step, attention_mask=tgt_mask, use_cache=use_cache, **keep_last)
        if cache is not None:
            call[cache_arg] = cache
        with activate(flare_model._owner, captured=capture):
            out = model(**call)
        cache = out.get("cache", out.get("past_key_values")) if use_cache else None
        next_t = out.logits[:, -1].float().argmax(dim=-1)
        next_t = torch.where(finished, torch.full_like(next_t, pad_token_id), next_t)
        tgt = torch.cat([tgt, next_t[:, None]], dim=1)
        tgt_mask = torch.cat([tgt_mask, tgt_mask.new_ones(b, 1)], dim=1)
        step = next_t[:, None]
        if eos:
            finished |= torch.isin(next_t, eos_t)
        if bool(finished.all()):
            break
    return tgt
