"""The paper's methods and evaluation modes: which model scores which text, with or without a source stream.

method (``--method``: what stage 2 trains)
    flare          a FLARE adapter on the target rows, their English as the source stream
    lora           translate-train LoRA: a plain LoRA adapter (fusion "none") on the target rows, no source
    input-fusion   a plain LoRA adapter on one input per row: target and English concatenated, 2 x max_length
    flare-mt       (FLARE MT: the NLLB encoder's states of the target text as the source; its branch below)

eval mode (``--eval-mode``: what the test table scores; validation in stage 2 reads the same inputs)
    fused           stage 2, using the English as the method does (flare: source stream; input-fusion: the
                    concatenation)
    target          stage 2 on the target text alone (for flare: plain-LoRA inference of a FLARE adapter, an
                    ablation)
    translate-test  stage 1 (English-trained LoRA) on the English translation of each row, no source stream
    zero-shot       stage 1 on the target text
    auto            the method's own: flare, input-fusion, flare-mt -> fused; lora -> target. A flare run with
                    --eval-source none is scored target, as it was before these modes existed.

Input-level fusion's order and separator: **target first, then English**, joined by one newline, per text
field (text and text_pair; question and context). The paper only says the two are concatenated; target first
is chosen because (1) truncation cuts the end of a field (``encode_decoder`` from the end of the longest
field, the encoder tokenizer's ``only_second``), so an input longer than 2 x max_length loses English, not the
text the labels are about; (2) QA answer offsets (``answer_start``) index the target context and stay valid
unchanged, and encoder span prediction is restricted to the target part (``answer_context_chars``), so an
extractive answer is always target-language text. A newline because the prompt templates already separate
their parts with newlines (no new token kinds), and sentencepiece encoders read it as a word boundary.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

METHOD_EVAL_MODE = {"flare": "fused", "lora": "target", "input-fusion": "fused", "flare-mt": "fused"}
STAGE1_MODES = ("translate-test", "zero-shot")  # score the stage-1 model
STAGE2_MODES = ("fused", "target")
PLAIN_LORA_METHODS = ("lora", "input-fusion")  # stage 2 trains an adapter with fusion "none"
SEPARATOR = "\n"  # between target and English in input-level fusion (why: module docstring)
# Encoder QA under input-level fusion: answers are spans of the first this-many context characters (the target)
ANSWER_CONTEXT_CHARS = "answer_context_chars"


def resolve_eval_mode(method: str, eval_mode: str, eval_source: str = "file") -> str:
    """The eval mode a run scores with: ``auto`` replaced by the method's own."""
    if eval_mode != "auto":
        return eval_mode
    if method == "flare" and eval_source == "none":  # plain-LoRA inference of a FLARE adapter, as before
        return "target"
    return METHOD_EVAL_MODE[method]


def uses_english(method: str, mode: str) -> bool:
    """Whether rows scored in this mode must carry their English (source_* fields)."""
    if mode == "translate-test":
        return True
    if mode == "fused":
        return method in ("flare", "input-fusion")  # flare-mt's source is the target text itself
    return False


def trains_on_english(method: str) -> bool:
    """Whether stage-2 training rows must carry their English (flare-mt reads the target text only)."""
    return method in ("flare", "input-fusion")


def check_combination(cfg) -> None:
    """Cross-field checks of method / eval_mode / stages / stage1_from / eval_source (one line each).
    Called by ``TrainConfig.validate``."""
    mode = resolve_eval_mode(cfg.method, cfg.eval_mode, cfg.eval_source)
    if mode in STAGE1_MODES and tuple(cfg.stages) != ("stage1",):
        raise ValueError(
            f"--eval-mode {mode} scores the stage-1 model: pass --stages stage1 (and --stage1-from RUN_DIR to "
            "reuse a finished stage 1 instead of training one)"
        )
    if cfg.eval_mode in STAGE2_MODES and "stage2" not in cfg.stages:
        raise ValueError(
            f"--eval-mode {cfg.eval_mode} scores the stage-2 adapter, which --stages {','.join(cfg.stages)} does not "
            "train; a stage-1 run is scored with --eval-mode zero-shot or translate-test"
        )
    check_method_mode(cfg.method, mode)
    scores = "stage2" in cfg.stages or mode in STAGE1_MODES
    if cfg.eval_source == "none" and uses_english(cfg.method, mode) and scores:
        why = "--eval-mode " + (cfg.eval_mode if cfg.eval_mode != "auto" else f"auto (= {mode} for {cfg.method})")
        raise ValueError(
            f"{why} reads the English of the validation/test rows, but --eval-source none drops it: pass "
            "--eval-source file (translations) or parallel, or --eval-mode target"
        )
    if cfg.stage1_from is not None and "stage1" not in cfg.stages:
        raise ValueError(
            "--stage1-from reuses another run's stage 1 in place of this run's: --stages must include stage1"
        )


def check_method_mode(method: str, mode: str) -> None:
    """Refuse (one line) an eval mode the method cannot be scored in: training a run, rescoring one,
    building its evaluation inputs."""
    if mode == "fused" and method == "lora":
        raise ValueError(
            "--eval-mode fused: --method lora trains without English, so there is nothing to fuse; use --eval-mode "
            "target (its own) or a method that uses the English (flare, input-fusion, flare-mt)"
        )
    # A FLARE MT model computes its source from the target text on every call (FlareModel.forward), so
    # "target" would still fuse; the adapter without its source is not a mode evaluation offers.
    if method == "flare-mt" and mode == "target":
        raise ValueError(
            "--eval-mode target: a flare-mt model fuses the NLLB states of the target text itself, so its own mode "
            "(auto / fused) already reads the target text only; target (the adapter without a source) is not offered"
        )


