"""``train(config)``: the whole FLARE recipe, stage 1 then stage 2, then the test table.

Output directory (all writes but train.log's atomic: temp name + rename):

    run_config.json          the TrainConfig (a resumed run must match it)
    train.log                what the run said, appended to by each process that works on it (resumptions)
    base/                    the built-in tiny Llama (built-in default only)
    stage1/checkpoints/step-*/   stage1/adapter/ (PEFT layout)   stage1/done.json
    stage2/checkpoints/step-*/   stage2/best/ (best validation score)   stage2/adapter/ (last step)
                             (each with a README.md: its base is the model with stage 1 merged)
    results.json             test table per language, validation history, loss curves, timings,
                             rows left out for lack of an English translation
    curves.png               training loss per step of each stage, validation score per evaluation

An output_dir holding another run is refused unless --resume (continue it) or --overwrite (remove the
files listed here, and eval-*.json, first; other files stay). Files follow the umask.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ..evaluate import EvalResult, EvaluationStopped, evaluate
from ..tasks import get_task
from .batching import prepare
from .checkpoint import restore_adapter, save_adapter, write_json
from .config import TrainConfig
from .distributed import Dist, gathered, init_distributed
from .inputs import StageData, load_stage_data
from .loop import StageResult, StageSpec, StepBudget, TrainingStopped, autocast_factory, run_stage, stop_agreed
from .modeling import (
    builtin_base,
    check_max_length,
    check_model_files,
    detect_family,
    flare_api,
    flare_config,
    load_base_model,
    load_tokenizer,
    merged_stage1,
)
from .progress import StopFlag
from .report import CURVES_FILE, LOG_FILE, logging_to, plot_curves, run_log

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    stages: dict[str, StageResult]
    test: EvalResult | None
    adapter: Path | None  # the stage-2 adapter the test table was computed with
    seconds: float
    model: torch.nn.Module | None = None  # the final FlareModel (its adapter restored to `adapter`)

    def loss_curve(self, stage: str) -> list[float]:
        return [h["loss"] for h in self.stages[stage].history] if stage in self.stages else []


# What a run writes at the top of its output_dir: --overwrite removes these (and nothing else), so that no
# file of the previous run (an eval-test.json, a stale base model) sits next to the new results.
RUN_FILES = ("stage1", "stage2", "base", "results.json", "run_config.json", LOG_FILE, CURVES_FILE)
RUN_PATTERNS = ("eval-*.json",)


def _run_files(out: Path) -> list[Path]:
    found = [out / name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
    found += [p for pattern in RUN_PATTERNS for p in sorted(out.glob(pattern))]
    return found + stale_temp_files(out)


def stale_temp_files(out: Path) -> list[Path]:
    """Temp files of writes interrupted before their rename (``atomic_write_text``: ``.<name>.<random>.tmp``)."""
    found = []
    for folder in (out, out / "stage1", out / "stage2"):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp")]
    return found


def check_output_dir(path: str | Path, option: str = "--output-dir") -> Path:
    """Refuse an output folder that is a file or cannot be written, before any work (one line)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{option} {out} is a file, not a folder; choose another {option}")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{option} {out}: {existing} is a file, not a folder; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {out}: {existing} is not writable; choose another {option}")
    return out


def _prepare_output(cfg: TrainConfig, dist: Dist) -> Path:
    out = Path(cfg.output_dir)
    run_file = out / "run_config.json"
    if dist.is_main:
        check_output_dir(out)
        if run_file.is_file() and cfg.resume:
            previous = TrainConfig.from_dict(json.loads(run_file.read_text()))
            diff = cfg.differences(previous)
            if diff:
                raise ValueError(
                    f"--resume: {out} holds a run with different settings {diff} (now, before); resume with the "
                    "same settings, or start a new run in another --output-dir"
                )
            for p in stale_temp_files(out):  # a kill at a rename of done.json / results.json left these
                p.unlink(missing_ok=True)
        elif out.exists() and any(out.iterdir()) and not cfg.resume:
            # A run that failed before its first stage began (a bad model file, say) left only its settings:
            # nothing to lose, so a rerun starts afresh there instead of refusing.
            not_started = {p.name for p in out.iterdir()} <= {"run_config.json", LOG_FILE, "base"}
            if not cfg.overwrite and not not_started:
                raise FileExistsError(
                    f"{out} already holds files (a previous run?); pass --resume to continue it, --overwrite to "
                    "replace it, or choose another --output-dir"
                )
            # not started: train.log is appended to; base/ (the built-in model, a function of the seed) is rebuilt
            for p in _run_files(out) if cfg.overwrite else [out / "base"]:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
            others = sorted(p.name for p in out.iterdir()) if cfg.overwrite else []
            if others:
                logger.warning("--overwrite: %s also holds %s, not written by flare train: left as is", out, others)
        out.mkdir(parents=True, exist_ok=True)
        write_json(run_file, cfg.to_dict())
    dist.barrier()
    return out


