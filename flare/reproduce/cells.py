"""The cells of the grid: one TrainConfig per (task, model, method, seed), and where each one stands.

    <output_dir>/cells/<task>/<model>/stage1/seed-<s>/     the English stage 1 of (task, model, seed), trained once
    <output_dir>/cells/<task>/<model>/<method>/seed-<s>/   a flare train run reusing it (stage1_from)

Every method of one (task, model, seed) starts from the same stage 1, as in the paper: zero-shot and
translate-test score it directly, the others train their stage 2 on top of it. A cell's folder is an ordinary
``flare train`` output folder (run_config.json, results.json, train.log, ...).

Status: ``todo`` (never started), ``partial`` (started, not finished: resumed on the next run), ``done`` (a
method cell's results.json holds a test table; the stage-1 cell's stage 1 is saved and its results.json
written), ``changed`` (its run_config.json differs from what the spec asks now: refused unless --overwrite; a
finished stage-1 cell counts as changed only when its stage-1 settings differ, see stage1_reuse.STAGE1_FIELDS).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..train.config import TrainConfig
from .spec import METHOD_FIELDS, ModelSpec, Spec, TaskSpec

STAGE1 = "stage1"  # the shared stage-1 cell's "method" folder
STATUSES = ("done", "partial", "todo", "changed")


@dataclasses.dataclass(frozen=True)
class Cell:
    task: str
    model: str  # ModelSpec.name
    method: str  # one of spec.METHODS, or STAGE1
    seed: int
    config: TrainConfig

    @property
    def name(self) -> str:
        return f"{self.task}/{self.model}/{self.method}/seed-{self.seed}"

    @property
    def path(self) -> Path:
        return Path(self.config.output_dir)


def cell_dir(root: Path, task: str, model: str, method: str, seed: int) -> Path:
    return root / "cells" / task / model / method / f"seed-{seed}"


def build_cells(spec: Spec, output_dir: str | Path) -> list[Cell]:
    """All cells in run order: per (task, model, seed) the stage-1 cell first, then the spec's methods.
    Every TrainConfig is built (and so checked) here, before anything runs: a bad field names its cell."""
    # Absolute: stage1_from is stored in each run_config.json and must mean the same folder from any cwd.
    root = Path(output_dir).resolve()
    cells = []
    for task in spec.tasks:
        for model in spec.models:
            for seed in spec.seeds:
                stage1 = cell_dir(root, task.name, model.name, STAGE1, seed)
                shared = _cell(spec, task, model, STAGE1, seed, {"stages": ("stage1",), "output_dir": str(stage1)})
                cells.append(shared)
                for method in spec.methods:
                    fields = {
                        **spec.method_overrides.get(method, {}),
                        **METHOD_FIELDS[method],
                        "stage1_from": str(stage1),
                        "output_dir": str(cell_dir(root, task.name, model.name, method, seed)),
                    }
                    cells.append(_cell(spec, task, model, method, seed, fields))
                    _check_shared_stage1(cells[-1], shared)
    return cells


def _check_shared_stage1(cell: Cell, stage1: Cell) -> None:
    """A method's overrides must leave stage 1 alone: every method of (task, model, seed) reuses one stage 1
    (flare train would refuse the reuse anyway, but only when it reaches that cell)."""
    from ..train.stage1_reuse import _stage1_values

    mine, shared = _stage1_values(cell.config), _stage1_values(stage1.config)
    diff = {k: (v, shared[k]) for k, v in mine.items() if v != shared[k]}
    if diff:
        raise ValueError(
            f"cell {cell.name}: method_overrides change stage-1 settings {diff}, but all methods share one stage 1; "
            "set them in overrides (or the task's / model's fields) instead"
        )


def _cell(spec: Spec, task: TaskSpec, model: ModelSpec, method: str, seed: int, fields: dict) -> Cell:
    values = {**spec.overrides, **task.fields, **model.fields, **fields}
    values.update(task=task.name, model=model.model, seed=seed)
    name = f"{task.name}/{model.name}/{method}/seed-{seed}"
    try:
        # The built-in tiny Llama on the toy task takes the built-in default's settings (lr 5e-3, 6 + 5
        # epochs, as `flare train` does with no --model); the spec's fields override them.
        builtin = model.model is None and task.name == "toy"
        config = TrainConfig.builtin(**values) if builtin else TrainConfig.from_dict(values)
    except ValueError as exc:
        raise ValueError(f"cell {name}: {exc}") from None
    return Cell(task.name, model.name, method, seed, config)


# ------------------------------------------------------------------------------------- status
def stored_config(cell: Cell) -> dict | None:
    path = cell.path / "run_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # unreadable: differs from anything the spec asks


def differences(cell: Cell) -> dict[str, tuple]:
    """Fields whose stored value (run_config.json) differs from what the spec asks now (now, stored).
    stage1_from is left out: it is derived from the output folder, not from the spec, and the stage-1
    cell it names is compared on its own."""
    stored = stored_config(cell)
    if stored is None:
        return {}
    try:
        previous = TrainConfig.from_dict(stored)
    except ValueError:  # written by another version of flare, or edited by hand
        return {"run_config.json": ("a valid TrainConfig", "unreadable")}
    diff = cell.config.differences(previous)
    diff.pop("stage1_from", None)
    if cell.method == STAGE1 and diff and is_finished(cell):
        # A finished stage 1 serves every spec that asks for the same stage-1 settings: a change of stage-2
        # settings (epochs, fusion, languages, ...) reruns the method cells, not the costliest stage.
        from ..train.stage1_reuse import _stage1_values

        now, before = _stage1_values(cell.config), _stage1_values(previous)
        return {k: (now[k], before[k]) for k in now if now[k] != before[k]}
    return diff


def results_test(cell: Cell) -> dict | None:
    """The test table in the cell's results.json (None: not there yet)."""
    path = cell.path / "results.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("test")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def is_finished(cell: Cell) -> bool:
    if cell.method == STAGE1:
        return (cell.path / "results.json").is_file() and (cell.path / "stage1" / "done.json").is_file()
    return results_test(cell) is not None


def status(cell: Cell) -> str:
    if stored_config(cell) is None:
        return "todo"
    if differences(cell):
        return "changed"
    return "done" if is_finished(cell) else "partial"
