"""``flare``: command line of the FLARE method.

    flare train                          the built-in default: toy task, tiny random Llama in 4-bit, CPU, minutes
    flare train --task xnli --model meta-llama/Llama-3.1-8B --languages sw,ur --test-translations ...
    flare eval --run-dir flare-output    per-language table on screen, JSON on disk
    flare translate --task xnli --mode test --lang sw --split test --output sw-test.jsonl

Every ``flare train`` option is a ``flare.train.TrainConfig`` field (``--learning-rate`` ->
``learning_rate``); ``--config run.json`` reads a JSON file of fields first. Lists are comma-separated.
Exit codes: 0 done, 2 bad arguments or input, 3 stopped early with a checkpoint (continue with --resume).
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
    "task": "xnli | tydiqa | nusax | toy (the built-in sample)",
    "model": "hub name or local path of the model (none: the built-in tiny Llama, toy task only)",
    "family": "decoder | encoder (default: from the model's config)",
    "quantize": "load the linear layers in 4-bit NF4 (default: decoders yes, encoders no)",
    "languages": "target languages, comma-separated (default: the task's)",
    "output_dir": "where checkpoints, adapters and results go",
    "stages": "stage1,stage2 (stage 1: LoRA on English, merged; stage 2: FLARE on the target languages)",
    "dataset_path": "local copy of the task's hub dataset (or another hub name)",
    "english_path": "local copy of the English counterpart (SQuAD for TyDiQA)",
    "eval_source": "English side of validation/test rows: file (translate-test) | parallel | none",
    "missing_source": "rows without English translation: error | drop (reported either way)",
    "micro_batch_size": "rows per forward pass per process (default: batch_size / processes)",
    "eval_steps": "evaluate every N steps of stage 2 (0: each epoch)",
    "checkpoint_steps": "checkpoint every N steps (0: each epoch)",
    "stop_after_steps": "leave after N optimizer steps with a checkpoint (resume later with --resume)",
    "optimizer": "auto (8-bit AdamW on CUDA, AdamW on CPU) | adamw | adamw8bit",
    "bf16": "bf16 autocast (default: on with CUDA)",
}


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else args
    return tp


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        tp = _unwrap_optional(hints[field.name])
        kwargs = {"dest": field.name, "default": argparse.SUPPRESS, "help": _HELP.get(field.name, "")}
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

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func", "verbose")}
    for name in ("languages", "stages", "fusion_modules", "modules_to_save"):
        if name in given:
            given[name] = _parse_list(given[name])
    if "lora_modules" in given and given["lora_modules"] != "all-linear":
        given["lora_modules"] = _parse_list(given["lora_modules"])
    values: dict = {}
    if args.config:
        values.update(json.loads(Path(args.config).read_text()))
    values.update(given)
    builtin = values.get("model") is None and values.get("task", "toy") == "toy"
    return TrainConfig.builtin(**values) if builtin else TrainConfig.from_dict(values), builtin


# ------------------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    cfg, builtin = _train_config(args)
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
        result = train(cfg)
    except TrainingStopped as stop:
        print(f"flare train: {stop}", file=sys.stderr)
        return EXIT_STOPPED
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch, rank 0 reports
        return 0
    for name, stage in result.stages.items():
        curve = [h["loss"] for h in stage.history]
        if curve:
            print(
                f"{name}: {stage.steps} steps in {stage.seconds:.1f} s, loss {curve[0]:.4f} -> {curve[-1]:.4f}, "
                f"{stage.tokens_per_second:,.0f} tokens/s, peak memory {stage.peak_memory_gib:.2f} GiB"
            )
    if result.test is not None:
        print()
        print(result.test.table())
        print()
    print(f"adapter: {result.adapter}")
    print(f"results: {result.output_dir / 'results.json'}  ({time.perf_counter() - t0:.1f} s in all)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, write_result
    from .train.inputs import load_eval_rows
    from .train.loop import autocast_factory
    from .train.restore import eval_device, load_run_model

    model, tokenizer, family, cfg, task = load_run_model(args.run_dir, adapter=args.adapter, device=args.device)
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
    rows = load_eval_rows(cfg, task, args.split)
    device = eval_device(model)
    result = evaluate(
        model,
        task,
        tokenizer,
        family,
        rows,
        split=args.split,
        max_length=cfg.max_length,
        batch_size=args.batch_size or cfg.eval_batch_size,
        use_source=cfg.eval_source != "none",
        device=device,
        autocast=autocast_factory(cfg, device),
        progress=True,
    )
    print(result.table())
    output = Path(args.output or Path(args.run_dir) / f"eval-{args.split}.json")
    write_result(result, output, run_dir=str(args.run_dir), adapter=str(args.adapter or ""))
    print(f"wrote {output}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from .data.files import read_rows
    from .tasks import get_task
    from .translate import Translator, nllb_code, translate_test_rows, translate_to_file, translate_train_rows

    task = get_task(args.task)
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
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flare", description="FLARE cross-lingual fine-tuning (QLoRA + language fusion)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,translate}")

    p = sub.add_parser(
        "train",
        help="stage 1 + stage 2 training, then the test table (no options: built-in default)",
        description="Train with FLARE. Without --model this runs the built-in default.",
    )
    p.add_argument("--config", help="JSON file of TrainConfig fields (command-line options override it)")
    _add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run: per-language table and JSON")
    p.add_argument("--run-dir", default="flare-output", help="output directory of flare train (default: flare-output)")
    p.add_argument("--adapter", help="stage-2 adapter directory (default: the run's best, else last)")
    p.add_argument("--split", choices=("validation", "test"), default="test")
    p.add_argument("--languages", help="comma-separated subset of languages")
    for name in ("test_file", "test_translations", "eval_file", "eval_translations"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None)
    p.add_argument("--eval-source", choices=("file", "parallel", "none"), default=None)
    p.add_argument("--missing-source", choices=("error", "drop"), default=None)
    p.add_argument("--max-eval-examples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--output", help="JSON path (default: <run-dir>/eval-<split>.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("translate", help="machine-translate rows (translate-test: English source; translate-train)")
    p.add_argument("--task", required=True, choices=("xnli", "tydiqa", "nusax"))
    p.add_argument(
        "--mode",
        required=True,
        choices=("test", "train"),
        help="test: target rows -> English source fields; train: English rows -> target-language rows",
    )
    p.add_argument("--lang", required=True, help="the target language (dataset code: sw, ace, ...)")
    p.add_argument("--split", default="test", help="hub split to read (default: test)")
    p.add_argument("--input", help="rows from a jsonl/csv/parquet file instead of the hub")
    p.add_argument("--dataset-path", help="local copy of the hub dataset")
    p.add_argument("--output", required=True, help="jsonl output (written as <output>.partial until complete)")
    p.add_argument("--model", default="facebook/nllb-200-3.3B", help="seq2seq MT model (NLLB conventions)")
    p.add_argument("--lang-code", help="NLLB code of --lang (default: from the table in flare.translate)")
    p.add_argument("--english-code", help="NLLB code of English (default: eng_Latn)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256, help="input tokens per segment (longer texts are split)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=256, help="rows per saved chunk")
    p.add_argument("--limit", type=int, help="first N rows only")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted translation")
    p.set_defaults(func=cmd_translate)
    return parser


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
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # Bad arguments, configuration or data: a one-line error, no traceback (-v shows it).
        if args.verbose:
            raise
        print(f"flare {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
