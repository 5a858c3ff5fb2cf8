"""Recipes: named sets of TrainConfig values, resolved per model family and task.

``ours`` (the default) changes nothing: TrainConfig's own defaults are the recipe of this package.
``paper`` is the authors' setup as read from their scripts (pnborchert/FLARE; flare-method.md):

=================  =======================================================================================
all models         r 8, alpha 16, dropout 0, lr 2e-5 (both stages), batch 32, 3 epochs (both stages),
                   10% warmup, max length 128
xlm-roberta        LoRA on query and value only, the task head trained in full, unquantized,
                   cross-attention fusion's attention dropout 0.1
llama              LoRA on all linear layers, lm_head and embed_tokens trained in full, a pad token added
gemma2             LoRA on all linear layers, the tied lm_head / embed_tokens trained in full (one copy),
                   the non-quantized parts (norms, embeddings) kept in fp32
llama, gemma2      4-bit NF4 without double quantization, fp16 compute in stage 1, bf16 in stage 2
tydiqa             stage 1 on TyDiQA-GoldP's English rows (not SQuAD), no validation-based model selection
xnli               stage 2 on the NLLB translation of the English training set (--train-file from
                   ``flare translate --task xnli --mode train``), tested translate-test (the default)
=================  =======================================================================================

What a recipe does not set: the scoring and alignment of decoders (``decoder_eval``,
``decoder_alignment``) and the source site stay ours, so a run with ``--recipe paper`` measures the
authors' setup under our fixes; ask for the authors' variants with their options. (Their three code
defects, flare-method.md, are never reproduced.)

Precedence: an option the user gave wins over the recipe. On the command line "given" means on the
command line or in ``--config`` (``flare train`` knows which). From Python, ``resolve(cfg)`` without
``explicit`` counts as given every field whose value differs from the default a fresh config would
have (``TrainConfig()``'s, or ``TrainConfig.builtin()``'s for the built-in toy run): to keep a default
value against the recipe, pass ``explicit={"field", ...}``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from .train.config import BUILTIN, TrainConfig

# The authors' values common to every model (flare-method.md, "Training recipe").
_COMMON = dict(
    r=8,
    lora_alpha=16,
    lora_dropout=0.0,
    learning_rate=2e-5,
    stage1_learning_rate=None,  # the same in both stages
    batch_size=32,
    epochs=3,
    stage1_epochs=None,
    warmup_ratio=0.1,
    max_length=128,
)

# Per model type (config.model_type). The LLMs: QLoRA without double quantization, stage 1 in fp16, stage 2 in bf16.
_QLORA = dict(quantize=True, double_quant=False, stage1_compute_dtype="fp16", compute_dtype="bf16")
_FAMILIES: dict[str, dict] = {
    "xlm-roberta": dict(
        lora_modules=("query", "value"),
        fusion_modules=("query", "value"),
        modules_to_save=None,  # None: the task head (classifier / qa_outputs)
        quantize=False,
        attention_dropout=0.1,
    ),
    "llama": dict(_QLORA, lora_modules="all-linear", modules_to_save=("lm_head", "embed_tokens"), add_pad_token=True),
    # Gemma 2 ties lm_head to embed_tokens: training both keeps them one tensor (flare.train.modeling.tie_trained_copies).
    "gemma2": dict(_QLORA, lora_modules="all-linear", modules_to_save=("lm_head", "embed_tokens"), fp32_unquantized=True),
}
_TASKS: dict[str, dict] = {
    "tydiqa": dict(tydiqa_stage1="goldp-english", model_selection=False),
    "xnli": dict(xnli_train="translated"),
}
RECIPE_MODEL_TYPES = tuple(_FAMILIES)


@dataclasses.dataclass
class Resolution:
    """A config after its recipe: ``config`` (what the run uses and run_config.json stores), ``origin`` of
    each field ("given", "recipe", "built-in" or "default"), and ``notes`` (one line each: what did not apply)."""

    config: TrainConfig
    origin: dict[str, str]
    notes: list[str]
    model_type: str | None

    def table(self) -> str:
        """Every field, its resolved value and where it came from (``flare train --dry-run``)."""
        from .cli import _show

        rows = [(name, _show(getattr(self.config, name)), self.origin[name]) for name in self.origin]
        width = max(len(r[0]) for r in rows)
        vwidth = min(40, max(len(r[1]) for r in rows))
        model = f", model type {self.model_type}" if self.model_type else ""  # read for --recipe paper only
        head = f"recipe {self.config.recipe}{model}, task {self.config.task}"
        lines = [head] + [f"  {n.ljust(width)}  {v.ljust(vwidth)}  {o}" for n, v, o in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def recipe_values(recipe: str, model_type: str | None, task: str) -> tuple[dict, list[str]]:
    """(field -> value, notes) of ``recipe`` for a model type and task; {} for ``ours``."""
    if recipe == "ours":
        return {}, []
    if recipe != "paper":
        raise ValueError(f"--recipe must be one of ('ours', 'paper'), got {recipe!r}")
    values, notes = dict(_COMMON), []
    if model_type in _FAMILIES:
        values.update(_FAMILIES[model_type])
    else:
        notes.append(
            f"--recipe paper has no entry for model type {model_type!r} (the authors ran "
            f"{', '.join(RECIPE_MODEL_TYPES)}): only its settings common to every model apply"
        )
    values.update(_TASKS.get(task, {}))
    return values, notes


def _baseline(cfg: TrainConfig) -> dict:
    """The values a config has when nobody set anything: TrainConfig's defaults, BUILTIN's for the built-in run."""
    base = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    if cfg.model is None and cfg.task == "toy":
        base.update(BUILTIN)
    return base


def model_type_of(cfg: TrainConfig) -> str | None:
    """config.model_type of the run's model (the built-in tiny Llama for model None), read from its config only."""
    if cfg.model is None:
        return "llama"
    from .train.modeling import model_config

    return getattr(model_config(cfg.model), "model_type", None)


