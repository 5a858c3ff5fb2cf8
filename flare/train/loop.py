"""The training loop of one stage: AdamW, linear warmup/decay, gradient accumulation, autocast,
periodic evaluation and atomic checkpoints, resumable exactly.

Exact resumption: a checkpoint is taken only between optimizer steps and holds the trainable
tensors, the optimizer state and every RNG; the data order and the learning rate are functions of
the step. Evaluation runs under ``torch.random.fork_rng`` so it draws nothing from the training RNG
streams: a run that evaluates (or checkpoints) at step k is bitwise the same as one that does not.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch

from .batching import Example, collate, count_tokens, global_batches, micro_slices, steps_per_epoch
from .checkpoint import latest_checkpoint, load_checkpoint, save_adapter, save_checkpoint
from .distributed import Dist, gathered, no_sync, unwrap, wrap
from .objective import loss_sum, supports_logits_to_keep
from .progress import Progress, StopFlag, memory_gib
from .report import run_log

logger = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """The run left early (stop_after_steps, SIGINT/SIGTERM) after writing a checkpoint."""

    def __init__(self, stage: str, step: int, checkpoint: Path, reason: str, message: str | None = None) -> None:
        self.stage, self.step, self.checkpoint, self.reason = stage, step, checkpoint, reason
        super().__init__(
            message or f"{reason}: stopped {stage} at step {step}; checkpoint {checkpoint}. Continue with --resume"
        )


@dataclasses.dataclass
class StageSpec:
    name: str  # "stage1" | "stage2"
    index: int  # 1 | 2 (part of the data-order seed)
    examples: list[Example]
    use_source: bool
    learning_rate: float
    epochs: float
    directory: Path  # <output_dir>/<stage>
    evaluate: Callable[[torch.nn.Module], tuple[float, dict]] | None = None  # -> (score, details)
    readme: str | None = None  # README.md of the adapters this stage saves (best/)
    select: bool = True  # model selection: keep the best-scoring adapter in best/ (False: only record scores)


@dataclasses.dataclass
class StageResult:
    steps: int
    history: list[dict]  # one record per optimizer step: step, epoch, loss, lr
    evals: list[dict]  # step, score, details
    best_step: int | None
    best_score: float | None
    seconds: float
    tokens_per_second: float  # of this process's steps
    peak_memory_gib: float
    start_step: int = 0  # the step this process resumed at: it ran steps - start_step of them, in `seconds`
    from_earlier_run: bool = False  # read back from done.json: an earlier process ran all of it


@dataclasses.dataclass
class StepBudget:
    """Optimizer steps this process may still take (stop_after_steps), shared by both stages."""

    remaining: int | None = None

    def spend(self) -> bool:
        """Count one step; True when the budget is used up."""
        if self.remaining is None:
            return False
        self.remaining -= 1
        return self.exhausted

    @property
    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0


def stop_agreed(stop: StopFlag, dist: Dist) -> bool:
    """Whether any process got SIGINT/SIGTERM; all processes then hold the same StopFlag.

    A signal may reach one rank only (or reach the ranks at different steps): a rank that stopped alone
    would wait in the checkpoint's barriers while the others run the next step's collectives, and the job
    would hang. Every rank calls this at the same point, so they all leave at the same step boundary.
    """
    if dist.any(stop.requested) and not stop.requested:
        stop.requested = True
        stop.reason = "SIGINT/SIGTERM received by another process"
    return stop.requested


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup to ``base`` over ``warmup``
    steps, then linear decay from ``base`` to base / (decay steps) on the last step (never 0, so every
    step moves the weights)."""
    if warmup and step <= warmup:
        return base * step / warmup
    return base * (total - step + 1) / (total - warmup)


def make_optimizer(params: list[torch.nn.Parameter], cfg, device: torch.device, lr: float):
    kind = cfg.optimizer
    if kind == "auto":
        kind = "adamw8bit" if device.type == "cuda" else "adamw"
    if kind == "adamw8bit":
        if device.type != "cuda":
            raise ValueError("--optimizer adamw8bit needs a CUDA device (bitsandbytes' 8-bit optimizers run on GPUs)")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)


