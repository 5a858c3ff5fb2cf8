"""The experiment spec of ``flare reproduce``: which tasks, models, methods and seeds make the table.

A spec is a JSON object (YAML too, with PyYAML installed)::

    {
      "tasks":   ["toy", {"task": "xnli", "languages": ["sw", "ur"], "test_translations": "xnli-test-en.jsonl"}],
      "models":  [null, "FacebookAI/xlm-roberta-large", {"name": "llama-3.1-8b", "model": "meta-llama/Llama-3.1-8B"}],
      "methods": ["zero-shot", "translate-test", "lora", "input-fusion", "flare", "flare-mt"],
      "seeds":   [1, 2, 3],
      "overrides":        {"recipe": "paper"},
      "method_overrides": {"flare-mt": {"mt_model": "facebook/nllb-200-3.3B"}},
      "output_dir": "paper"
    }

``null`` as a model is the built-in tiny Llama (toy task only); ``output_dir`` (optional) is where the cells
and the table go unless ``--output-dir`` says otherwise (default: flare-reproduce). Every other key of a task
or model object is a TrainConfig field for that task's (model's) cells; the fields of a cell are, later ones
winning: ``overrides``, the task's, the model's, ``method_overrides[method]``. Paths are taken as written
(relative to the directory ``flare reproduce`` runs in). The fields that make a cell what it is (task, model,
seed, method, eval_mode, stages, stage1_from, output_dir, resume, overwrite) are set by ``flare reproduce`` and
refused here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# The paper's rows, in its order: the two stage-1 baselines, translate-train LoRA, input-level fusion, FLARE,
# FLARE MT. Each maps to the TrainConfig fields that make it (cells.py adds stage1_from).
METHOD_FIELDS: dict[str, dict[str, Any]] = {
    "zero-shot": {"stages": ("stage1",), "eval_mode": "zero-shot"},
    "translate-test": {"stages": ("stage1",), "eval_mode": "translate-test"},
    "lora": {"method": "lora"},
    "input-fusion": {"method": "input-fusion"},
    "flare": {"method": "flare"},
    "flare-mt": {"method": "flare-mt"},
}
METHODS = tuple(METHOD_FIELDS)

# Fields a cell's identity sets: a spec that set them would make two cells of the grid the same run.
SET_BY_REPRODUCE = (
    "task", "model", "seed", "method", "eval_mode", "stages", "stage1_from", "output_dir", "resume", "overwrite",
)  # fmt: skip
KEYS = ("tasks", "models", "methods", "seeds", "overrides", "method_overrides", "output_dir")
BUILTIN_MODEL_NAME = "builtin"
DEFAULT_OUTPUT_DIR = "flare-reproduce"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    fields: dict  # TrainConfig fields for this task's cells (languages, data files, ...)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str  # folder name and table label
    model: str | None  # TrainConfig.model (None: the built-in tiny Llama)
    fields: dict


@dataclasses.dataclass(frozen=True)
class Spec:
    tasks: tuple[TaskSpec, ...]
    models: tuple[ModelSpec, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    overrides: dict
    method_overrides: dict  # method -> fields
    output_dir: str | None = None

    def to_dict(self) -> dict:
        return {
            "tasks": [{"task": t.name, **t.fields} for t in self.tasks],
            "models": [{"name": m.name, "model": m.model, **m.fields} for m in self.models],
            "methods": list(self.methods),
            "seeds": list(self.seeds),
            "overrides": self.overrides,
            "method_overrides": self.method_overrides,
        }


def builtin_spec() -> Spec:
    """The built-in toy experiment: the toy task, the built-in tiny Llama (with the built-in default's
    settings, TrainConfig.builtin), all six methods, two seeds. On 2 CPU cores a cell takes ~10-25 s, the
    14 cells (2 shared stage 1 + 12) a few minutes."""
    return parse_spec(
        {"tasks": ["toy"], "models": [None], "methods": list(METHODS), "seeds": [1, 2]}, "the built-in spec"
    )


def load_spec(path: str | Path) -> Spec:
    """Read and check a spec file (.json, or .yaml / .yml with PyYAML); one-line ValueError when it is bad."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")  # a missing file: FileNotFoundError naming it
    where = f"--spec {path}"
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{where}: a YAML spec needs PyYAML (pip install pyyaml); or write it as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    return parse_spec(data, where)