def train(cfg: TrainConfig | None = None, **overrides) -> TrainResult:
    """Run the recipe. ``train()`` alone is the built-in default (``TrainConfig.builtin()``)."""
    if cfg is None:
        cfg = TrainConfig.builtin(**overrides)
    elif overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    t_start = time.perf_counter()
    dist = init_distributed(cfg.device)
    cfg.accumulation(dist.world)  # the global batch must split over the processes: check before any work
    task = get_task(cfg.task)
    if dist.is_main:
        check_output_dir(cfg.output_dir)
    data = load_stage_data(cfg, task)  # bad or untranslated data fails here, before anything is written
    if cfg.model is not None:
        check_model_files(cfg.model)  # a missing path or a truncated weight file: one line, nothing written
    check_max_length(cfg.model, cfg.max_length)
    out = _prepare_output(cfg, dist)

    with logging_to(out / LOG_FILE if dist.is_main else None):
        try:
            return _train(cfg, dist, task, data, out, t_start)
        except TrainingStopped as stopped:
            run_log.info("stopped: %s", stopped)
            raise
        except BaseException as exc:
            run_log.info("failed: %s: %s", type(exc).__name__, exc)
            raise


def _train(cfg: TrainConfig, dist: Dist, task, data: StageData, out: Path, t_start: float) -> "TrainResult":
    run_log.info(
        "flare train%s: task %s, model %s, languages %s, stages %s, output %s",
        " --resume" if cfg.resume else "", cfg.task, cfg.model or "built-in tiny Llama",
        ",".join(cfg.languages or task.languages), ",".join(cfg.stages), out,
    )  # fmt: skip
    for report in data.reports:
        if report.missing:
            run_log.info(report.message())
    model_path = str(builtin_base(out, cfg.seed)) if cfg.model is None and dist.is_main else cfg.model
    dist.barrier()
    if model_path is None:
        model_path = str(out / "base")
    family = detect_family(model_path, cfg.family)
    tokenizer = load_tokenizer(model_path, family)
    device = dist.device
    autocast = autocast_factory(cfg, device)
    _, get_flare_model, _ = flare_api()
    budget, stop = StepBudget(cfg.stop_after_steps), StopFlag()
    results: dict[str, StageResult] = {}

    def new_model(base, stage: str):
        adapter_config = flare_config(cfg, family, task)
        if stage == "stage1":  # plain LoRA: no source in stage 1, and only a linear adapter can be merged
            adapter_config = dataclasses.replace(adapter_config, fusion="none")
        torch.manual_seed(cfg.seed)  # the same adapter initialization on every process
        model = get_flare_model(base, adapter_config)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(cfg.seed + dist.rank)  # per-process stream for dropout from here on
        return model

    def base():
        return load_base_model(model_path, task, family, quantize=cfg.quantize, device=device)

    with stop.installed():
        stage1_adapter = out / "stage1" / "adapter"
        if "stage1" in cfg.stages:
            done = out / "stage1" / "done.json"
            if cfg.resume and done.is_file() and stage1_adapter.is_dir():
                results["stage1"] = StageResult(**json.loads(done.read_text()))
                results["stage1"].from_earlier_run = True
                run_log.info("stage1: finished by an earlier run (%s)", done)
            else:
                model = new_model(base(), "stage1")
                examples = prepare(
                    data.stage1, task, tokenizer, family, cfg.max_length, with_source=False, with_answer=True
                )
                spec = StageSpec(
                    "stage1",
                    1,
                    examples,
                    use_source=False,
                    learning_rate=cfg.lr_stage1,
                    epochs=cfg.epochs_stage1,
                    directory=out / "stage1",
                )
                results["stage1"] = run_stage(
                    model, spec, cfg, dist, family, task, tokenizer.pad_token_id, budget, stop
                )
                if dist.is_main:
                    save_adapter(model, stage1_adapter)
                    write_json(done, dataclasses.asdict(results["stage1"]))
                dist.barrier()
                del model
                # Stopped at the last step of stage 1 (a signal, on any rank, or a step budget that ends
                # exactly here): stage 1 is complete and saved, and stage 2 must not take a step beyond it.
                if stop_agreed(stop, dist) or (budget.exhausted and "stage2" in cfg.stages):
                    reason = stop.reason or "stop_after_steps reached"
                    raise TrainingStopped("stage1", results["stage1"].steps, stage1_adapter, reason)

        test_result, adapter, model = None, None, None
        if "stage2" in cfg.stages:
            stage2_base = merged_stage1(base(), stage1_adapter) if "stage1" in cfg.stages else base()
            model = new_model(stage2_base, "stage2")
            examples = prepare(data.train, task, tokenizer, family, cfg.max_length, with_source=True, with_answer=True)
            use_source = cfg.eval_source != "none"

            def evaluate_on(m, dataset, split: str, should_stop=None):
                return evaluate(
                    m, task, tokenizer, family, dataset, split=split, max_length=cfg.max_length,
                    batch_size=cfg.eval_batch_size, use_source=use_source, device=device,
                    autocast=autocast, progress=cfg.progress, should_stop=should_stop,
                )  # fmt: skip

            def validate(m) -> tuple[float, dict]:
                r = evaluate_on(m, data.eval, "validation")
                return r.score, r.to_dict()

            spec = StageSpec(
                "stage2",
                2,
                examples,
                use_source=True,
                learning_rate=cfg.learning_rate,
                epochs=cfg.epochs,
                directory=out / "stage2",
                evaluate=validate if data.eval else None,
                readme=stage2_readme(cfg, out) if "stage1" in cfg.stages else None,
            )
            results["stage2"] = run_stage(model, spec, cfg, dist, family, task, tokenizer.pad_token_id, budget, stop)
            if dist.is_main:
                save_adapter(model, out / "stage2" / "adapter", spec.readme)
            dist.barrier()  # every rank returns these paths: they must be written before any rank goes on
            adapter = out / "stage2" / "adapter"
            # best_step is the same on every rank (run_stage broadcasts rank 0's evaluations): all restore it
            if results["stage2"].best_step is not None:
                adapter = out / "stage2" / "best"
                restore_adapter(model, adapter)
            with gathered(model):  # --distributed fsdp: every rank gathers the weights, rank 0 tests alone
                if data.test and dist.is_main:
                    try:
                        test_result = evaluate_on(model, data.test, "test", should_stop=lambda: stop.requested)
                    except EvaluationStopped:
                        # training is complete and saved: a Ctrl-C here leaves at once instead of scoring on
                        raise TrainingStopped(
                            "test", results["stage2"].steps, adapter, stop.reason,
                            f"{stop.reason}: stopped during the test evaluation; training is complete and its adapter "
                            f"is {adapter}. Score it with `flare eval --run-dir {out}`, or rerun with --resume",
                        ) from None  # fmt: skip
                    run_log.info("test:\n%s", test_result.table())
            dist.barrier()

    seconds = time.perf_counter() - t_start
    result = TrainResult(
        output_dir=out,
        stages=results,
        test=test_result,
        adapter=adapter,
        seconds=seconds,
        model=model if "stage2" in cfg.stages else None,
    )
    if dist.is_main:
        _write_results(out / "results.json", result, data, cfg)
        for name, stage in results.items():
            if not stage.from_earlier_run:
                run_log.info(
                    "%s: %d steps in %.1f s%s, loss %s, %.0f tokens/s", name, stage.steps - stage.start_step,
                    stage.seconds, f" (resumed at step {stage.start_step})" if stage.start_step else "",
                    " -> ".join(f"{h['loss']:.4f}" for h in stage.history[:: max(1, len(stage.history) - 1)]),
                    stage.tokens_per_second,
                )  # fmt: skip
        plot_curves(out / CURVES_FILE, results, task.metric)
        run_log.info("done in %.1f s: results %s, curves %s", seconds, out / "results.json", out / CURVES_FILE)
    return result


