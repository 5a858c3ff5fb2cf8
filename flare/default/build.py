"""The built-in default's tokenizer and model, made locally (no hub): a word-level tokenizer over
the sample's vocabulary and a tiny randomly initialized Llama, saved once and loaded in 4-bit NF4
through bitsandbytes exactly as a hub checkpoint would be (``from_pretrained`` with a
``BitsAndBytesConfig``: NF4, double quantization, the QLoRA recipe)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..tasks import get_task
from .sample import SAMPLE_PATH

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")

# Sizes: every projection's input width is a multiple of NF4's blocksize (64), so each quantization
# block lies in one weight row; 2 layers x 64 wide keeps a training step at a few ms on one core.
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def build_tokenizer(sample_path: Path = SAMPLE_PATH):
    """Word-level tokenizer (``tokenizers``) over every word of the sample and the prompt template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    task = get_task("toy")
    words: set[str] = set()
    pre = pre_tokenizers.Whitespace()
    texts = [task.prompt.format(text="", text_pair=""), *(" " + w for w in task.label_words)]
    with open(sample_path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["text"], row["source_text"]]
    for text in texts:
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(sorted(words)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.post_processor = processors.TemplateProcessing(  # prepend <s> as Llama's tokenizer does
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        model_max_length=TINY_LLAMA["max_position_embeddings"],
    )


def save_tiny_llama(path: str | os.PathLike, tokenizer, *, seed: int = 0) -> Path:
    """Write a randomly initialized tiny Llama (dense fp32 weights) and its tokenizer to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY_LLAMA,
    )
    return save_seeded(path, LlamaForCausalLM, config, tokenizer, seed)


def save_seeded(path: Path, model_class, config, tokenizer, seed: int, files: dict[str, str] | None = None) -> Path:
    """A randomly initialized ``model_class(config)`` (drawn from ``seed`` without touching the
    global RNG), its tokenizer and extra text ``files``, written to ``path`` complete or not at all."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, text in (files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    from ..data.files import follow_umask

    follow_umask(tmp)  # safetensors writes 0600 whatever the umask
    os.replace(tmp, path)  # complete or absent, never half written
    return path


def load_4bit(
    path: str | os.PathLike, *, compute_dtype: torch.dtype = torch.float32, device: str = "cpu", model_class=None
):
    """Load a checkpoint with its linear layers in bitsandbytes NF4 (double quantization)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    cls = model_class or AutoModelForCausalLM
    return cls.from_pretrained(str(path), quantization_config=quant, dtype=compute_dtype, device_map={"": device})


# FLARE MT's built-in NLLB: an M2M100 (NLLB's architecture) this small encodes a toy batch in about
# a millisecond. The toy task's invented languages get their own NLLB-style codes (NLLB-200 has none).
TINY_NLLB = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=256,
)
TOY_NLLB_CODES = {"qaa": "qaa_Latn", "qab": "qab_Latn"}


def build_nllb_tokenizer(sample_path: Path = SAMPLE_PATH, vocab_size: int = 400):
    """A real ``NllbTokenizer`` (fast, with offsets) over a BPE trained on the sample's texts, with
    NLLB-200's language codes plus the toy languages' (``TOY_NLLB_CODES``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import NllbTokenizer
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

    texts = []
    with open(sample_path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["text"], row["source_text"]]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    )
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in state["merges"]]
    codes = list(FAIRSEQ_LANGUAGE_CODES) + [c for c in TOY_NLLB_CODES.values() if c not in FAIRSEQ_LANGUAGE_CODES]
    return NllbTokenizer(vocab=state["vocab"], merges=merges, additional_special_tokens=codes)


def save_tiny_nllb(path: str | os.PathLike, *, seed: int = 0, sample_path: Path = SAMPLE_PATH) -> Path:
    """Write a randomly initialized tiny NLLB-shaped M2M100 model, its tokenizer and the toy
    languages' codes (``flare_mt_languages.json``) to ``path``; complete or absent."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    from ..modeling.mt_source import LANGUAGES_FILE

    path = Path(path)
    tokenizer = build_nllb_tokenizer(sample_path)
    config = M2M100Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        **TINY_NLLB,
    )
    files = {LANGUAGES_FILE: json.dumps(TOY_NLLB_CODES, indent=2) + "\n"}
    return save_seeded(path, M2M100ForConditionalGeneration, config, tokenizer, seed, files)