def autocast_dtype(cfg, device: torch.device, stage: str = "stage2") -> torch.dtype | None:
    """The dtype a stage autocasts to, None for none.

    Without a compute dtype (compute_dtype / stage1_compute_dtype None): bf16 on CUDA when supported and not
    disabled (``bf16``), nothing on CPU. With one: that dtype on CUDA (fp32: no autocast); on a CPU nothing,
    whatever was asked (the compute dtypes describe a GPU run; see flare.train.modeling: CPUs compute in fp32),
    while an explicit ``--bf16`` on a CPU stays an error.
    """
    from .modeling import stage_compute_dtype

    wanted = stage_compute_dtype(cfg, stage)
    if wanted is None:
        use = cfg.bf16 if cfg.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
        if use and device.type != "cuda":
            raise ValueError("--bf16 autocast is for CUDA devices; CPU runs compute in the model's dtype")
        return torch.bfloat16 if use else None
    if cfg.bf16 and device.type != "cuda":
        raise ValueError("--bf16 autocast is for CUDA devices; CPU runs compute in the model's dtype")
    if device.type != "cuda" or wanted == "fp32":
        return None
    if wanted == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("--compute-dtype bf16: this GPU does not support bf16; use fp16 or fp32")
    return torch.bfloat16 if wanted == "bf16" else torch.float16


def autocast_factory(cfg, device: torch.device, stage: str = "stage2"):
    """A function returning the stage's autocast context (``autocast_dtype``), or None for none."""
    dtype = autocast_dtype(cfg, device, stage)
    if dtype is None:
        return None
    return lambda: torch.autocast("cuda", dtype=dtype)