def parse_spec(data: Any, where: str = "spec") -> Spec:
    def bad(text: str) -> ValueError:
        return ValueError(f"{where}: {text}")

    if not isinstance(data, dict):
        raise bad("expected an object with keys tasks, models, methods, seeds")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise bad(f"unknown keys {unknown}; known: {list(KEYS)}")
    for key in ("tasks", "models", "methods", "seeds"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise bad(f'"{key}" must be a non-empty list')

    tasks = tuple(_task(t, bad) for t in data["tasks"])
    models = tuple(_model(m, bad) for m in data["models"])
    for kind, names in (("task", [t.name for t in tasks]), ("model name", [m.name for m in models])):
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise bad(f"{kind} listed twice: {repeated} (a model needs its own \"name\" to be listed twice)")

    methods = data["methods"]
    for m in methods:
        if m not in METHOD_FIELDS:
            raise bad(f"unknown method {m!r}; known: {list(METHODS)}")
    if len(set(methods)) != len(methods):
        raise bad(f"a method is listed twice in {methods}")
    seeds = data["seeds"]
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise bad(f'"seeds" must be distinct integers, got {seeds}')

    overrides = _fields(data.get("overrides", {}), '"overrides"', bad)
    method_overrides = data.get("method_overrides", {})
    if not isinstance(method_overrides, dict):
        raise bad('"method_overrides" must be an object: method -> {TrainConfig fields}')
    for m, fields in method_overrides.items():
        if m not in METHOD_FIELDS:
            raise bad(f"method_overrides: unknown method {m!r}; known: {list(METHODS)}")
        _fields(fields, f'"method_overrides" of {m}', bad)
    output_dir = data.get("output_dir")
    if output_dir is not None and not isinstance(output_dir, str):
        raise bad(f'"output_dir" must be a path, got {output_dir!r}')
    return Spec(tasks, models, tuple(methods), tuple(seeds), overrides, dict(method_overrides), output_dir)


def _task(entry: Any, bad) -> TaskSpec:
    from ..tasks import TASKS

    if isinstance(entry, str):
        entry = {"task": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("task"), str):
        raise bad(f'a task must be a name or an object with "task", got {entry!r}')
    name = entry["task"]
    if name not in TASKS:
        raise bad(f"unknown task {name!r}; known: {sorted(TASKS)}")
    fields = {k: v for k, v in entry.items() if k != "task"}
    return TaskSpec(name, _fields(fields, f"task {name}", bad))


def _model(entry: Any, bad) -> ModelSpec:
    if entry is None or isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), (str, type(None))):
        raise bad(f'a model must be a hub name, a path, null (built-in) or an object with "model", got {entry!r}')
    model = entry.get("model")
    name = entry.get("name") or (model.rstrip("/").split("/")[-1] if model else BUILTIN_MODEL_NAME)
    if not isinstance(name, str) or "/" in name or name in (".", ".."):
        raise bad(f"model name {name!r} must be a folder name (no '/')")
    fields = {k: v for k, v in entry.items() if k not in ("model", "name")}
    return ModelSpec(name, model, _fields(fields, f"model {name}", bad))


def _fields(fields: Any, what: str, bad) -> dict:
    from ..train.config import TrainConfig

    if not isinstance(fields, dict):
        raise bad(f"{what} must be an object of TrainConfig fields, got {fields!r}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise bad(f"{what}: unknown TrainConfig fields {unknown}")
    reserved = sorted(set(fields) & set(SET_BY_REPRODUCE))
    if reserved:
        raise bad(f"{what}: {reserved} are set by flare reproduce per cell; list tasks, models, methods, seeds instead")
    return dict(fields)
