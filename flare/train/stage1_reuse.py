"""``--stage1-from RUN_DIR``: reuse another run's finished stage 1 instead of training it again.

The paper's methods (FLARE, LoRA, input-level fusion, FLARE MT, zero-shot, translate-test) all start from the
same stage 1 per (task, model, seed); stage 1 on English XNLI (393k rows) is the costliest stage of a grid.
The reusing run reads the other run's ``stage1/adapter`` in place (nothing is copied: for Llama 3.1 the
adapter folder holds a trained 1 GB lm_head), so that run must stay where it is.
"""

from __future__ import annotations

import json
from pathlib import Path

# What stage 1 reads, so what two runs must share for one's stage 1 to stand in for the other's:
# the model and how it is loaded (model, family, quantize, double_quant, fp32_unquantized, add_pad_token,
# stage-1 compute dtype), the English rows (task, dataset_path, english_path, stage1_file, tydiqa_stage1,
# max_train_examples), how they are encoded (max_length, decoder_alignment), the adapter (r, lora_alpha,
# lora_dropout, lora_modules, modules_to_save) and its optimization (seed: data order and initialization;
# stage-1 lr and epochs, batch_size, warmup_ratio, weight_decay, max_grad_norm, optimizer), and recipe,
# which may set any of these. Left out: how the same steps are computed (micro_batch_size,
# gradient_checkpointing, device; equal up to round-off), stage 2's settings (fusion and its modules,
# languages, stage-2 data, eval options) and the method / eval mode.
STAGE1_FIELDS = (
    "task", "model", "family", "quantize", "double_quant", "fp32_unquantized", "add_pad_token",
    "dataset_path", "english_path", "stage1_file", "tydiqa_stage1", "max_train_examples",
    "max_length", "decoder_alignment", "r", "lora_alpha", "lora_dropout", "lora_modules", "modules_to_save",
    "seed", "batch_size", "warmup_ratio", "weight_decay", "max_grad_norm", "optimizer", "recipe",
)  # fmt: skip


def _stage1_values(cfg) -> dict:
    """The stage-1 settings of a run, derived ones resolved (stage1_learning_rate None = learning_rate ...)."""
    values = {name: getattr(cfg, name) for name in STAGE1_FIELDS}
    values["stage1 learning rate"] = cfg.lr_stage1
    values["stage1 epochs"] = cfg.epochs_stage1
    values["stage1 compute dtype"] = _stage1_dtype(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _stage1_dtype(cfg):
    from .modeling import stage_compute_dtype

    dtype = stage_compute_dtype(cfg, "stage1")
    if dtype is not None:
        return dtype
    return {True: "bf16", False: "fp32", None: None}[cfg.bf16]  # None: bf16 on CUDA, fp32 on CPU, as before


def stage1_dir(run_dir: str | Path, cfg=None) -> Path:
    """The folder holding a run's stage 1 (``stage1/``): its own, or, following --stage1-from, the one it reused."""
    from .restore import read_run_config

    run_dir = Path(run_dir)
    seen = set()
    while True:
        cfg = cfg if cfg is not None else read_run_config(run_dir)
        if cfg.stage1_from is None:
            return run_dir / "stage1"
        seen.add(run_dir.resolve())
        run_dir = Path(cfg.stage1_from)
        if run_dir.resolve() in seen:
            raise ValueError(f"--stage1-from {run_dir}: the runs' --stage1-from settings form a cycle")
        cfg = None


def check_stage1_from(cfg) -> Path:
    """The reused run's ``stage1`` folder, after checking that it is finished and was trained with this run's
    stage-1 settings (one-line ValueError / FileNotFoundError otherwise)."""
    from .restore import read_run_config

    source = Path(cfg.stage1_from)
    option = f"--stage1-from {source}"
    if source.resolve() == Path(cfg.output_dir).resolve():
        raise ValueError(f"{option}: that is this run's own --output-dir; name another run's output dir")
    if not (source / "run_config.json").is_file():
        raise FileNotFoundError(f"{option}: no run_config.json there; name the output dir of a flare train run")
    other = read_run_config(source)
    if "stage1" not in other.stages:
        raise ValueError(f"{option}: that run has no stage 1 (its --stages are {','.join(other.stages)})")
    mine, theirs = _stage1_values(cfg), _stage1_values(other)
    diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
    if diff:
        shown = ", ".join(f"{k}: {a!r} here, {b!r} there" for k, (a, b) in diff.items())
        raise ValueError(f"{option}: its stage 1 was trained with other settings ({shown}); reuse needs the same")
    folder = stage1_dir(source, other)
    if not (folder / "done.json").is_file() or not (folder / "adapter" / "adapter_config.json").is_file():
        raise ValueError(
            f"{option}: its stage 1 is unfinished (no {folder / 'done.json'}); finish it with `flare train --resume "
            f"--output-dir {source}` first"
        )
    return folder


def reused_result(folder: Path):
    """The reused stage's StageResult (from its done.json), marked as run elsewhere."""
    from .loop import StageResult

    result = StageResult(**json.loads((folder / "done.json").read_text()))
    result.from_earlier_run = True
    return result