def run_stage(
    model, spec: StageSpec, cfg, dist: Dist, family: str, task, pad_id: int, budget: StepBudget, stop: StopFlag
) -> StageResult:
    """Train ``model`` (a FlareModel) on ``spec.examples``; returns the loss history and evaluations."""
    device = dist.device
    micro, accumulation = cfg.accumulation(dist.world)
    per_epoch = steps_per_epoch(len(spec.examples), cfg.batch_size)
    if per_epoch == 0:
        raise ValueError(f"{spec.name}: {len(spec.examples)} training rows make no full batch of {cfg.batch_size}")
    total = max(1, round(spec.epochs * per_epoch))
    warmup = math.ceil(cfg.warmup_ratio * total)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{spec.name}: the model has no trainable parameters")
    optimizer = make_optimizer(params, cfg, device, spec.learning_rate)
    autocast = autocast_factory(cfg, device, spec.name)
    # fp16 (the authors' stage 1) needs loss scaling: gradients of ~1e-8 (LoRA B starts at 0, lr 2e-5) would
    # flush to zero in fp16 (smallest normal 6e-5). The scale is not checkpointed: a resumed fp16 stage starts
    # it again at 2**16 and is not bitwise the uninterrupted run (bf16/fp32 stages are).
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype(cfg, device, spec.name) == torch.float16 else None
    keep_logits = family == "decoder" and supports_logits_to_keep(model)
    module = wrap(model, dist)

    step, history, evals, best = 0, [], [], {"step": None, "score": None}
    ckpt_root = spec.directory / "checkpoints"
    if cfg.resume and (ckpt := latest_checkpoint(ckpt_root)) is not None:
        state = load_checkpoint(ckpt, model, optimizer, dist, device)
        step, history, evals = state["step"], state["history"], state["evals"]
        best = state["best"]
        logger.info("%s: resumed from %s (step %d of %d)", spec.name, ckpt, step, total)
        run_log.info("%s: resumed from %s (step %d of %d)", spec.name, ckpt, step, total)
    start_step = step

    def state_dict() -> dict:
        return {"history": history, "evals": evals, "best": best, "total_steps": total}

    def checkpoint() -> Path:
        return save_checkpoint(ckpt_root, step, model, optimizer, state_dict(), dist, cfg.keep_checkpoints)

    progress = Progress(
        total, step, spec.name, device, enabled=cfg.progress and dist.is_main, quiet=not cfg.progress and dist.is_main
    )
    progress.note(
        f"{spec.name}: {total} steps ({per_epoch} per epoch, {spec.epochs:g} epochs) over {len(spec.examples)} rows, "
        f"batch {cfg.batch_size} = {micro} x {accumulation} accumulation x {dist.world} processes, peak lr "
        f"{spec.learning_rate:g}, {warmup} warmup steps" + (f"; resuming at step {step}" if step else "")
    )
    t0 = time.perf_counter()
    module.train()
    try:
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            for b, batch_idx in enumerate(
                global_batches(len(spec.examples), cfg.batch_size, cfg.seed, spec.index, epoch)
            ):
                if b < offset:
                    continue
                if step >= total:
                    break
                lr = lr_at(step + 1, total, warmup, spec.learning_rate)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                units = sum(spec.examples[i].loss_units for i in batch_idx)
                scale = dist.world / units
                local_loss = torch.zeros((), device=device)
                tokens = 0
                slices = micro_slices(batch_idx, micro, accumulation, dist.rank, dist.world)
                for k, idx in enumerate(slices):
                    batch = collate([spec.examples[i] for i in idx], family, task, pad_id, with_answer=True)
                    tokens += count_tokens(batch)
                    with no_sync(module, skip=k < accumulation - 1):
                        with autocast() if autocast else _nullcontext():
                            loss = loss_sum(
                                module,
                                batch,
                                family,
                                task.kind,
                                device,
                                use_source=spec.use_source,
                                logits_to_keep=keep_logits,
                            )
                        scaled = loss * scale
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    local_loss += loss.detach()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)  # skips the step when a gradient overflowed, and lowers the scale
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                mean_loss = float(dist.sum(local_loss)) / units
                history.append({"step": step, "epoch": round(step / per_epoch, 4), "loss": mean_loss, "lr": lr})
                progress.update(mean_loss, int(dist.sum(torch.tensor(tokens, device=device))), lr)

                end_of_epoch = step % per_epoch == 0
                if end_of_epoch or step == total:
                    progress.note(
                        f"{spec.name} epoch {step / per_epoch:g}: step {step}/{total}, loss {mean_loss:.4f}, "
                        f"{progress.tokens_per_second:,.0f} tokens/s, lr {lr:.2e}"
                    )
                if spec.evaluate is not None and (
                    (cfg.eval_steps and step % cfg.eval_steps == 0)
                    or (not cfg.eval_steps and end_of_epoch)
                    or step == total
                ):
                    _evaluate(module, spec, step, evals, best, progress, dist)
                # stop_agreed is a collective: every rank calls it every step (no short-circuit)
                budget_spent = budget.spend()
                stopping = stop_agreed(stop, dist) or budget_spent
                if (
                    (cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0)
                    or (not cfg.checkpoint_steps and end_of_epoch)
                    or step == total
                    or stopping
                ):
                    path = checkpoint()
                    if stopping and step < total:
                        raise TrainingStopped(spec.name, step, path, stop.reason or "stop_after_steps reached")
    finally:
        progress.close()
    seconds = time.perf_counter() - t0
    return StageResult(
        steps=step,
        history=history,
        evals=evals,
        best_step=best["step"],
        best_score=best["score"],
        seconds=seconds,
        tokens_per_second=progress.tokens_per_second,
        peak_memory_gib=memory_gib(device),
        start_step=start_step,
    )


def _evaluate(module, spec: StageSpec, step: int, evals: list, best: dict, progress: Progress, dist: Dist) -> None:
    """Evaluate on rank 0 without touching the training RNG; keep the best adapter (model selection)."""
    model = unwrap(module)
    record = None
    with gathered(model):  # --distributed fsdp: every rank gathers the weights, so rank 0 evaluates alone
        if dist.is_main:
            devices = [dist.device] if dist.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                score, details = spec.evaluate(model)
            model.train()
            record = {"step": step, "score": score, "details": details}
            metric = details.get("primary", "score") if isinstance(details, dict) else "score"
            improved = spec.select and (best["score"] is None or score > best["score"])
            progress.write(
                f"{spec.name} step {step}: validation {metric} {score:.2f}" + (" (best so far)" if improved else "")
            )
            if improved:
                save_adapter(model, spec.directory / "best", spec.readme)
    # Every rank keeps the same bookkeeping: the StageResult (best_step, evals) decides which adapter each
    # rank restores and returns. The broadcast also waits for rank 0's evaluation and best/ adapter.
    record = dist.broadcast(record)
    evals.append(record)
    if spec.select and (best["score"] is None or record["score"] > best["score"]):
        best["score"], best["step"] = record["score"], step


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()