def stage2_readme(cfg: TrainConfig, out: Path) -> str:
    """README.md of a stage-2 adapter: its base is the model *with stage 1 merged*, which
    adapter_config.json's base_model_name_or_path cannot say (plain PEFT over that name drops stage 1)."""
    base = cfg.model or f"{out / 'base'} (the built-in tiny Llama)"
    return f"""# FLARE stage-2 adapter

Trained by `flare train` (task {cfg.task}, fusion {cfg.fusion}) over **{base} with the stage-1 LoRA
adapter `{out / 'stage1' / 'adapter'}` merged into it and re-quantized to NF4**. `adapter_config.json`
names {cfg.model or 'the base'} as `base_model_name_or_path`, because PEFT has no way to name a merge:
loading this adapter with plain PEFT over that model alone silently leaves stage 1 out, and scores
lower than the run did.

Load it with stage 1 merged:

```python
import flare
from flare.train.modeling import merged_stage1
base = merged_stage1(base_model, "{out / 'stage1' / 'adapter'}")   # base_model: loaded as for training
model = flare.load_flare_model(base, "<this folder>")
```

or score it with `flare eval --run-dir {out}`.
"""


def _write_results(path: Path, result: TrainResult, data: StageData, cfg: TrainConfig) -> None:
    write_json(
        path,
        {
            "task": cfg.task,
            "test": result.test.to_dict() if result.test else None,
            "adapter": str(result.adapter) if result.adapter else None,
            "stages": {
                name: {
                    "steps": r.steps,
                    "seconds": round(r.seconds, 2),
                    "tokens_per_second": round(r.tokens_per_second, 1),
                    "peak_memory_gib": round(r.peak_memory_gib, 3),
                    "resumed_at_step": r.start_step,
                    "best_step": r.best_step,
                    "best_validation": r.best_score,
                    "loss_curve": [h["loss"] for h in r.history],
                    "validation": [{"step": e["step"], "score": e["score"]} for e in r.evals],
                }
                for name, r in result.stages.items()
            },
            "rows_without_translation": [rep.as_dict() for rep in data.reports],
            "seconds": round(result.seconds, 2),
        },
    )
