"""Rebuild a trained run's model for evaluation (``flare eval``): base model, stage-1 merge, stage-2 adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..tasks import get_task
from .checkpoint import recover_adapter
from .config import TrainConfig
from .distributed import resolve_device
from .modeling import (
    LoadSettings,
    check_model_files,
    detect_family,
    flare_api,
    load_base_model,
    load_tokenizer,
    merged_stage1,
)


def read_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "run_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --run-dir must be the output directory of `flare train`")
    return TrainConfig.from_dict(json.loads(path.read_text()))


def run_adapter(run_dir: Path) -> Path:
    """The adapter the run's test table used: stage2/best when validation selected one, else stage2/adapter."""
    for name in ("best", "adapter"):
        recover_adapter(run_dir / "stage2" / name)  # a save interrupted between its renames
        if (run_dir / "stage2" / name / "adapter_config.json").is_file():
            return run_dir / "stage2" / name
    raise FileNotFoundError(
        f"{run_dir} holds no stage-2 adapter yet (stage2/best or stage2/adapter): the run stopped before stage 2 "
        f"saved one; continue it with `flare train --resume --output-dir {run_dir}`, or pass --adapter"
    )


def run_status(run_dir: str | Path) -> str | None:
    """None for a finished run (results.json written), else a line saying where it stopped."""
    run_dir = Path(run_dir)
    if (run_dir / "results.json").is_file():
        return None
    from .checkpoint import latest_checkpoint

    where = "before stage 2"
    ckpt = latest_checkpoint(run_dir / "stage2" / "checkpoints")
    if ckpt is not None:
        try:
            state = json.loads((ckpt / "state.json").read_text())
            step, total = state["step"], state.get("total_steps")
        except (OSError, ValueError, KeyError):
            step, total = None, None
        if step is not None and total is not None and step >= total:
            where = "after training, during its final test evaluation"
        elif step is not None:
            where = f"inside stage 2, at step {step}" + (f" of {total}" if total else "")
    return (
        f"{run_dir} is an unfinished run (stopped {where}; no results.json): scoring its adapter as it stands. "
        f"Finish it with `flare train --resume --output-dir {run_dir}` and the same settings"
    )


def check_adapter(path: str | Path) -> Path:
    """An adapter folder ``flare eval`` can use: its config present, every tensor file readable and finite.
    A truncated file or a diverged run (NaN weights) fails here in one line naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: not an adapter folder (no adapter_config.json)")
    for file in sorted(path.glob("*.safetensors")):
        try:
            tensors = load_file(str(file))
        except Exception as exc:  # SafetensorError names no file
            raise ValueError(f"{file}: not a readable safetensors file ({exc}); it is truncated or corrupted") from None
        bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise ValueError(
                f"{file}: tensors {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN or infinite values "
                "(the training diverged?): retrain, e.g. with a lower --learning-rate"
            )
    return path


def load_run_model(
    run_dir: str | Path, *, adapter: str | Path | None = None, device: str = "auto", stage: str = "stage2"
):
    """(FlareModel, tokenizer, family, TrainConfig, Task) of a finished run, in eval mode. stage "stage1": the
    stage-1 model (its LoRA adapter over the base, unmerged: what zero-shot / translate-test score)."""
    from .stage1_reuse import stage1_dir

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    task = get_task(cfg.task)
    model_path = cfg.model or str(run_dir / "base")
    check_model_files(model_path, "the run's model")
    family = detect_family(model_path, cfg.family)
    tokenizer = load_tokenizer(model_path, family, add_pad_token=cfg.add_pad_token)
    dev = resolve_device(device)
    settings = LoadSettings.of(cfg, stage)  # loaded as the run loaded it for that stage (pad token, double quant)
    base = load_base_model(model_path, task, family, quantize=cfg.quantize, device=dev, settings=settings,
                           tokenizer=tokenizer)  # fmt: skip
    _, _, load_flare_model = flare_api()
    if "stage1" in cfg.stages:
        stage1 = stage1_dir(run_dir, cfg) / "adapter"  # its own, or the one it reused (--stage1-from)
        if not (stage1 / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{stage1} missing: the run's stage 1 did not finish")
        check_adapter(stage1)
        if stage == "stage1":
            model = load_flare_model(base, str(stage1))
            model.eval()
            return model, tokenizer, family, cfg, task
        base = merged_stage1(base, stage1)
    elif stage == "stage1":
        raise ValueError(f"{run_dir} has no stage 1 (its --stages are {','.join(cfg.stages)})")
    # flare-mt: the run's NLLB (its built-in one under run_dir/mt-base, wherever the run folder now is)
    mt_model = (cfg.mt_model or str(run_dir / "mt-base")) if cfg.method == "flare-mt" else None
    model = load_flare_model(base, str(check_adapter(adapter or run_adapter(run_dir))), mt_model=mt_model)
    model.eval()
    return model, tokenizer, family, cfg, task


def eval_device(model) -> torch.device:
    return next(model.parameters()).device
