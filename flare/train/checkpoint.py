"""Checkpoints that survive interruption and resume a run exactly.

A checkpoint is a directory ``step-XXXXXXXX`` holding
    trainable.safetensors   every trainable tensor (adapter, modules_to_save), by parameter name
    optimizer.pt            the optimizer's state_dict (tensors and numbers; read with weights_only=True)
    rng-rank<R>.safetensors + rng-rank<R>.json   each process's torch / CUDA / Python / NumPy RNG states
    state.json              step, loss and evaluation history, best score so far
It is written under a hidden temporary name and renamed into place once complete, so a crash leaves
either the previous checkpoints or the new one, never a partial directory that resume would read.
The data order needs no state: it is a function of (seed, stage, epoch), and the step number says
where in it the run stands; the learning rate is a function of the step too.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data.files import atomic_write_text, follow_umask

_PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, tensors: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model's trainable parameters: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} (was the run started with another adapter configuration?)"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"checkpoint tensor {name} has shape {tuple(value.shape)}, model has {tuple(params[name].shape)}"
                )
            params[name].copy_(value)


# ------------------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(np_keys, dtype=np.uint32).view(np.int32).copy())
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, gauss_value = meta["numpy"]
    keys = tensors["numpy_keys"].numpy().view(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, gauss_value))


# ------------------------------------------------------------------------------------- save / load
def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(dirs, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: Path, step: int, model, optimizer, state: dict, dist, keep: int) -> Path:
    """Write checkpoint ``step`` atomically (all processes call this; rank 0 owns the shared files)."""
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".{_PREFIX}{step:08d}.tmp"
    if final.exists():  # e.g. the checkpoint a resumed run started from: same content
        return final
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier write of this step
        tmp.mkdir()
    dist.barrier()
    tensors, meta = rng_state()
    save_file(tensors, str(tmp / f"rng-rank{dist.rank}.safetensors"))
    (tmp / f"rng-rank{dist.rank}.json").write_text(json.dumps(meta))
    dist.barrier()
    if dist.is_main:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": dist.world, **state}, indent=1))
        follow_umask(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, dist, device: torch.device) -> dict:
    """Restore parameters, optimizer and this process's RNG; returns state.json's content."""
    state = json.loads((path / "state.json").read_text())
    if state.get("world_size", 1) != dist.world:
        raise ValueError(
            f"{path} was written by {state.get('world_size')} processes but this run has {dist.world}: resume "
            "with the same number of processes (the per-process data slices and RNG streams depend on it)"
        )
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    rng_file = path / f"rng-rank{dist.rank}.safetensors"
    set_rng_state(load_file(str(rng_file)), json.loads(rng_file.with_suffix(".json").read_text()))
    return state


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _swap_names(path: Path) -> tuple[Path, Path]:
    return path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")


def recover_adapter(path: Path) -> None:
    """Finish a ``save_adapter`` interrupted between its two renames: ``path`` gone, the previous
    adapter still whole under its ``.old`` name. Idempotent; nothing to do in every other state."""
    path = Path(path)
    _, old = _swap_names(path)
    if not path.exists() and old.exists():
        os.replace(old, path)
        _fsync_dir(path.parent)


def save_adapter(model, path: Path, readme: str | None = None) -> Path:
    """The adapter in PEFT's layout (``model.save_pretrained``) plus ``trainable.safetensors`` (every
    trainable tensor by parameter name, for an exact in-place restore), replacing ``path`` atomically.
    ``readme``: the text of a README.md beside them (how to load the adapter)."""
    path = Path(path)
    tmp, old = _swap_names(path)
    recover_adapter(path)  # else the cleanup below would delete the only copy of the previous adapter
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    model.save_pretrained(str(tmp))
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    if readme:
        (tmp / "README.md").write_text(readme, encoding="utf-8")
    follow_umask(tmp)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


def restore_adapter(model, path: Path) -> None:
    """Put the trainable tensors saved by ``save_adapter`` back into ``model``."""
    load_trainable_state(model, load_file(str(Path(path) / "trainable.safetensors")))
