"""Lockstep two-stream decoding with a KV cache.

Each step feeds one new token per row of ``[source rows; target rows]``: the target's own choice
(greedy or sampled) and the source stream's greedy choice under the frozen base model, so the new
target position fuses with its aligned new source position, exactly as in the full two-stream
forward over the sequences so far. (The authors' code broadcast one source vector to every new
position.) The source stream keeps decoding its own continuation until the target stops; its EOS
does not stop it, since each later target position still needs an aligned source position.

Only per-token fusions can be decoded incrementally: sequence-level ones (matmul, matmul_relu,
cross_attention) mix every position of the sequence, future ones included, so a cached decoding
step cannot reproduce them; ``generate`` refuses them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .context import activate
from .inputs import check_length, check_streams


@dataclass
class FlareGenerateOutput:
    """``sequences`` [B, L + T] target prompt + new tokens; ``source_sequences`` likewise (None
    without a source); ``logits``: per step, the target's [B, V] next-token logits (with
    ``output_logits``); ``source_logits`` likewise for the source stream."""

    sequences: torch.Tensor
    source_sequences: torch.Tensor | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    source_logits: tuple[torch.Tensor, ...] | None = None


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of [B, V] logits (filtered entries -> -inf)."""
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass of the tokens ranked above it already reaches top_p (the best one stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _eos_set(eos_token_id, model) -> list[int]:
    if eos_token_id is None:
        gen_config = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen_config, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]


def decoding_setup(model, eos_token_id, pad_token_id) -> tuple[list[int], int, dict, str]:
    """(EOS ids, pad id, the forward's keep-last-logits argument, its KV-cache argument's name)."""
    eos = _eos_set(eos_token_id, model)
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None)
        pad_token_id = eos[0] if pad_token_id is None and eos else (0 if pad_token_id is None else pad_token_id)
    accepts = inspect.signature(model.forward).parameters
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
    # transformers >= 5.2x names the KV cache `cache` and warns on `past_key_values` (removed in 5.40)
    cache_arg = "cache" if "cache" in accepts else "past_key_values"
    return eos, pad_token_id, keep_last, cache_arg


@torch.no_grad()
def generate(
    flare_model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    source_input_ids: torch.Tensor | None = None,
    source_attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    return_dict_in_generate: bool = False,
    output_logits: bool = False,
):
    """Decode up to ``max_new_tokens`` target tokens; returns [B, L + T] ids (or a FlareGenerateOutput).

    Args:
        input_ids, attention_mask: [B, L] target prompts, padded on the left.
        source_input_ids, source_attention_mask: [B, L_s] English prompts (None: plain LoRA decoding).
            Prompts of different lengths are left-padded to the longer one.
        eos_token_id: a target row stops at any of these (default: the model's generation config).
        pad_token_id: fills finished target rows (default: the model's pad, else the first EOS).
        do_sample, temperature, top_k, top_p, generator: sampling for the TARGET stream; the
            source stream is always greedy (it is the frozen English model's own continuation).
        use_cache: False recomputes the full two-stream forward at every step (the reference the
            cached path is tested against).
        return_dict_in_generate, output_logits: return a :class:`FlareGenerateOutput` with the
            per-step logits of both streams.

    Runs the model in whatever train/eval mode it is in (call ``.eval()`` for deterministic output).
    """
    model = flare_model.base_model
    if not (callable(getattr(model, "can_generate", None)) and model.can_generate()):
        raise TypeError(f"{type(model).__name__} is not a generative (causal LM) model")
    if flare_model.padding_side != "left":
        raise TypeError("generate needs a causal decoder model")
    if use_cache and model.training and flare_model.is_gradient_checkpointing:
        raise ValueError(
            "gradient checkpointing drops the KV cache in train mode; call .eval() before generate "
            "(or pass use_cache=False)"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    two_streams = source_input_ids is not None
    if two_streams and flare_model.config.fuses and flare_model.config.sequence_level:
        raise ValueError(
            f"fusion {flare_model.config.fusion!r} mixes all positions of a sequence (future ones included), "
            "so it cannot be decoded token by token; generate supports the per-token fusions add, mul, add_relu"
        )
    if two_streams:
        input_ids, attention_mask, streams, _ = flare_model._two_stream_call(
            input_ids, attention_mask, source_input_ids, source_attention_mask, {}, keep_source_rows=True
        )
        src_ids, src_mask = streams.source_input_ids, streams.source_attention_mask
    else:
        input_ids, attention_mask, _, _ = check_streams(input_ids, attention_mask, None, None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be a 2-D [batch, length] tensor, got {getattr(input_ids, 'shape', input_ids)}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        src_ids = src_mask = None
    check_length(input_ids.shape[1] + max_new_tokens, flare_model.max_length, "prompt + max_new_tokens")

    eos, pad_token_id, keep_last, cache_arg = decoding_setup(model, eos_token_id, pad_token_id)

    b = input_ids.shape[0]
    tgt, tgt_mask = input_ids, attention_mask
    src = src_ids
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    eos_t = torch.tensor(eos, dtype=input_ids.dtype, device=input_ids.device)
    cache = None
    step_t, step_s = tgt, src  # what the next forward feeds (whole prompts first)
    logits_t_all: list[torch.Tensor] = []
    logits_s_all: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        if not use_cache:
            step_t, step_s, cache = tgt, src, None
        call = dict(input_ids=step_t, attention_mask=tgt_mask, use_cache=use_cache, **keep_last)
        if cache is not None:
            call[cache_arg] = cache
        if two_streams:
            streams.source_input_ids = step_s
            streams.source_attention_mask = src_mask
            streams.residuals = {}
            with activate(flare_model._owner, streams=streams):
                out = model(**call)
        else:
            out = model(**call)
        cache = out.get("cache", out.get("past_key_values")) if use_cache else None
        if use_cache and cache is None:
            raise RuntimeError(f"{type(model).__name__} returned no KV cache; pass use_cache=False")
        last = out.logits[:, -1].float()  # [2B or B, V]
        logits_s, logits_t = (last[:b], last[b:]) if two_streams else (None, last)
        if do_sample:
            probs = _filter_logits(logits_t, temperature, top_k, top_p).softmax(dim=-1)
            next_t = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_t = logits_t.argmax(dim=-1)
        next_t = torch.where(finished, torch.full_like(next_t, pad_token_id), next_t)
        if output_logits:
            logits_t_all.append(logits_t)
            if two_streams:
                logits_s_all.append(logits_s)
        tgt = torch.cat([tgt, next_t[:, None]], dim=1)
        tgt_mask = torch.cat([tgt_mask, tgt_mask.new_ones(b, 1)], dim=1)
        step_t = next_t[:, None]
        if two_streams:
            next_s = logits_s.argmax(dim=-1)
            src = torch.cat([src, next_s[:, None]], dim=1)
            src_mask = torch.cat([src_mask, src_mask.new_ones(b, 1)], dim=1)
            step_s = next_s[:, None]
        if eos:
            finished |= torch.isin(next_t, eos_t)
        if bool(finished.all()):
            break
    if not return_dict_in_generate:
        return tgt
    return FlareGenerateOutput(
        sequences=tgt,
        source_sequences=src,
        logits=tuple(logits_t_all) if output_logits else None,
        source_logits=tuple(logits_s_all) if output_logits and two_streams else None,
    )
