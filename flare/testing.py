"""Tiny randomly initialized transformers models for tests, benchmarks and the built-in default.

    model = tiny_model("llama", load_in_4bit=True)            # LlamaForCausalLM, NF4 via bitsandbytes
    model = tiny_model("xlm-roberta", head="question_answering")

Sizes default to hidden 64, 2 layers, 4 heads (2 KV heads for decoders), vocab 100, 64
positions; any config field can be overridden. Deterministic by ``seed`` (the global RNG is left
untouched). ``load_in_4bit`` goes the way users go: ``save_pretrained`` to a temporary directory,
then ``from_pretrained`` with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)``; the returned model has
never run a forward (bitsandbytes' in-place CPU repacking has not happened), so wrap it first.
Loaded models are cached per argument set and handed out as deep copies (``cache=True``).
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import torch

ARCHITECTURES = ("llama", "gemma2", "qwen2", "mistral", "xlm-roberta")
DECODER_HEADS = ("causal_lm", "sequence_classification")
ENCODER_HEADS = ("sequence_classification", "question_answering", "token_classification", "masked_lm")

_CACHE: dict[tuple, torch.nn.Module] = {}


def tiny_config(arch: str = "llama", **overrides: Any):
    """A small ``transformers`` config of ``arch`` (see ``ARCHITECTURES``); ``overrides`` set fields."""
    import transformers as tf

    common = dict(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
    )
    decoder = dict(common, intermediate_size=128, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   tie_word_embeddings=False)  # fmt: skip
    if arch == "llama":
        cfg = tf.LlamaConfig(**decoder)
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(**decoder, head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**decoder)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**decoder, sliding_window=None)
    elif arch == "xlm-roberta":
        cfg = tf.XLMRobertaConfig(**common, intermediate_size=128, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _model_class(arch: str, head: str):
    import transformers as tf

    names = {
        ("llama", "causal_lm"): "LlamaForCausalLM",
        ("llama", "sequence_classification"): "LlamaForSequenceClassification",
        ("gemma2", "causal_lm"): "Gemma2ForCausalLM",
        ("gemma2", "sequence_classification"): "Gemma2ForSequenceClassification",
        ("qwen2", "causal_lm"): "Qwen2ForCausalLM",
        ("qwen2", "sequence_classification"): "Qwen2ForSequenceClassification",
        ("mistral", "causal_lm"): "MistralForCausalLM",
        ("mistral", "sequence_classification"): "MistralForSequenceClassification",
        ("xlm-roberta", "sequence_classification"): "XLMRobertaForSequenceClassification",
        ("xlm-roberta", "question_answering"): "XLMRobertaForQuestionAnswering",
        ("xlm-roberta", "token_classification"): "XLMRobertaForTokenClassification",
        ("xlm-roberta", "masked_lm"): "XLMRobertaForMaskedLM",
    }
    if (arch, head) not in names:
        heads = ENCODER_HEADS if arch == "xlm-roberta" else DECODER_HEADS
        raise ValueError(f"head {head!r} is not available for {arch!r}; choose one of {heads}")
    return getattr(tf, names[(arch, head)])


def tiny_model(
    arch: str = "llama",
    *,
    head: str | None = None,
    seed: int = 0,
    load_in_4bit: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    dtype: torch.dtype = torch.float32,
    num_labels: int = 3,
    attn_implementation: str | None = "eager",
    cache: bool = True,
    **config_overrides: Any,
):
    """A tiny random ``arch`` model with ``head`` (default: causal_lm for decoders, sequence_classification for XLM-R).

    Args:
        load_in_4bit: quantize the projections to NF4 through bitsandbytes (embeddings and the
            heads lm_head / score / classifier / qa_outputs stay dense).
        compute_dtype: bitsandbytes' compute dtype for 4-bit layers.
        dtype: dtype of the dense weights.
        attn_implementation: transformers' attention backend ("eager" default: exact on CPU in every dtype).
        cache: reuse a pristine loaded copy for equal arguments (returns a deep copy each time).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    head = head or ("sequence_classification" if arch == "xlm-roberta" else "causal_lm")
    key = (arch, head, seed, load_in_4bit, compute_dtype, dtype, num_labels, attn_implementation,
           tuple(sorted((k, repr(v)) for k, v in config_overrides.items())))  # fmt: skip
    if cache and key in _CACHE:
        return copy.deepcopy(_CACHE[key])
    cls = _model_class(arch, head)
    cfg = tiny_config(arch, **config_overrides)
    if head in ("sequence_classification", "token_classification"):
        cfg.num_labels = num_labels
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg).to(dtype)
    if load_in_4bit:
        model = _reload_in_4bit(model, cls, compute_dtype, dtype, attn_implementation)
    model.eval()
    if cache:
        _CACHE[key] = model
        return copy.deepcopy(model)
    return model


