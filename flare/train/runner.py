"""``train(config)``: the whole FLARE recipe, stage 1 then stage 2, then the test table.

Output directory (all writes atomic: temp name + rename):

    run_config.json          the TrainConfig (a resumed run must match it)
    base/                    the built-in tiny Llama (built-in default only)
    stage1/checkpoints/step-*/   stage1/adapter/ (PEFT layout)   stage1/done.json
    stage2/checkpoints/step-*/   stage2/best/ (best validation score)   stage2/adapter/ (last step)
    results.json             test table per language, validation history, loss curves, timings,
                             rows left out for lack of an English translation
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from ..evaluate import EvalResult, evaluate
from ..tasks import get_task
from .batching import prepare
from .checkpoint import restore_adapter, save_adapter, write_json
from .config import TrainConfig
from .distributed import Dist, init_distributed
from .inputs import StageData, load_stage_data
from .loop import StageResult, StageSpec, StepBudget, TrainingStopped, autocast_factory, run_stage, stop_agreed
from .modeling import (
    builtin_base,
    check_max_length,
    detect_family,
    flare_api,
    flare_config,
    load_base_model,
    load_tokenizer,
    merged_stage1,
)
from .progress import StopFlag

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


def _prepare_output(cfg: TrainConfig, dist: Dist) -> Path:
    out = Path(cfg.output_dir)
    run_file = out / "run_config.json"
    if dist.is_main:
        if run_file.is_file() and cfg.resume:
            previous = TrainConfig.from_dict(json.loads(run_file.read_text()))
            diff = cfg.differences(previous)
            if diff:
                raise ValueError(
                    f"--resume: {out} holds a run with different settings {diff} (now, before); resume with the "
                    "same settings, or start a new run in another --output-dir"
                )
        elif out.exists() and any(out.iterdir()) and not cfg.resume:
            if not cfg.overwrite:
                raise FileExistsError(
                    f"{out} already holds files (a previous run?); pass --resume to continue it, --overwrite to "
                    "replace it, or choose another --output-dir"
                )
            for child in ("stage1", "stage2", "results.json", "run_config.json"):
                p = out / child
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
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
    data = load_stage_data(cfg, task)  # bad or untranslated data fails here, before anything is written
    check_max_length(cfg.model, cfg.max_length)
    out = _prepare_output(cfg, dist)

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

            def evaluate_on(m, dataset, split: str):
                return evaluate(
                    m, task, tokenizer, family, dataset, split=split, max_length=cfg.max_length,
                    batch_size=cfg.eval_batch_size, use_source=use_source, device=device,
                    autocast=autocast, progress=cfg.progress,
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
            )
            results["stage2"] = run_stage(model, spec, cfg, dist, family, task, tokenizer.pad_token_id, budget, stop)
            if dist.is_main:
                save_adapter(model, out / "stage2" / "adapter")
            dist.barrier()  # every rank returns these paths: they must be written before any rank goes on
            adapter = out / "stage2" / "adapter"
            # best_step is the same on every rank (run_stage broadcasts rank 0's evaluations): all restore it
            if results["stage2"].best_step is not None:
                adapter = out / "stage2" / "best"
                restore_adapter(model, adapter)
            if data.test and dist.is_main:
                test_result = evaluate_on(model, data.test, "test")
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
    return result


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
