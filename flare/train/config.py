"""``TrainConfig``: every knob of a FLARE run, with the paper's recipe as defaults.

Recipe (flare-method.md): r=8, alpha=16, dropout 0, LoRA on all linear layers, fusion add_relu at
q_proj and v_proj, lr 2e-5, global batch 32, 3 epochs, 10% linear warmup, max length 128, 8-bit
AdamW on GPUs, model selection on the (translated) validation set.

``TrainConfig.builtin()`` is the built-in default (``flare train`` with no dataset or model
arguments): the toy task and a tiny random Llama in 4-bit, with a learning rate and epoch count that
let a 2-layer, 64-wide random model learn in a few minutes on a CPU (the recipe's 2e-5 would not
move it in the few dozen steps a few hundred examples allow).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from ..data.schema import MISSING_POLICIES
from ..tasks import FAMILIES, TASKS

OPTIMIZERS = ("auto", "adamw", "adamw8bit")
DEVICES = ("auto", "cpu", "cuda")
SOURCE_SITES = ("projection_input", "residual")
EVAL_SOURCES = ("file", "parallel", "none")
# The paper's comparison (issue 13). method: what stage 2 trains; eval_mode: what the test table scores.
METHODS = ("flare", "lora", "input-fusion", "flare-mt")
EVAL_MODES = ("auto", "fused", "target", "translate-test", "zero-shot")
RECIPES = ("ours", "paper")
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
TYDIQA_STAGE1 = ("squad", "goldp-english")
XNLI_TRAIN = ("xnli-mt", "translated")
DECODER_EVALS = ("ours", "authors")
DECODER_ALIGNMENTS = ("ours", "authors")


@dataclasses.dataclass
class TrainConfig:
    # ---- what to train
    task: str = "toy"
    model: str | None = None  # hub name or local path; None = the built-in tiny Llama (toy task only)
    family: str | None = None  # "decoder" | "encoder"; None = from the model's config
    quantize: bool | None = None  # load linear layers in NF4 (default: decoders yes, encoders no)
    languages: tuple[str, ...] = ()  # target languages; () = the task's (toy: qaa, qab)
    output_dir: str = "flare-output"
    stages: tuple[str, ...] = ("stage1", "stage2")
    method: str = "flare"  # flare | lora (translate-train) | input-fusion | flare-mt (METHODS)
    eval_mode: str = "auto"  # auto: the method's own; fused | target | translate-test | zero-shot (EVAL_MODES)
    recipe: str = "ours"  # ours (these defaults) | paper (the authors' settings per family and task)
    stage1_from: str | None = None  # a finished run (output dir) whose stage-1 adapter this run reuses
    mt_model: str | None = None  # NLLB checkpoint whose encoder is FLARE MT's source (None: built-in tiny one, toy)

    # ---- data (see flare.train.datasets for how these combine)
    dataset_path: str | None = None  # local copy of the task's hub dataset (or another hub name)
    english_path: str | None = None  # local copy of the English counterpart (TyDiQA: SQuAD)
    stage1_file: str | None = None  # English rows for stage 1
    train_file: str | None = None  # stage-2 rows (target text + English source)
    eval_file: str | None = None  # validation rows (model selection)
    test_file: str | None = None  # test rows (final table)
    train_translations: str | None = None  # translation files (flare translate) attached by id
    eval_translations: str | None = None
    test_translations: str | None = None
    eval_source: str = "file"  # where eval/test rows get English: "file" (translate-test), "parallel", "none"
    missing_source: str = "error"  # rows without English: "error" or "drop" (reported either way)
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    tydiqa_stage1: str = "squad"  # TyDiQA stage-1 rows: squad | goldp-english (the authors')
    xnli_train: str = "xnli-mt"  # XNLI stage-2 rows: xnli-mt (XNLI's own MT) | translated (--train-file, the authors')
    model_selection: bool = True  # restore the best validation step (the authors: not for TyDiQA)

    # ---- adapter (flare.FlareConfig)
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    fusion: str = "add_relu"
    fusion_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lora_modules: str | tuple[str, ...] = "all-linear"
    source_site: str = "projection_input"
    cross_attention_heads: int = 1  # heads of the cross_attention fusion (divides r)
    attention_dropout: float = 0.0  # dropout on its attention probabilities (the authors: 0.1 for XLM-R)
    modules_to_save: tuple[str, ...] | None = None  # None: lm_head (decoders) / the task head (encoders)

    # ---- optimization
    learning_rate: float = 2e-5
    stage1_learning_rate: float | None = None  # None: learning_rate
    batch_size: int = 32  # global: micro_batch_size x gradient accumulation x world size
    micro_batch_size: int | None = None  # None: batch_size / world size (no accumulation)
    epochs: float = 3
    stage1_epochs: float | None = None  # None: epochs
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_length: int = 128
    seed: int = 42
    optimizer: str = "auto"  # auto: bitsandbytes 8-bit AdamW on CUDA, torch AdamW on CPU
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # None: autocast to bf16 on CUDA when supported
    compute_dtype: str | None = None  # bf16 | fp16 | fp32 of stage 2 (None: from bf16); the authors: bf16
    stage1_compute_dtype: str | None = None  # of stage 1 (None: compute_dtype); the authors: fp16
    double_quant: bool = True  # NF4 with double quantization (the authors: without)
    fp32_unquantized: bool = False  # keep the non-quantized parts (norms, embeddings) in fp32 (the authors: Gemma)
    add_pad_token: bool = False  # add a pad token with trainable embeddings (the authors: Llama)
    decoder_eval: str = "ours"  # ours (label-word logits) | authors (generate 100 tokens, exact match)
    decoder_alignment: str = "ours"  # ours (prompts aligned at their last token) | authors (each stream left-padded)

    # ---- running
    device: str = "auto"
    eval_steps: int = 0  # evaluate every N optimizer steps of stage 2 (0: at the end of each epoch)
    eval_batch_size: int = 32
    checkpoint_steps: int = 0  # checkpoint every N optimizer steps (0: at the end of each epoch)
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False  # start afresh in an output_dir that holds another run (else refuse)
    progress: bool = True
    stop_after_steps: int | None = None  # leave after N optimizer steps of this process (as if killed)

    # fields that may differ between a run and its resumption
    _RESUMABLE = ("resume", "overwrite", "progress", "stop_after_steps", "output_dir", "device")

    def __post_init__(self) -> None:
        if self.stage1_from is not None:  # absolute: a run is rescored and resumed from any directory
            self.stage1_from = os.path.abspath(self.stage1_from)
        self.languages = tuple(self.languages)
        self.stages = tuple(self.stages)
        self.fusion_modules = tuple(self.fusion_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = tuple(self.modules_to_save)
        if not isinstance(self.lora_modules, str):
            self.lora_modules = tuple(self.lora_modules)
        self.validate()

    # ------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ValueError naming the field for any bad value, before any work starts."""

        def bad(field: str, value: Any, want: str) -> None:
            raise ValueError(f"TrainConfig.{field} (--{field.replace('_', '-')}) must be {want}, got {value!r}")

        if self.task not in TASKS:
            bad("task", self.task, f"one of {sorted(TASKS)}")
        if self.family is not None and self.family not in FAMILIES:
            bad("family", self.family, f"one of {FAMILIES}")
        if (
            not self.stages
            or any(s not in ("stage1", "stage2") for s in self.stages)
            or len(set(self.stages)) != len(self.stages)
        ):
            bad("stages", self.stages, "a non-empty subset of ('stage1', 'stage2')")
        if self.model is None and self.task != "toy":
            raise ValueError(
                f"task {self.task!r} needs --model (a hub name or local path); only the built-in toy task "
                "has a built-in model"
            )
        if self.missing_source not in MISSING_POLICIES:
            bad("missing_source", self.missing_source, f"one of {MISSING_POLICIES}")
        if self.eval_source not in EVAL_SOURCES:
            bad("eval_source", self.eval_source, f"one of {EVAL_SOURCES}")
        for name, allowed in (
            ("method", METHODS),
            ("eval_mode", EVAL_MODES),
            ("recipe", RECIPES),
            ("tydiqa_stage1", TYDIQA_STAGE1),
            ("xnli_train", XNLI_TRAIN),
            ("decoder_eval", DECODER_EVALS),
            ("decoder_alignment", DECODER_ALIGNMENTS),
        ):
            if getattr(self, name) not in allowed:
                bad(name, getattr(self, name), f"one of {allowed}")
        for name in ("compute_dtype", "stage1_compute_dtype"):
            if getattr(self, name) is not None and getattr(self, name) not in COMPUTE_DTYPES:
                bad(name, getattr(self, name), f"one of {COMPUTE_DTYPES} or None")
        if self.bf16 is not None and self.compute_dtype is not None and self.bf16 != (self.compute_dtype == "bf16"):
            raise ValueError(
                f"--{'' if self.bf16 else 'no-'}bf16 contradicts --compute-dtype {self.compute_dtype}; give one of them"
            )
        if self.task == "xnli" and self.xnli_train == "translated" and "stage2" in self.stages and not self.train_file:
            raise ValueError(
                "--xnli-train translated needs --train-file: the English training set translated into the target "
                "languages (flare translate --task xnli --mode train --lang <lang> --split train --output <file>)"
            )
        if not isinstance(self.r, int) or self.r <= 0:
            bad("r", self.r, "a positive integer")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", self.lora_dropout, "in [0, 1)")
        if isinstance(self.cross_attention_heads, bool) or not isinstance(self.cross_attention_heads, int) or (
            self.cross_attention_heads <= 0
        ):
            bad("cross_attention_heads", self.cross_attention_heads, "a positive integer")
        if self.fusion == "cross_attention" and isinstance(self.r, int) and self.r % self.cross_attention_heads:
            bad("cross_attention_heads", self.cross_attention_heads, f"a divisor of r={self.r}")
        if not 0.0 <= self.attention_dropout < 1.0:
            bad("attention_dropout", self.attention_dropout, "in [0, 1)")
        if self.source_site not in SOURCE_SITES:
            bad("source_site", self.source_site, f"one of {SOURCE_SITES}")
        for name in ("learning_rate", "lora_alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                bad(name, value, "a positive number")
        for name in ("stage1_learning_rate", "stage1_epochs"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                bad(name, value, "a positive number or None")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            bad("epochs", self.epochs, "a positive number")
        if not 0.0 <= self.warmup_ratio < 1.0:
            bad("warmup_ratio", self.warmup_ratio, "in [0, 1)")
        for name in ("batch_size", "max_length", "eval_batch_size", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                bad(name, value, "a positive integer")
        if self.micro_batch_size is not None and (
            not isinstance(self.micro_batch_size, int) or self.micro_batch_size <= 0
        ):
            bad("micro_batch_size", self.micro_batch_size, "a positive integer or None")
        for name in ("eval_steps", "checkpoint_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                bad(name, value, "an integer >= 0")
        if self.stop_after_steps is not None and self.stop_after_steps <= 0:
            bad("stop_after_steps", self.stop_after_steps, "a positive integer or None")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                bad(name, value, "a positive integer or None")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            bad("max_grad_norm", self.max_grad_norm, "a positive number or None")
        if self.weight_decay < 0:
            bad("weight_decay", self.weight_decay, ">= 0")
        self.flare_config()  # the adapter settings, checked by FlareConfig itself
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        if self.device not in DEVICES:
            bad("device", self.device, f"one of {DEVICES}")
        from .methods import check_combination  # method / eval_mode / stages / stage1_from / eval_source

        check_combination(self)

    # ------------------------------------------------------------------------------ derived
    def flare_config(self, modules_to_save: tuple[str, ...] = ()):
        """The adapter's ``flare.FlareConfig`` (modules_to_save: this config's, else the given default)."""
        from ..config import FlareConfig

        return FlareConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            fusion=self.fusion,
            fusion_modules=self.fusion_modules,
            lora_modules=self.lora_modules,
            source_site=self.source_site,
            cross_attention_heads=self.cross_attention_heads,
            attention_dropout=self.attention_dropout,
            modules_to_save=self.modules_to_save if self.modules_to_save is not None else modules_to_save,
        )

    @property
    def lr_stage1(self) -> float:
        return self.stage1_learning_rate if self.stage1_learning_rate is not None else self.learning_rate

    @property
    def epochs_stage1(self) -> float:
        return self.stage1_epochs if self.stage1_epochs is not None else self.epochs

    def accumulation(self, world_size: int) -> tuple[int, int]:
        """(micro batch size, accumulation steps) for this world size; the global batch must split evenly."""
        micro = self.micro_batch_size or max(1, self.batch_size // world_size)
        per_step = micro * world_size
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size x world size = {micro} x "
                f"{world_size}; the global batch must split evenly across processes and accumulation steps"
            )
        return micro, self.batch_size // per_step

    # ------------------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a value of the wrong type (e.g. "epochs": "3" in a --config file)
            raise ValueError(f"TrainConfig: a value has the wrong type ({exc}); check the --config file") from None

    def differences(self, other: "TrainConfig") -> dict[str, tuple]:
        """Fields (other than those a resumption may change) whose values differ."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in self._RESUMABLE and _norm(a[k]) != _norm(b[k])}

    @classmethod
    def builtin(cls, **overrides) -> "TrainConfig":
        """The built-in default: toy task, tiny random Llama in 4-bit, both stages, on this CPU."""
        values = dict(BUILTIN)
        values.update(overrides)
        return cls.from_dict(values)


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


# The built-in default's departures from the recipe (why: module docstring): lr 5e-3, 6 epochs of stage 1
# (72 steps) and 5 of stage 2 (60 steps). Chosen by a sweep on the loaded 2-core development machine
# (test accuracy, seconds for the whole run): 5e-3/6/5 99.0% 23 s; 5e-3/6/4 98.4%; 3e-3/10/10 97.9% 61 s;
# 1e-2/10/10 94.3%; 5e-3/4/3 63.0%; 5e-3/3/3 36.5% (the class prior). Stage 2 needs a stage 1 that has
# learned English sentiment: the fused English stream is what it learns from first.
BUILTIN: dict[str, Any] = dict(
    task="toy",
    model=None,
    learning_rate=5e-3,
    stage1_epochs=6,
    epochs=5,
    batch_size=32,
    max_length=64,
    eval_steps=0,
    checkpoint_steps=0,
    output_dir="flare-output",
)  # no overwrite here: like every run, the built-in default refuses an output_dir holding a run (--overwrite)
