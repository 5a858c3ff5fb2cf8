"""``flare``: command line of the FLARE method.

    flare train                          the built-in default: toy task, tiny random Llama in 4-bit, CPU, minutes
    flare train --task xnli --model meta-llama/Llama-3.1-8B --languages sw,ur --test-translations ...
    flare eval --run-dir flare-output    per-language table on screen, JSON on disk
    flare translate --task xnli --mode test --lang sw --split test --output sw-test.jsonl
    flare reproduce --spec spec.json     the paper's table: every (task, model, method, seed) cell, resumable

Every ``flare train`` option is a ``flare.train.TrainConfig`` field (``--learning-rate`` ->
``learning_rate``); ``--config run.json`` reads a JSON file of fields first. Lists are comma-separated.
Exit codes: 0 done, 2 bad arguments or input (one line; ``--debug`` shows the traceback), 3 stopped early with
a checkpoint (continue with --resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import types
import typing
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3

_HELP = {
    "task": "the benchmark task (toy: the built-in sample)",
    "model": "hub name or local path of the model (none: the built-in tiny Llama, toy task only)",
    "family": "model family (none: from the model's config)",
    "quantize": "load the linear layers in 4-bit NF4 (none: decoders yes, encoders no)",
    "languages": "target languages, comma-separated; each must have rows (none: the task's, toy: qaa,qab)",
    "output_dir": "where checkpoints, adapters, results, the log and the curves go; must not hold another run",
    "stages": "comma-separated: stage1 (LoRA on English, merged), stage2 (FLARE on the target languages)",
    "method": "what stage 2 trains: flare | lora (translate-train) | input-fusion (English + target concatenated) "
    "| flare-mt (NLLB encoder states as the source)",
    "eval_mode": "what the test table scores: auto (the method's) | fused | target | translate-test | zero-shot",
    "recipe": "ours (these defaults) | paper (the authors' settings for the model family and task)",
    "stage1_from": "output dir of a run whose finished stage 1 this run reuses instead of training its own",
    "mt_model": "NLLB checkpoint whose encoder gives flare-mt its source (none: a built-in tiny one, toy task only)",
    "tydiqa_stage1": "TyDiQA stage-1 rows: squad | goldp-english (the authors')",
    "xnli_train": "XNLI stage-2 rows: xnli-mt (XNLI's own translations) | translated (--train-file, the authors')",
    "model_selection": "restore the stage-2 step with the best validation score",
    "compute_dtype": "compute dtype of stage 2: bf16 | fp16 | fp32 (none: from --bf16)",
    "stage1_compute_dtype": "compute dtype of stage 1 (none: --compute-dtype)",
    "double_quant": "NF4 with double quantization of the absmax",
    "fp32_unquantized": "keep the parts that are not quantized (norms, embeddings) in fp32",
    "add_pad_token": "add a pad token whose embeddings train (decoders)",
    "decoder_eval": "decoder scoring: ours (label-word logits) | authors (generation, exact match)",
    "decoder_alignment": "decoder stream alignment: ours (prompts aligned at their last token) | authors",
    "dataset_path": "local copy of the task's hub dataset (or another hub name)",
    "english_path": "local copy of the English counterpart (SQuAD for TyDiQA)",
    "stage1_file": "English rows for stage 1 (jsonl/json/csv/tsv/parquet) instead of the task's",
    "train_file": "stage-2 rows (target text + English source_* fields) instead of the task's",
    "eval_file": "validation rows (model selection) instead of the task's",
    "test_file": "test rows (the final table) instead of the task's",
    "train_translations": "translation file (flare translate) attached to the training rows by id",
    "eval_translations": "translation file attached to the validation rows by id",
    "test_translations": "translation file attached to the test rows by id",
    "eval_source": "English side of validation/test rows: file (translate-test) | parallel | none",
    "missing_source": "rows without English translation: error | drop (reported either way)",
    "max_train_examples": "use at most N training rows per stage, taken in turn from each language (none: all)",
    "max_eval_examples": "use at most N validation/test rows per language (none: all)",
    "r": "LoRA rank",
    "lora_alpha": "LoRA alpha (scaling = alpha / r)",
    "lora_dropout": "dropout on the LoRA input, in [0, 1)",
    "fusion": "how the English representation is fused in the rank-r bottleneck (none: plain LoRA)",
    "fusion_modules": "projections that fuse (comma-separated module names)",
    "lora_modules": "projections with LoRA: all-linear or comma-separated module names",
    "cross_attention_heads": "heads of the cross_attention fusion; must divide r",
    "attention_dropout": "dropout on the cross_attention fusion's attention probabilities, in [0, 1)",
    "source_site": "where the English stream enters: projection_input | residual (the paper's variant)",
    "modules_to_save": "modules trained in full, comma-separated (none: lm_head / the task head)",
    "learning_rate": "peak learning rate of stage 2 (and stage 1 unless --stage1-learning-rate)",
    "stage1_learning_rate": "peak learning rate of stage 1 (none: --learning-rate)",
    "batch_size": "global batch: micro batch x accumulation steps x processes",
    "micro_batch_size": "rows per forward pass per process (none: batch_size / processes)",
    "epochs": "epochs of stage 2 (and stage 1 unless --stage1-epochs); fractions allowed",
    "stage1_epochs": "epochs of stage 1 (none: --epochs)",
    "warmup_ratio": "fraction of the steps with linear warmup, in [0, 1)",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm (none: no clipping)",
    "max_length": "tokens per row (prompt + answer); longer texts are truncated",
    "seed": "seed of the adapter initialization, the data order and dropout",
    "optimizer": "auto: 8-bit AdamW on CUDA, AdamW on CPU",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory, more time)",
    "bf16": "bf16 autocast (none: on with CUDA when supported)",
    "device": "auto: CUDA when available (or the LOCAL_RANK's GPU under torchrun), else CPU",
    "eval_steps": "evaluate every N steps of stage 2 (0: each epoch)",
    "eval_batch_size": "rows per forward pass when evaluating",
    "checkpoint_steps": "checkpoint every N steps (0: each epoch)",
    "keep_checkpoints": "checkpoints kept per stage (older ones are deleted)",
    "resume": "continue the run in --output-dir from its last checkpoint",
    "overwrite": "replace the run in --output-dir (its files only) instead of refusing",
    "progress": "progress bars (--no-progress: one line per epoch instead)",
    "stop_after_steps": "leave after N optimizer steps with a checkpoint (resume later with --resume)",
}


def _choices() -> dict[str, tuple[str, ...]]:
    from flare_kernels import FUSIONS

    from .data.schema import MISSING_POLICIES
    from .tasks import FAMILIES, TASKS
    from .train.config import (
        COMPUTE_DTYPES,
        DECODER_ALIGNMENTS,
        DECODER_EVALS,
        DEVICES,
        EVAL_MODES,
        EVAL_SOURCES,
        METHODS,
        OPTIMIZERS,
        RECIPES,
        SOURCE_SITES,
        TYDIQA_STAGE1,
        XNLI_TRAIN,
    )

    return {
        "method": METHODS,
        "eval_mode": EVAL_MODES,
        "recipe": RECIPES,
        "tydiqa_stage1": TYDIQA_STAGE1,
        "xnli_train": XNLI_TRAIN,
        "compute_dtype": COMPUTE_DTYPES,
        "stage1_compute_dtype": COMPUTE_DTYPES,
        "decoder_eval": DECODER_EVALS,
        "decoder_alignment": DECODER_ALIGNMENTS,
        "task": tuple(TASKS),
        "family": FAMILIES,
        "fusion": tuple(FUSIONS),
        "optimizer": OPTIMIZERS,
        "device": DEVICES,
        "eval_source": EVAL_SOURCES,
        "missing_source": MISSING_POLICIES,
        "source_site": SOURCE_SITES,
    }


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ",".join(value) if value else "none"
    return str(value)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else args
    return tp


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train.config import BUILTIN, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    choices = _choices()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        tp = _unwrap_optional(hints[field.name])
        default = f"default: {_show(field.default)}"
        if field.name in BUILTIN and BUILTIN[field.name] != field.default and field.name != "model":
            default += f"; built-in default: {_show(BUILTIN[field.name])}"
        text = _HELP[field.name] + f" ({default})"
        kwargs = {"dest": field.name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if field.name in choices:
            kwargs["choices"] = choices[field.name]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif tp is int:
            parser.add_argument(flag, type=int, metavar="N", **kwargs)
        elif tp is float:
            parser.add_argument(flag, type=float, metavar="X", **kwargs)
        elif tp is str:
            parser.add_argument(flag, type=str, **kwargs)
        else:  # tuples (and "all-linear" | tuple)
            parser.add_argument(flag, type=str, metavar="A,B", **kwargs)


def _train_config(args: argparse.Namespace):
    from .train.config import TrainConfig

    skip = ("command", "config", "func", "verbose", "debug", "distributed", "dry_run")
    given = {k: v for k, v in vars(args).items() if k not in skip}
    for name in ("languages", "stages", "fusion_modules", "modules_to_save"):
        if name in given:
            given[name] = _parse_list(given[name])
    if "lora_modules" in given and given["lora_modules"] != "all-linear":
        given["lora_modules"] = _parse_list(given["lora_modules"])
    values: dict = {}
    if args.config:
        try:
            loaded = json.loads(Path(args.config).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {args.config}: line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object of TrainConfig fields")
        values.update(loaded)
    values.update(given)
    builtin = values.get("model") is None and values.get("task", "toy") == "toy"
    return TrainConfig.builtin(**values) if builtin else TrainConfig.from_dict(values), builtin


def _given_fields(args: argparse.Namespace) -> set[str]:
    """The TrainConfig fields the user gave (on the command line or in --config): they win over --recipe."""
    from .train.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k for k in vars(args) if k in names}
    if args.config:
        given |= set(json.loads(Path(args.config).read_text())) & names  # parsed (and checked) by _train_config
    return given


# ------------------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    cfg, builtin = _train_config(args)
    if args.dry_run:  # the resolved settings, and where each came from; nothing is trained or written
        from .recipes import resolve

        print(resolve(cfg, _given_fields(args)).table())
        return 0
    if args.distributed is not None:  # read by flare.train.distributed.init_distributed in every process
        os.environ["FLARE_DISTRIBUTED"] = args.distributed
    if builtin:
        import torch

        # The tiny model's matmuls are ~64 wide: a second OpenMP thread costs more in fork/join than it
        # saves (measured 0.14 ms vs 1.35 ms per 600x64x64 linear on a loaded 2-core machine).
        torch.set_num_threads(1)
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"flare train: built-in default (toy task, tiny random Llama in 4-bit) -> {cfg.output_dir}",
                file=sys.stderr,
            )
    from .train import train
    from .train.loop import TrainingStopped

    t0 = time.perf_counter()
    try:
        result = train(cfg, explicit=_given_fields(args))
    except TrainingStopped as stop:
        print(f"flare train: {stop}", file=sys.stderr)
        return EXIT_STOPPED
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch, rank 0 reports
        return 0
    for name, stage in result.stages.items():
        reused = cfg.stage1_from if name == "stage1" else None
        print(stage_summary(name, stage, reused_from=reused))
    if result.test is not None:
        print()
        print(result.test.table())
        print()
    print(f"adapter: {result.adapter}")
    print(f"results: {result.output_dir / 'results.json'}  ({time.perf_counter() - t0:.1f} s in all)")
    return 0


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def stage_summary(name: str, stage, reused_from: str | None = None) -> str:
    """One line per stage, counting the work of this process (a resumed run ran only the steps after its
    checkpoint; a stage finished by an earlier process, or reused from another run, is said to be so)."""
    curve = [h["loss"] for h in stage.history]
    loss = f"loss {curve[0]:.4f} -> {curve[-1]:.4f}" if curve else "no steps"
    if reused_from is not None:
        return f"{name}: {_steps(stage.steps)}, reused from --stage1-from {reused_from} ({loss})"
    if stage.from_earlier_run:
        return f"{name}: {_steps(stage.steps)}, finished by an earlier run ({loss})"
    ran = stage.steps - stage.start_step
    resumed = f" (resumed at step {stage.start_step}; {_steps(stage.steps)} in all)" if stage.start_step else ""
    return (
        f"{name}: {_steps(ran)} in {stage.seconds:.1f} s{resumed}, {loss}, {stage.tokens_per_second:,.0f} tokens/s, "
        f"peak memory {stage.peak_memory_gib:.2f} GiB"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, write_result
    from .train.inputs import load_eval_rows
    from .train.loop import autocast_factory
    from .train.methods import STAGE1_MODES, check_rescoring, eval_inputs, resolve_eval_mode, uses_english
    from .train.restore import eval_device, load_run_model, read_run_config, run_adapter, run_status
    from .train.runner import check_output_dir
    from .train.stage1_reuse import stage1_dir

    run_dir = Path(args.run_dir)
    run_cfg = read_run_config(run_dir)  # not a run: one line, before anything else
    eval_source = args.eval_source or run_cfg.eval_source
    mode = resolve_eval_mode(run_cfg.method, args.eval_mode or run_cfg.eval_mode, eval_source)
    check_rescoring(run_cfg, mode, run_dir)
    scoring = eval_inputs(run_cfg.method, mode, run_cfg.max_length)  # flare-mt not yet wired: one line
    if eval_source == "none" and uses_english(run_cfg.method, mode):
        raise ValueError(f"--eval-mode {mode} reads the English of the rows, which --eval-source none drops")
    stage = "stage1" if mode in STAGE1_MODES else "stage2"
    if stage == "stage1" and args.adapter:
        raise ValueError(f"--adapter names a stage-2 adapter; --eval-mode {mode} scores the run's stage 1")
    suffix = f"-{args.eval_mode}" if args.eval_mode else ""
    output = Path(args.output or run_dir / f"eval-{args.split}{suffix}.json")
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a folder; give a file name")
    check_output_dir(output.parent, "--output")  # a read-only run fails now, not after scoring everything
    if stage == "stage1":
        adapter, unfinished = stage1_dir(run_dir, run_cfg) / "adapter", None
    else:
        adapter = Path(args.adapter) if args.adapter else run_adapter(run_dir)
        unfinished = run_status(run_dir)
    if unfinished:
        print(f"flare eval: warning: {unfinished}", file=sys.stderr)
    model, tokenizer, family, cfg, task = load_run_model(run_dir, adapter=adapter, device=args.device, stage=stage)
    if cfg.model is None:
        import torch

        torch.set_num_threads(1)  # the built-in tiny model: see cmd_train
    overrides = {
        k: getattr(args, k)
        for k in (
            "test_file",
            "test_translations",
            "eval_file",
            "eval_translations",
            "eval_source",
            "max_eval_examples",
            "missing_source",
        )
        if getattr(args, k) is not None
    }
    if args.languages:
        overrides["languages"] = _parse_list(args.languages)
    cfg = dataclasses.replace(cfg, **overrides)
    rows = scoring.rows_by_lang(load_eval_rows(cfg, task, args.split, mode=mode), task)
    device = eval_device(model)
    result = evaluate(
        model,
        task,
        tokenizer,
        family,
        rows,
        split=args.split,
        max_length=scoring.max_length,
        batch_size=args.batch_size or cfg.eval_batch_size,
        use_source=scoring.use_source,
        device=device,
        autocast=autocast_factory(cfg, device, stage),
        progress=True,
        alignment=cfg.decoder_alignment,  # scored as the run was trained and scored
        scoring=cfg.decoder_eval,
    )
    result.method, result.eval_mode = cfg.method, mode
    print(result.table())
    write_result(result, output, run_dir=str(run_dir), adapter=str(adapter), finished=not unfinished)
    print(f"wrote {output}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from .data.files import read_rows
    from .tasks import get_task
    from .translate import Translator, nllb_code, translate_test_rows, translate_to_file, translate_train_rows

    from .train.modeling import check_model_path

    task = get_task(args.task)
    check_model_path(args.model)  # a missing local model fails now, not after reading the rows
    # Language codes first: a bad --lang fails in a moment, not after loading a multi-GB MT model.
    lang_code = nllb_code(args.lang, args.lang_code)
    english = nllb_code("en", args.english_code)
    if args.input:
        rows = read_rows(
            args.input, task.kind, lang=args.lang if args.mode == "test" else "en", label_names=task.labels or None
        )
    else:
        rows = _hub_rows_for_translation(task, args)
    if args.limit:
        rows = rows[: args.limit]
    if not rows:
        raise ValueError("nothing to translate: no input rows")
    translator = Translator.from_pretrained(
        args.model, device=args.device, batch_size=args.batch_size, max_length=args.max_length, num_beams=args.num_beams
    )
    if args.mode == "test":

        def chunk(part):
            return translate_test_rows(part, task.kind, translator, lang_code, english)
    else:

        def chunk(part):
            return translate_train_rows(part, task.kind, translator, args.lang, lang_code, english)

    report = translate_to_file(rows, args.output, chunk, chunk_size=args.chunk_size, resume=args.resume)
    print(report.message())
    if translator.truncated_segments:  # warned once when first seen; the run's total goes with the result
        print(
            f"warning: {translator.truncated_segments} segments were longer than --max-length {args.max_length} "
            "tokens with no sentence break and were truncated before translation",
            file=sys.stderr,
        )
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import ReproduceStopped, builtin_spec, load_spec, reproduce

    spec = load_spec(args.spec) if args.spec else builtin_spec()
    if all(m.model is None for m in spec.models):
        import torch

        torch.set_num_threads(1)  # the built-in tiny model only: see cmd_train
    try:
        summary = reproduce(spec, args.output_dir, dry_run=args.dry_run, overwrite=args.overwrite)
    except ReproduceStopped as stop:
        print(f"flare reproduce: {stop}", file=sys.stderr)
        return EXIT_STOPPED
    if not args.dry_run:
        table = summary.output_dir / "table.md"
        print()
        print(table.read_text(encoding="utf-8"))
        print("wrote " + ", ".join(str(f) for f in summary.files))
    return 0


def _hub_rows_for_translation(task, args) -> list[dict]:
    from .data import hub

    if task.name == "toy":
        raise ValueError("the toy task ships its English column; nothing to translate")
    split = args.split
    if args.mode == "test":
        if task.name == "xnli":
            return hub.load_xnli(args.lang, split, path=args.dataset_path or hub.XNLI_HUB)
        if task.name == "nusax":
            return hub.load_nusax(args.lang, split, path=args.dataset_path or hub.NUSAX_HUB)
        return hub.load_tydiqa(args.lang, split, path=args.dataset_path or hub.TYDIQA_HUB)
    if task.name == "xnli":
        return hub.load_xnli("en", split, path=args.dataset_path or hub.XNLI_HUB)
    if task.name == "nusax":
        return hub.load_nusax(hub.NUSAX_ENGLISH, split, path=args.dataset_path or hub.NUSAX_HUB)
    return hub.load_squad(split, path=args.dataset_path or hub.SQUAD_HUB)


# ------------------------------------------------------------------------------------- parser
def _common(parser: argparse.ArgumentParser) -> None:
    # after the command too (`flare train --debug`); SUPPRESS keeps a value given before the command
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flare",
        description="FLARE cross-lingual fine-tuning (QLoRA + language fusion). Exit codes: 0 done, 2 bad "
        "arguments or input (one line on stderr; --debug shows the traceback), 3 stopped early with a "
        "checkpoint (continue with flare train --resume; flare reproduce: run it again).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,translate,reproduce}")

    p = sub.add_parser(
        "train",
        help="stage 1 + stage 2 training, then the test table (no options: built-in default)",
        description="Train with FLARE: stage 1 (LoRA on English, merged into the 4-bit base), stage 2 (FLARE "
        "on the target languages, the English rows as source), then the per-language test table. Without "
        "--model this runs the built-in default (toy task, tiny random Llama in 4-bit, a few minutes on a CPU). "
        "The output folder gets run_config.json, the adapters, results.json, train.log and curves.png; it must "
        "not hold another run (--resume continues one, --overwrite replaces it).",
    )
    p.add_argument("--config", help="JSON file of TrainConfig fields (command-line options override it)")
    p.add_argument(
        "--dry-run", action="store_true", default=False,
        help="print the resolved settings (after --recipe; each marked given, recipe, built-in or default) and exit "
        "without training or writing anything",
    )  # fmt: skip
    p.add_argument(
        "--distributed", choices=("ddp", "fsdp"), default=None,
        help="under torchrun / accelerate launch: ddp replicates the model on every process; fsdp shards its "
        "frozen (4-bit) weights across them, for models one device cannot hold (default: ddp, or fsdp when "
        "accelerate launch runs with an FSDP config)",
    )  # fmt: skip
    _add_train_arguments(p)
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate a trained run: per-language table and JSON",
        description="Score a run of flare train (its stage-2 adapter over the stage-1-merged base; with --eval-mode "
        "zero-shot or translate-test its stage-1 model) on the validation or test rows: a per-language table on screen, the same as JSON on disk. A run that did not "
        "finish is scored with a warning. Data options default to the run's own settings.",
    )
    p.add_argument("--run-dir", default="flare-output", help="output folder of flare train (default: flare-output)")
    p.add_argument("--adapter", help="stage-2 adapter folder (default: the run's stage2/best, else stage2/adapter)")
    from .train.config import EVAL_MODES

    p.add_argument(
        "--eval-mode", choices=EVAL_MODES, default=None,
        help="score the run in another mode: fused | target (its stage-2 adapter; target: no English) | "
        "translate-test | zero-shot (its stage-1 model) | auto (the method's own) (default: the run's; the JSON then "
        "goes to eval-<split>-<mode>.json)",
    )  # fmt: skip
    p.add_argument("--split", choices=("validation", "test"), default="test", help="rows to score (default: test)")
    p.add_argument("--languages", help="comma-separated subset of languages (default: the run's)")
    for name, what in (
        ("test_file", "test rows file"),
        ("test_translations", "translation file attached to the test rows by id"),
        ("eval_file", "validation rows file"),
        ("eval_translations", "translation file attached to the validation rows by id"),
    ):
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=f"{what} (default: the run's)")
    p.add_argument(
        "--eval-source",
        choices=("file", "parallel", "none"),
        default=None,
        help="English side of the rows: file (translations) | parallel | none (default: the run's)",
    )
    p.add_argument(
        "--missing-source",
        choices=("error", "drop"),
        default=None,
        help="rows without English translation (default: the run's)",
    )
    p.add_argument(
        "--max-eval-examples",
        type=int,
        default=None,
        metavar="N",
        help="at most N rows per language (default: the run's)",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, metavar="N", help="rows per forward pass (default: the run's)"
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available (default: auto)"
    )
    p.add_argument("--output", help="JSON path (default: <run-dir>/eval-<split>.json)")
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "translate",
        help="machine-translate rows (translate-test: English source; translate-train)",
        description="Machine-translate task rows with an NLLB-200 model. --mode test adds the English "
        "translation of target-language rows (source_* fields: FLARE's source stream, translate-test); --mode "
        "train translates English rows into --lang (translate-train; QA answers are carried through). The "
        "output is jsonl keyed by id, written chunk by chunk (--resume continues an interrupted one).",
    )
    p.add_argument("--task", required=True, choices=("xnli", "tydiqa", "nusax"), help="the task whose rows to read")
    p.add_argument(
        "--mode",
        required=True,
        choices=("test", "train"),
        help="test: target rows -> English source fields; train: English rows -> target-language rows",
    )
    p.add_argument("--lang", required=True, help="the target language (dataset code: sw, ace, ...)")
    p.add_argument("--split", default="test", help="hub split to read (default: test)")
    p.add_argument("--input", help="rows from a jsonl/csv/parquet file instead of the hub (default: the hub)")
    p.add_argument("--dataset-path", help="local copy of the hub dataset (default: the hub name)")
    p.add_argument("--output", required=True, help="jsonl output (written as <output>.partial until complete)")
    p.add_argument(
        "--model", default="facebook/nllb-200-3.3B", help="seq2seq MT model (NLLB conventions; default: %(default)s)"
    )
    p.add_argument("--lang-code", help="NLLB code of --lang (default: from the table in flare.translate)")
    p.add_argument("--english-code", help="NLLB code of English (default: eng_Latn)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="segments per batch (default: 16)")
    p.add_argument(
        "--max-length", type=int, default=256, metavar="N", help="input tokens per segment; longer texts are split "
        "at sentence ends (default: 256)"
    )  # fmt: skip
    p.add_argument("--num-beams", type=int, default=1, metavar="N", help="beam search width (default: 1, greedy)")
    p.add_argument("--chunk-size", type=int, default=256, metavar="N", help="rows per saved chunk (default: 256)")
    p.add_argument("--limit", type=int, metavar="N", help="first N rows only (default: all)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted translation (default: no)")
    _common(p)
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser(
        "reproduce",
        help="the paper's table: run the missing cells of an experiment spec, write CSV, table and plot",
        description="Run an experiment spec (tasks, models, methods, seeds; see flare.reproduce.spec) as one flare "
        "train run per cell, all methods of a (task, model, seed) sharing one English stage 1, then write "
        "results.csv, table.md (per task and model: methods x languages, mean ± std over seeds) and averages.png. "
        "Finished cells are never rerun and interrupted ones are resumed: run the same command again to continue. "
        "Without --spec: the built-in toy experiment (toy task, tiny model, all six methods, two seeds; minutes "
        "on a CPU).",
    )
    p.add_argument("--spec", help="experiment spec, JSON (or YAML with PyYAML) (default: the built-in toy one)")
    p.add_argument("--output-dir", help="where the cells and the table go (default: the spec's, else flare-reproduce)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their status; run and write nothing (default: no)")
    p.add_argument(
        "--overwrite", action="store_true", help="rerun cells whose stored settings differ from the spec (default: no)"
    )
    _common(p)
    p.set_defaults(func=cmd_reproduce)
    return parser


def _one_line(exc: BaseException) -> str:
    """The message of a user-caused error, on one line, naming the file an OSError is about."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
        if isinstance(exc, PermissionError):
            text += " (check the path's permissions, or choose another location)"
    else:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, KeyError):
            text = f"missing field {text}"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "filelock", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        # Bad arguments, configuration or data, or a path that cannot be read or written (FileNotFoundError,
        # PermissionError, NotADirectoryError...): a one-line error, no traceback (--debug shows it).
        if args.verbose or args.debug:
            raise
        print(f"flare {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
