"""Models for a run: the base model and tokenizer, the FlareConfig of each stage, stage 1's merge.

* Decoders (Llama, Gemma 2, Qwen2, Mistral) load in 4-bit NF4 with double quantization and bf16
  compute on GPUs (fp32 on CPUs), as in QLoRA; encoders (XLM-R) load unquantized, as in the paper.
  ``LoadSettings`` (from a TrainConfig and a stage) changes this: ``double_quant=False`` (the
  authors), a compute dtype per stage (``compute_dtype`` / ``stage1_compute_dtype``: bitsandbytes'
  compute dtype and the dtype of the non-quantized weights on CUDA; fp16 keeps those in fp32, see
  ``LoadSettings.dtypes``) and ``fp32_unquantized`` (those weights in fp32 whatever the compute dtype:
  the authors' Gemma). On a CPU every weight that is not
  4-bit is fp32 and nothing autocasts: CPU fp16 matmuls are emulated (slow) and a CPU run is a check
  of the pipeline, not of the numerics a GPU run has.
* A tokenizer without a pad token pads with EOS. (Padded positions are masked out of attention and
  loss, so reusing EOS changes nothing the model sees.) ``add_pad_token`` does what the authors did
  for Llama instead: a new "<pad>" token, the embedding matrices grown by one row (set to the mean of
  the others, deterministically, so every load of the base gives the same row) and, with
  ``embed_tokens`` in modules_to_save, trained embeddings.
* Tied input/output embeddings (Gemma 2) with both ``lm_head`` and ``embed_tokens`` in
  modules_to_save get one trainable tensor, not two diverging copies (``tie_trained_copies``).
* modules_to_save defaults to the head: lm_head for decoders (the recipe trains it),
  classifier / qa_outputs for encoders (a fresh head has to be trained).
* Stage 1 (plain LoRA on English) ends with ``FlareModel.merge_and_requantize()``: W0 + s B A is
  formed in fp32 from the dequantized NF4 weight, then quantized back to NF4 (same blocksize and
  double quantization) and becomes stage 2's frozen base; a trained lm_head copy replaces the
  original. Requantizing costs a small rounding error (NF4's), which is what QLoRA users get when
  they merge an adapter into a 4-bit model. Stage 2 trains a fresh FLARE adapter on that base.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..tasks import Task, model_family

logger = logging.getLogger(__name__)


def flare_api():
    """(FlareConfig, get_flare_model, load_flare_model) from the flare package, tied embeddings kept tied."""
    import flare

    def get_flare_model(model, config=None):
        return tie_trained_copies(flare.get_flare_model(model, config))

    def load_flare_model(model, path, **kwargs):
        return tie_trained_copies(flare.load_flare_model(model, path, **kwargs))

    return flare.FlareConfig, get_flare_model, load_flare_model


def tie_trained_copies(flare_model):
    """Make the trained copies of tied input/output embeddings one tensor again.

    Each modules_to_save entry gets its own deep copy, so a model whose lm_head.weight *is*
    embed_tokens.weight (Gemma 2's tie_word_embeddings) would train two copies that drift apart:
    the saved lm_head would no longer be the embeddings. Here the lm_head copy takes the
    embed_tokens copy's Parameter (their values are equal: both were copied from one tensor), so the
    optimizer sees it once and both saved entries hold the same values.
    """
    from ..modeling.trainable_copy import TrainableCopy

    base = flare_model.base_model
    config = getattr(base, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return flare_model
    get_in, get_out = getattr(base, "get_input_embeddings", None), getattr(base, "get_output_embeddings", None)
    emb, head = (get_in() if get_in else None), (get_out() if get_out else None)
    if isinstance(emb, TrainableCopy) and isinstance(head, TrainableCopy):
        if emb.original_module.weight is not head.original_module.weight:
            return flare_model  # not tied in this model after all
        head.trained_module.weight = emb.trained_module.weight
    return flare_model


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class LoadSettings:
    """How one stage loads its base model (the TrainConfig fields of the same names; see the module docstring)."""

    quantize: bool | None = None
    double_quant: bool = True
    compute_dtype: str | None = None  # this stage's; None: bf16 on CUDA (as before these settings existed)
    fp32_unquantized: bool = False
    add_pad_token: bool = False

    @classmethod
    def of(cls, cfg, stage: str = "stage2") -> "LoadSettings":
        return cls(
            quantize=cfg.quantize,
            double_quant=cfg.double_quant,
            compute_dtype=stage_compute_dtype(cfg, stage),
            fp32_unquantized=cfg.fp32_unquantized,
            add_pad_token=cfg.add_pad_token,
        )

    def dtypes(self, device_type: str) -> tuple[torch.dtype, torch.dtype]:
        """(dtype of the weights that are not 4-bit, bitsandbytes' compute dtype) on this device type."""
        if device_type != "cuda":
            return torch.float32, torch.float32
        compute = _DTYPES[self.compute_dtype] if self.compute_dtype else torch.bfloat16
        # fp16 compute keeps fp32 weights whatever fp32_unquantized says: it trains under a GradScaler, which
        # refuses fp16 gradients (the trained lm_head / embed_tokens copies), and an fp16 weight would lose an
        # update below its 2**-11 relative precision (lr 2e-5 steps). PEFT's prepare_model_for_kbit_training,
        # which the authors ran, casts these parts to fp32 likewise.
        return (torch.float32 if self.fp32_unquantized or compute == torch.float16 else compute), compute


def stage_compute_dtype(cfg, stage: str) -> str | None:
    """The compute dtype a stage asked for: stage 1 falls back to stage 2's; None: from ``bf16``."""
    if stage == "stage1" and cfg.stage1_compute_dtype is not None:
        return cfg.stage1_compute_dtype
    return cfg.compute_dtype


def builtin_base(output_dir: Path, seed: int):
    """The built-in tiny Llama: written once under <output_dir>/base, then loaded like any checkpoint."""
    from ..default.build import build_tokenizer, save_tiny_llama

    path = output_dir / "base"
    if not (path / "config.json").is_file():
        save_tiny_llama(path, build_tokenizer(), seed=seed)
    return path


PAD_TOKEN = "<pad>"


def load_tokenizer(path: str, family: str, *, add_pad_token: bool = False):
    """The model's tokenizer, padding on the family's side; add_pad_token: a new pad token when it has none
    (or only EOS standing in for one), which ``load_base_model(..., tokenizer=)`` then gives embeddings."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left" if family == "decoder" else "right"
    if add_pad_token and (tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id):
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
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


def load_base_model(
    path: str,
    task: Task,
    family: str,
    *,
    quantize: bool | None,
    device: torch.device,
    settings: LoadSettings | None = None,
    tokenizer=None,
):
    """The transformers model with its task head; decoders in NF4 unless quantize=False.

    settings: the stage's LoadSettings (None: today's defaults with ``quantize``); with add_pad_token,
    ``tokenizer`` (from ``load_tokenizer(..., add_pad_token=True)``) says how many rows the embeddings need.
    """
    import transformers

    settings = settings or LoadSettings(quantize=quantize)
    weights, compute = settings.dtypes(device.type)
    quantize = (family == "decoder") if settings.quantize is None else settings.quantize
    if family == "decoder":
        cls = transformers.AutoModelForCausalLM
        extra = {}
    elif task.kind == "classification":
        cls, extra = transformers.AutoModelForSequenceClassification, {"num_labels": task.num_labels}
    else:
        cls, extra = transformers.AutoModelForQuestionAnswering, {}
    kwargs = dict(dtype=weights, device_map={"": str(device)}, **extra)
    if quantize:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=settings.double_quant,
            bnb_4bit_compute_dtype=compute,
        )
    try:
        model = cls.from_pretrained(path, **kwargs)
    except Exception as exc:
        # SafetensorError (a truncated weight file) names no file; OSError for missing weights is long
        if type(exc).__name__ != "SafetensorError" and not isinstance(exc, OSError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot load the model's weights ({first}); save or download it again") from None
    if settings.add_pad_token:
        if tokenizer is None:
            raise ValueError("add_pad_token: load_base_model needs the tokenizer that holds the new pad token")
        add_pad_embedding(model, tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None)
    return model


@torch.no_grad()
def add_pad_embedding(model, tokenizer) -> None:
    """Grow the embeddings (and an untied output layer) to the tokenizer's size, the new rows at the mean of
    the old ones, and make the tokenizer's pad token the model's."""
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if len(tokenizer) > old:
        # mean_resizing=False: transformers would sample the new rows at random, and stage 2 and flare eval
        # load the base again: the frozen source stream must see the same pad row each time.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}.values():
            weight = layer.weight
            if weight.shape[0] > old:
                weight[old:] = weight[:old].float().mean(0).to(weight.dtype)
    model.config.pad_token_id = tokenizer.pad_token_id


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