def _reload_in_4bit(model, cls, compute_dtype, dtype, attn_implementation):
    from transformers import BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        # Heads stay dense, as users keep them (a head trained in full cannot be 4-bit).
        llm_int8_skip_modules=["lm_head", "score", "classifier", "qa_outputs"],
    )
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
            loaded = cls.from_pretrained(d, quantization_config=quant, dtype=dtype, **kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return loaded


def random_lora_(flare_model, scale: float = 0.5, seed: int = 0) -> None:
    """Give every adapter a nonzero random B (and fresh A / fusion params): a fresh adapter's zero B
    makes the fusion invisible, and a test of fusion must be able to fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in flare_model.projections().values():
            for p in (module.lora_A.weight, module.lora_B.weight):
                p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p))
            if module.fusion_module is not None:
                for p in module.fusion_module.parameters():
                    p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p))


def random_batch(vocab_size: int = 100, batch: int = 3, length: int = 10, *, pad_side: str = "left",
                 pad_token_id: int = 0, min_length: int = 3, seed: int = 0, low: int = 3):  # fmt: skip
    """(input_ids, attention_mask) of random lengths in [min_length, length], padded on ``pad_side``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab_size, (batch, length), generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.long)
    lengths = torch.randint(min_length, length + 1, (batch,), generator=gen)
    lengths[0] = length  # one unpadded row
    for i, n in enumerate(lengths.tolist()):
        if pad_side == "left":
            mask[i, length - n :] = 1
        else:
            mask[i, :n] = 1
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_token_id))
    return ids, mask


# ---------------------------------------------------------------------------- test helpers
def make_flare(arch: str = "llama", *, config=None, load_in_4bit: bool = True, head: str | None = None, seed: int = 0,
               lora_scale: float = 0.3, dtype: torch.dtype = torch.float32, **kwargs):  # fmt: skip
    """A tiny ``arch`` model wrapped with ``config`` (default FlareConfig()), adapters randomized
    (``lora_scale`` = 0 keeps PEFT's init, whose zero B hides the fusion)."""
    import flare

    model = tiny_model(arch, head=head, load_in_4bit=load_in_4bit, seed=seed, dtype=dtype, **kwargs)
    fm = flare.get_flare_model(model, config or flare.FlareConfig())
    if lora_scale:
        random_lora_(fm, scale=lora_scale, seed=seed + 1)
    return fm


def random_streams(arch: str = "llama", *, batch: int = 3, length: int = 9, source_length: int | None = None,
                   seed: int = 0, vocab_size: int = 100, padded: bool = True):  # fmt: skip
    """(input_ids, attention_mask, source_input_ids, source_attention_mask), padded as ``arch`` pads
    (rows of random lengths; ``padded=False``: every row full length)."""
    encoder = arch == "xlm-roberta"
    side = "right" if encoder else "left"
    pad = 1 if encoder else 0
    ls = source_length or length
    ids, mask = random_batch(vocab_size, batch, length, pad_side=side, pad_token_id=pad, seed=seed,
                             min_length=3 if padded else length)  # fmt: skip
    sids, smask = random_batch(vocab_size, batch, ls, pad_side=side, pad_token_id=pad, seed=seed + 100,
                               min_length=3 if padded else ls)  # fmt: skip
    return ids, mask, sids, smask


def take_grads(flare_model) -> dict[str, torch.Tensor]:
    """Copies of every trainable parameter's gradient (asserting each has one), then zeroes them."""
    out = {}
    for name, p in flare_model.named_trainable_parameters():
        if p.grad is None:
            raise AssertionError(f"{name} got no gradient")
        out[name] = p.grad.detach().clone()
    flare_model.zero_grad(set_to_none=True)
    return out


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, name: str = ""
) -> None:
    """max |actual - expected| <= rtol * max |expected| + atol: an error relative to the tensor's scale.

    Element-wise relative tolerances fail on entries that cancel to near zero inside a large tensor
    (their relative error is the rounding of the big terms over a tiny result); the error of a
    computation in precision eps scales with the magnitude of its terms, which max |expected| measures.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    bound = rtol * scale + atol
    if not err <= bound:  # also catches NaN
        raise AssertionError(
            f"{name}: max abs error {err:.3e} exceeds {bound:.3e} (rtol {rtol:g} x scale {scale:.3e} + atol {atol:g})"
        )


def assert_within_twice(actual: torch.Tensor, yardstick: torch.Tensor, exact: torch.Tensor, *, atol: float = 1e-6,
                        name: str = "") -> None:  # fmt: skip
    """The flash-attention rule: |actual - exact| <= 2 |yardstick - exact| + atol * max |exact| (max norms).

    ``exact`` is a float64 reference, ``yardstick`` the same computation in PyTorch at the working
    precision; ``actual`` (kernels, fused paths) may be at most twice as far off, plus a few ulps.
    """
    if not (actual.shape == yardstick.shape == exact.shape):
        raise AssertionError(f"{name}: shapes {tuple(actual.shape)}, {tuple(yardstick.shape)}, {tuple(exact.shape)}")
    ex = exact.double()
    err = (actual.double() - ex).abs().max().item() if ex.numel() else 0.0
    ref = (yardstick.double() - ex).abs().max().item() if ex.numel() else 0.0
    bound = 2 * ref + atol * (ex.abs().max().item() if ex.numel() else 0.0)
    if not err <= bound:
        raise AssertionError(
            f"{name}: error {err:.3e} vs float64 exceeds 2 x {ref:.3e} (PyTorch at the same precision) + atol"
        )


def assert_grads_close(expected: dict, actual: dict, *, rtol: float, atol: float) -> None:
    """Every gradient within :func:`assert_close_scaled`'s bound."""
    if expected.keys() != actual.keys():
        raise AssertionError(f"different parameters: {sorted(set(expected) ^ set(actual))}")
    for name, value in expected.items():
        assert_close_scaled(actual[name], value, rtol=rtol, atol=atol, name=name)
