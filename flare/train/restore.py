"""Rebuild a trained run's model for evaluation (``flare eval``): base model, stage-1 merge, stage-2 adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..tasks import get_task
from .checkpoint import recover_adapter
from .config import TrainConfig
from .distributed import resolve_device
from .modeling import detect_family, flare_api, load_base_model, load_tokenizer, merged_stage1


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
    raise FileNotFoundError(f"{run_dir} holds no finished stage-2 adapter (stage2/best or stage2/adapter)")


def load_run_model(run_dir: str | Path, *, adapter: str | Path | None = None, device: str = "auto"):
    """(FlareModel, tokenizer, family, TrainConfig, Task) of a finished run, in eval mode."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    task = get_task(cfg.task)
    model_path = cfg.model or str(run_dir / "base")
    family = detect_family(model_path, cfg.family)
    tokenizer = load_tokenizer(model_path, family)
    dev = resolve_device(device)
    base = load_base_model(model_path, task, family, quantize=cfg.quantize, device=dev)
    if "stage1" in cfg.stages:
        stage1 = run_dir / "stage1" / "adapter"
        if not (stage1 / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{stage1} missing: the run's stage 1 did not finish")
        base = merged_stage1(base, stage1)
    _, _, load_flare_model = flare_api()
    model = load_flare_model(base, str(adapter or run_adapter(run_dir)))
    model.eval()
    return model, tokenizer, family, cfg, task


def eval_device(model) -> torch.device:
    return next(model.parameters()).device