def resolve(cfg: TrainConfig, explicit: Iterable[str] | None = None, *, model_type: str | None = None) -> Resolution:
    """Apply ``cfg.recipe`` to the fields not given (module docstring); the result is validated again.

    model_type: the model's config.model_type (None: read from ``cfg.model``'s config.json; no weights are read).
    """
    base = _baseline(cfg)
    current = cfg.to_dict()
    if explicit is None:
        given = {k for k, v in current.items() if not _same(v, base[k])}
    else:
        given = set(explicit)
    if cfg.recipe == "ours":
        return Resolution(cfg, _origins(cfg, given), [], model_type)
    if model_type is None:
        model_type = model_type_of(cfg)
    values, notes = recipe_values(cfg.recipe, model_type, cfg.task)
    if "bf16" in given:  # --bf16 / --no-bf16 chooses stage 2's compute dtype itself
        if "compute_dtype" in values:
            notes.append("--bf16 given: the recipe's compute dtype (bf16 in stage 2) is not applied")
        values.pop("compute_dtype", None)
    applied = {k: v for k, v in values.items() if k not in given}
    overruled = sorted(k for k in values if k in given and not _same(values[k], current[k]))
    if overruled:
        notes.append(f"given options win over the recipe: {', '.join(overruled)}")
    try:
        resolved = dataclasses.replace(cfg, **applied)
    except ValueError as exc:
        raise ValueError(f"--recipe {cfg.recipe}: {exc}") from None
    origin = _origins(cfg, given)
    origin.update({k: "recipe" for k in applied})
    return Resolution(resolved, origin, notes, model_type)


def _origins(cfg: TrainConfig, given: set[str]) -> dict[str, str]:
    builtin = cfg.model is None and cfg.task == "toy"
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in given:
            out[f.name] = "given"
        elif builtin and f.name in BUILTIN and BUILTIN[f.name] != f.default:
            out[f.name] = "built-in"
        else:
            out[f.name] = "default"
    return out


def _same(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return norm(a) == norm(b)
