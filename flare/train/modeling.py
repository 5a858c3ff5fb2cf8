"""Models for a run: the base model and tokenizer, the FlareConfig of each stage, stage 1's merge.

* Decoders (Llama, Gemma 2, Qwen2, Mistral) load in 4-bit NF4 with double quantization and bf16
  compute on GPUs (fp32 on CPUs), as in QLoRA; encoders (XLM-R) load unquantized, as in the paper.
* A tokenizer without a pad token pads with EOS. (The authors add a new pad token to Llama and train
  embed_tokens for it; padded positions are masked out of attention and loss either way, so reusing
  EOS changes nothing the model sees and keeps embed_tokens frozen.)
* modules_to_save defaults to the head: lm_head for decoders (the recipe trains it),
  classifier / qa_outputs for encoders (a fresh head has to be trained).
* Stage 1 (plain LoRA on English) ends with ``FlareModel.merge_and_requantize()``: W0 + s B A is
  formed in fp32 from the dequantized NF4 weight, then quantized back to NF4 (same blocksize and
  double quantization) and becomes stage 2's frozen base; a trained lm_head copy replaces the
  original. Requantizing costs a small rounding error (NF4's), which is what QLoRA users get when
  they merge an adapter into a 4-bit model. Stage 2 trains a fresh FLARE adapter on that base.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..tasks import Task, model_family

logger = logging.getLogger(__name__)


def flare_api():
    """(FlareConfig, get_flare_model, load_flare_model) from the flare package."""
    import flare

    return flare.FlareConfig, flare.get_flare_model, flare.load_flare_model


def builtin_base(output_dir: Path, seed: int):
    """The built-in tiny Llama: written once under <output_dir>/base, then loaded like any checkpoint."""
    from ..default.build import build_tokenizer, save_tiny_llama

    path = output_dir / "base"
    if not (path / "config.json").is_file():
        save_tiny_llama(path, build_tokenizer(), seed=seed)
    return path


def load_tokenizer(path: str, family: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left" if family == "decoder" else "right"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"the tokenizer of {path} has neither a pad nor an EOS token to pad with")
        tok.pad_token = tok.eos_token
    return tok


def looks_local(path: str) -> bool:
    """Whether ``path`` names a local folder rather than a hub id ("org/name": one slash, no leading dot)."""
    if path.startswith(("/", "./", "../", "~", ".\\")) or path.count("/") > 1 or "\\" in path:
        return True
    return Path(path).exists()


def check_model_path(path: str, option: str = "--model") -> None:
    """A local model path that does not exist fails here, in one line (transformers would raise an OSError
    about a hub repository id after seconds of retries)."""
    if looks_local(path) and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{option} {path}: model path not found; pass an existing model folder or a hub name")


def check_model_files(path: str, option: str = "--model") -> None:
    """Read the header of every weight file of a local model folder, so a truncated or corrupted
    ``*.safetensors`` fails in one line naming the file, before the run writes anything."""
    check_model_path(path, option)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError is not an OSError and names no file
            raise ValueError(
                f"{file}: not a readable safetensors file ({exc}); it is truncated or corrupted: download or "
                "save the model again"
            ) from None


def model_config(path: str, option: str = "--model"):
    """``AutoConfig.from_pretrained(path)`` with a one-line error naming the option."""
    from transformers import AutoConfig

    check_model_path(path, option)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{option} {path}: cannot load the model's config.json ({first}); pass a model folder or a hub name"
        ) from None


def detect_family(path: str, family: str | None) -> str:
    if family is not None:
        return family
    return model_family(model_config(path))


def check_max_length(path: str | None, max_length: int) -> None:
    """Refuse a --max-length beyond the model's positions before training starts (the model would raise at
    the first long batch otherwise). path None: the built-in tiny Llama."""
    from transformers import LlamaConfig

    from ..default.build import TINY_LLAMA

    config = LlamaConfig(**TINY_LLAMA) if path is None else model_config(path)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= config.pad_token_id + 1  # RoBERTa-style position ids start after the padding index
    if limit and max_length > limit:
        raise ValueError(f"--max-length {max_length} exceeds the {limit} positions of {path or 'the built-in model'}")


def load_base_model(path: str, task: Task, family: str, *, quantize: bool | None, device: torch.device):
    """The transformers model with its task head; decoders in NF4 unless quantize=False."""
    import transformers

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantize = (family == "decoder") if quantize is None else quantize
    if family == "decoder":
        cls = transformers.AutoModelForCausalLM
        extra = {}
    elif task.kind == "classification":
        cls, extra = transformers.AutoModelForSequenceClassification, {"num_labels": task.num_labels}
    else:
        cls, extra = transformers.AutoModelForQuestionAnswering, {}
    kwargs = dict(dtype=compute, device_map={"": str(device)}, **extra)
    if quantize:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    try:
        model = cls.from_pretrained(path, **kwargs)
    except Exception as exc:
        # SafetensorError (a truncated weight file) names no file; OSError for missing weights is long
        if type(exc).__name__ != "SafetensorError" and not isinstance(exc, OSError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot load the model's weights ({first}); save or download it again") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None)
    return model


def default_modules_to_save(family: str, task: Task) -> tuple[str, ...]:
    if family == "decoder":
        return ("lm_head",)
    return ("classifier",) if task.kind == "classification" else ("qa_outputs",)


def flare_config(cfg, family: str, task: Task):
    return cfg.flare_config(default_modules_to_save(family, task))


def merged_stage1(base, stage1_adapter: Path):
    """Stage 2's base: the stage-1 adapter loaded onto ``base``, merged and re-quantized to NF4."""
    _, _, load_flare_model = flare_api()
    model = load_flare_model(base, str(stage1_adapter))
    merged = model.merge_and_requantize()
    return merged if merged is not None else model.base_model