def stage2_fusion(method: str, fusion: str) -> str:
    """The stage-2 adapter's fusion function: plain LoRA ("none") for the baselines, else the configured one."""
    return "none" if method in PLAIN_LORA_METHODS else fusion


def input_length(method: str, max_length: int) -> int:
    """The longest input a run feeds the model (input-level fusion: two texts, the paper's double length)."""
    return 2 * max_length if method == "input-fusion" else max_length


# ------------------------------------------------------------------------------------- row transforms
def _fields(task) -> tuple[str, ...]:
    return ("text", "text_pair") if task.kind == "classification" else ("question", "context")


def _without_source(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("source_")}


def target_only(row: dict, task) -> dict:
    """The row as the target stream alone reads it (no English)."""
    return _without_source(row)


def english_only(row: dict, task) -> dict:
    """Translate-test: the row's English in place of its target text, no source fields. QA answers stay the row's
    own (not translated back): the prediction, read from the English, is scored against them."""
    out = _without_source(row)
    for name in _fields(task):
        if row.get(name) is not None or row.get("source_" + name) is not None:
            out[name] = _required(row, "source_" + name, "translate-test")
    return out


def concatenated(row: dict, task) -> dict:
    """Input-level fusion: each text field is target + SEPARATOR + English; no source fields. Encoder QA answers
    keep their offsets (the target context comes first) and are restricted to it."""
    out = _without_source(row)
    for name in _fields(task):
        if row.get(name) is None:  # a single-sentence row of a pair task
            continue
        out[name] = row[name] + SEPARATOR + _required(row, "source_" + name, "input-fusion")
    if task.kind == "qa":
        out[ANSWER_CONTEXT_CHARS] = len(row["context"])
    return out


def _required(row: dict, field: str, what: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise ValueError(f"{what}: row {row.get('id')!r} has no {field} (its English); translate it first")
    return value


# ------------------------------------------------------------------------------------- inputs of a run
@dataclasses.dataclass(frozen=True)
class Inputs:
    """How rows become model inputs in one mode: a row transform, whether the source stream runs, the length."""

    mode: str  # "train" (stage 2) or an eval mode
    use_source: bool
    max_length: int
    transform: object = None  # (row, task) -> row, or None: the rows as they are

    def rows(self, rows: Sequence[dict], task) -> list[dict]:
        return list(rows) if self.transform is None else [self.transform(r, task) for r in rows]

    def rows_by_lang(self, rows_by_lang: dict[str, list[dict]], task) -> dict[str, list[dict]]:
        return {lang: self.rows(rows, task) for lang, rows in rows_by_lang.items()}


def stage2_inputs(method: str, max_length: int) -> Inputs:
    """What stage 2 trains on."""
    if method == "flare":
        return Inputs("train", use_source=True, max_length=max_length)
    if method == "lora":
        return Inputs("train", use_source=False, max_length=max_length, transform=target_only)
    if method == "input-fusion":
        return Inputs("train", use_source=False, max_length=2 * max_length, transform=concatenated)
    # flare-mt: the target rows alone; the model's MT source encodes their text (flare.train.mt)
    return Inputs("train", use_source=False, max_length=max_length, transform=target_only)


def eval_inputs(method: str, mode: str, max_length: int) -> Inputs:
    """What evaluation in ``mode`` (resolved, not auto) reads, for a run of ``method``."""
    if mode == "zero-shot":
        return Inputs(mode, use_source=False, max_length=max_length, transform=target_only)
    if mode == "translate-test":
        return Inputs(mode, use_source=False, max_length=max_length, transform=english_only)
    if mode == "target":
        return Inputs(mode, use_source=False, max_length=max_length, transform=target_only)
    if mode != "fused":
        raise ValueError(f"unknown eval mode {mode!r}")
    if method == "flare":
        return Inputs(mode, use_source=True, max_length=max_length)
    if method == "input-fusion":
        return Inputs(mode, use_source=False, max_length=2 * max_length, transform=concatenated)
    check_method_mode(method, mode)
    # flare-mt: the target rows alone; evaluation finds the model's MT source (flare.train.mt.featurizer_for)
    return Inputs(mode, use_source=False, max_length=max_length, transform=target_only)


def check_rescoring(cfg, mode: str, run_dir) -> None:
    """``flare eval --eval-mode``: refuse (one line) a mode that the run ``cfg`` cannot be scored in."""
    if mode in STAGE1_MODES and "stage1" not in cfg.stages:
        raise ValueError(
            f"--eval-mode {mode} scores a run's stage 1, and {run_dir} trained none (its --stages are "
            f"{','.join(cfg.stages)})"
        )
    if mode in STAGE2_MODES and "stage2" not in cfg.stages:
        raise ValueError(
            f"--eval-mode {mode} scores a stage-2 adapter, and {run_dir} trained stage 1 only: score it with "
            "--eval-mode zero-shot or translate-test"
        )
    check_method_mode(cfg.method, mode)
