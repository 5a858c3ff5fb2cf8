"""``train(config)``: the whole FLARE recipe, stage 1 then stage 2, then the test table.

What stage 2 trains and what the test table scores follow --method and --eval-mode (flare.train.methods);
zero-shot and translate-test score the stage-1 model, after stage 1, in a run of stage 1 alone.
--stage1-from reuses another run's finished stage 1 (flare.train.stage1_reuse) instead of training one.

Output directory (all writes but train.log's atomic: temp name + rename):

    run_config.json          the TrainConfig (a resumed run must match it)
    train.log                what the run said, appended to by each process that works on it (resumptions)
    base/                    the built-in tiny Llama (built-in default only)
    stage1/checkpoints/step-*/   stage1/adapter/ (PEFT layout)   stage1/done.json   (none with --stage1-from)
    stage2/checkpoints/step-*/   stage2/best/ (best validation score)   stage2/adapter/ (last step)
                             (each with a README.md: its base is the model with stage 1 merged)
    results.json             method, eval mode, stage1_from; test table per language, validation history,
                             loss curves, timings, rows left out for lack of an English translation
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
from ..recipes import resolve as resolve_recipe
from ..tasks import get_task
from .batching import prepare
from .checkpoint import restore_adapter, save_adapter, write_json
from .config import TrainConfig
from .distributed import Dist, gathered, init_distributed
from .inputs import StageData, load_stage_data
from .loop import StageResult, StageSpec, StepBudget, TrainingStopped, autocast_factory, run_stage, stop_agreed
from .mt import MT_BASE, attach_mt, check_mt_config, mt_model_path
from .methods import STAGE1_MODES, eval_inputs, input_length, resolve_eval_mode, stage2_fusion, stage2_inputs
from .modeling import (
    builtin_base,
    check_max_length,
    check_model_files,
    detect_family,
    flare_api,
    flare_config,
    load_base_model,
    LoadSettings,
    load_tokenizer,
    merged_stage1,
)
from .progress import StopFlag
from .report import CURVES_FILE, LOG_FILE, logging_to, plot_curves, run_log
from .stage1_reuse import check_stage1_from, reused_result

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    stages: dict[str, StageResult]
    test: EvalResult | None
    adapter: Path | None  # the adapter the test table was computed with (stage 2; stage 1 for zero-shot/translate-test)
    seconds: float
    model: torch.nn.Module | None = None  # the final FlareModel (its adapter restored to `adapter`)

    def loss_curve(self, stage: str) -> list[float]:
        return [h["loss"] for h in self.stages[stage].history] if stage in self.stages else []


# What a run writes at the top of its output_dir: --overwrite removes these (and nothing else), so that no
# file of the previous run (an eval-test.json, a stale base model) sits next to the new results.
RUN_FILES = ("stage1", "stage2", "base", MT_BASE, "results.json", "run_config.json", LOG_FILE, CURVES_FILE)
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


def train(cfg: TrainConfig | None = None, *, explicit=None, **overrides) -> TrainResult:
    """Run the recipe. ``train()`` alone is the built-in default (``TrainConfig.builtin()``).
    ``explicit``: the fields the user gave, which win over ``cfg.recipe`` (None: see flare.recipes)."""
    if cfg is None:
        cfg = TrainConfig.builtin(**overrides)
    elif overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    cfg = resolve_recipe(cfg, explicit).config  # the resolved settings are the run's (run_config.json, --resume)
    t_start = time.perf_counter()
    dist = init_distributed(cfg.device)
    cfg.accumulation(dist.world)  # the global batch must split over the processes: check before any work
    task = get_task(cfg.task)
    if dist.is_main:
        check_output_dir(cfg.output_dir)
    _check_method(cfg)
    check_mt_config(cfg)  # --method flare-mt: --mt-model outside the toy task
    if cfg.stage1_from is not None:
        check_stage1_from(cfg)  # unfinished or trained with other settings: refused before anything is written
    data = load_stage_data(cfg, task)  # bad or untranslated data fails here, before anything is written
    if cfg.model is not None:
        check_model_files(cfg.model)  # a missing path or a truncated weight file: one line, nothing written
    check_max_length(cfg.model, input_length(cfg.method, cfg.max_length))
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
    tokenizer = load_tokenizer(model_path, family, add_pad_token=cfg.add_pad_token)
    device = dist.device
    _, get_flare_model, _ = flare_api()
    budget, stop = StepBudget(cfg.stop_after_steps), StopFlag()
    results: dict[str, StageResult] = {}

    def new_model(base, stage: str):
        adapter_config = flare_config(cfg, family, task)
        if stage == "stage1":  # plain LoRA: no source in stage 1, and only a linear adapter can be merged
            adapter_config = dataclasses.replace(adapter_config, fusion="none")
        elif stage2_fusion(cfg.method, cfg.fusion) != adapter_config.fusion:  # the baselines: plain LoRA
            adapter_config = dataclasses.replace(adapter_config, fusion=stage2_fusion(cfg.method, cfg.fusion))
        torch.manual_seed(cfg.seed)  # the same adapter initialization on every process
        model = get_flare_model(base, adapter_config)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(cfg.seed + dist.rank)  # per-process stream for dropout from here on
        return model

    def base(stage: str = "stage2"):
        settings = LoadSettings.of(cfg, stage)  # per-stage compute dtype, double quant, fp32 parts, pad token
        return load_base_model(
            model_path, task, family, quantize=cfg.quantize, device=device, settings=settings, tokenizer=tokenizer
        )

    mode = resolve_eval_mode(cfg.method, cfg.eval_mode, cfg.eval_source)
    scoring = eval_inputs(cfg.method, mode, cfg.max_length)  # test rows, and stage 2's validation rows
    # the scored model's compute dtype (the authors' recipe: fp16 in stage 1, bf16 in stage 2)
    autocast = autocast_factory(cfg, device, "stage1" if mode in STAGE1_MODES else "stage2")

    def evaluate_on(m, dataset, split: str, should_stop=None):
        result = evaluate(
            m, task, tokenizer, family, scoring.rows_by_lang(dataset, task), split=split,
            max_length=scoring.max_length, batch_size=cfg.eval_batch_size, use_source=scoring.use_source,
            device=device, autocast=autocast, progress=cfg.progress, should_stop=should_stop,
            alignment=cfg.decoder_alignment, scoring=cfg.decoder_eval,
        )  # fmt: skip
        result.method, result.eval_mode = cfg.method, mode
        return result

    def test(m, stage: str, steps: int, adapter: Path):
        """The test table (rank 0), or TrainingStopped when a Ctrl-C comes during it."""
        try:
            result = evaluate_on(m, data.test, "test", should_stop=lambda: stop.requested)
        except EvaluationStopped:
            # training is complete and saved: a Ctrl-C here leaves at once instead of scoring on
            raise TrainingStopped(
                "test", steps, adapter, stop.reason,
                f"{stop.reason}: stopped during the test evaluation; training is complete and its adapter "
                f"is {adapter}. Score it with `flare eval --run-dir {out}" + (
                    f" --eval-mode {mode}`" if stage == "stage1" else "`"
                ) + ", or rerun with --resume",
            ) from None  # fmt: skip
        run_log.info("test (method %s, eval mode %s):\n%s", cfg.method, mode, result.table())
        return result

    with stop.installed():
        stage1_folder = out / "stage1"
        if cfg.stage1_from is not None:  # another run's finished stage 1 (checked again: it may have changed)
            stage1_folder = check_stage1_from(cfg)
            results["stage1"] = reused_result(stage1_folder)
            run_log.info("stage1: reused from --stage1-from %s (%s), not trained here", cfg.stage1_from, stage1_folder)
        stage1_adapter = stage1_folder / "adapter"
        if "stage1" in cfg.stages and cfg.stage1_from is None:
            done = out / "stage1" / "done.json"
            if cfg.resume and done.is_file() and stage1_adapter.is_dir():
                results["stage1"] = StageResult(**json.loads(done.read_text()))
                results["stage1"].from_earlier_run = True
                run_log.info("stage1: finished by an earlier run (%s)", done)
            else:
                model = new_model(base("stage1"), "stage1")
                examples = prepare(
                    data.stage1, task, tokenizer, family, cfg.max_length, with_source=False, with_answer=True,
                    alignment=cfg.decoder_alignment,
                )  # fmt: skip
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
        if mode in STAGE1_MODES:  # the paper's zero-shot / translate-test baselines: the stage-1 model itself
            adapter = stage1_adapter
            if data.test and dist.is_main:
                _, _, load_flare_model = flare_api()
                stage1_model = load_flare_model(base("stage1"), str(stage1_adapter))  # as flare eval loads it
                test_result = test(stage1_model, "stage1", results["stage1"].steps, adapter)
                del stage1_model
            dist.barrier()
        if "stage2" in cfg.stages:
            stage2_base = merged_stage1(base(), stage1_adapter) if "stage1" in cfg.stages else base()
            model = new_model(stage2_base, "stage2")
            mt = None
            if cfg.method == "flare-mt":
                if dist.is_main:
                    mt_model_path(cfg, out)  # the built-in tiny NLLB, built by one process (not every rank at once)
                dist.barrier()
                mt = attach_mt(model, cfg, out, task, tokenizer, family)
            training = stage2_inputs(cfg.method, cfg.max_length)
            examples = prepare(
                training.rows(data.train, task), task, tokenizer, family, training.max_length,
                with_source=training.use_source, with_answer=True, alignment=cfg.decoder_alignment, mt=mt,
            )  # fmt: skip

            def validate(m) -> tuple[float, dict]:
                r = evaluate_on(m, data.eval, "validation")
                return r.score, r.to_dict()

            spec = StageSpec(
                "stage2",
                2,
                examples,
                use_source=training.use_source,
                learning_rate=cfg.learning_rate,
                epochs=cfg.epochs,
                directory=out / "stage2",
                evaluate=validate if data.eval else None,
                select=cfg.model_selection,  # the authors' TyDiQA: the last step, whatever validation says
                readme=stage2_readme(cfg, out, stage1_adapter) if "stage1" in cfg.stages else None,
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
                    test_result = test(model, "stage2", results["stage2"].steps, adapter)
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


def _check_method(cfg: TrainConfig) -> None:
    """The method and eval mode resolve to inputs this build has (flare-mt: see methods.py), before any work."""
    if "stage2" in cfg.stages:
        stage2_inputs(cfg.method, cfg.max_length)
    mode = resolve_eval_mode(cfg.method, cfg.eval_mode, cfg.eval_source)
    if "stage2" in cfg.stages or mode in STAGE1_MODES:
        eval_inputs(cfg.method, mode, cfg.max_length)


def stage2_readme(cfg: TrainConfig, out: Path, stage1_adapter: Path | None = None) -> str:
    """README.md of a stage-2 adapter: its base is the model *with stage 1 merged*, which
    adapter_config.json's base_model_name_or_path cannot say (plain PEFT over that name drops stage 1)."""
    base = cfg.model or f"{out / 'base'} (the built-in tiny Llama)"
    stage1_adapter = stage1_adapter or out / "stage1" / "adapter"
    return f"""# FLARE stage-2 adapter

Trained by `flare train` (task {cfg.task}, method {cfg.method}, fusion {stage2_fusion(cfg.method, cfg.fusion)}) over
**{base} with the stage-1 LoRA adapter `{stage1_adapter}` merged into it and re-quantized to NF4**.
`adapter_config.json` names {cfg.model or 'the base'} as `base_model_name_or_path`, because PEFT has no way
to name a merge: loading this adapter with plain PEFT over that model alone silently leaves stage 1 out, and scores
lower than the run did.

Load it with stage 1 merged:

```python
import flare
from flare.train.modeling import merged_stage1
base = merged_stage1(base_model, "{stage1_adapter}")   # base_model: loaded as for training
model = flare.load_flare_model(base, "<this folder>")
```

or score it with `flare eval --run-dir {out}`.
"""


def _write_results(path: Path, result: TrainResult, data: StageData, cfg: TrainConfig) -> None:
    write_json(
        path,
        {
            "task": cfg.task,
            "method": cfg.method,
            "eval_mode": resolve_eval_mode(cfg.method, cfg.eval_mode, cfg.eval_source),
            "stage1_from": cfg.stage1_from,  # stage 1 reused from that run (not trained here), or None
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
