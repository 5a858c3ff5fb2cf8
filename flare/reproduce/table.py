"""The results of the grid: ``results.csv`` (every score of every finished cell) and ``table.md`` (the paper's
layout: per task and model, one row per method, one column per language and the average, each the mean over
seeds +- their standard deviation; then the average over tasks per model and method, the paper's headline).

Averages are unweighted, as the paper's: a task's average is the mean over its languages (results.json's
``average``); the average over tasks is the mean of the task averages, taken per seed, then over seeds. The
standard deviation is the sample one (n - 1) over seeds, shown when there are at least two.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import statistics

from .cells import STAGE1, Cell, results_test
from .spec import Spec

CSV_COLUMNS = ("task", "model", "method", "seed", "language", "metric", "score")
AVERAGE = "average"  # the language column of a cell's average over its languages


@dataclasses.dataclass
class Scores:
    """The finished cells' test tables, by (task, model, method, seed)."""

    spec: Spec
    tables: dict[tuple[str, str, str, int], dict]  # -> results.json's "test"

    @classmethod
    def collect(cls, spec: Spec, cells: list[Cell]) -> "Scores":
        tables = {}
        for cell in cells:
            if cell.method == STAGE1:
                continue
            test = results_test(cell)
            if test is not None:
                tables[(cell.task, cell.model, cell.method, cell.seed)] = test
        return cls(spec, tables)

    def primary(self, task: str) -> str:
        """The task's metric (XNLI accuracy, TyDiQA exact match, NusaX macro-F1), as results.json's ``primary``."""
        from ..tasks import get_task

        return get_task(task).metric

    def languages(self, task: str, model: str) -> list[str]:
        """The languages the spec asks for (the task's own when it names none), then any others scored."""
        from ..tasks import get_task

        spec = self.spec
        fields = {**spec.overrides, **_named(spec.tasks, task).fields, **_named(spec.models, model).fields}
        seen = dict.fromkeys(fields.get("languages") or get_task(task).languages)
        for (tk, md, *_), t in self.tables.items():
            if (tk, md) == (task, model):
                seen.update(dict.fromkeys(t["per_language"]))
        return list(seen)

    def value(self, task: str, model: str, method: str, seed: int, language: str) -> float | None:
        t = self.tables.get((task, model, method, seed))
        if t is None:
            return None
        metric = t["primary"]
        if language == AVERAGE:
            return t["average"][metric]
        return t["per_language"].get(language, {}).get(metric)

    def task_average(self, model: str, method: str, seed: int) -> float | None:
        """Mean over the spec's tasks of this seed's task averages (None unless every task is finished)."""
        values = [self.value(t.name, model, method, seed, AVERAGE) for t in self.spec.tasks]
        return None if any(v is None for v in values) else sum(values) / len(values)


def _named(items, name: str):
    return next(item for item in items if item.name == name)


# ------------------------------------------------------------------------------------- CSV
def csv_text(scores: Scores) -> str:
    """One row per (task, model, method, seed, language, metric), every metric of the task, languages then
    the cell's average (language ``average``), in the spec's order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for (task, model, method, seed), t in _in_spec_order(scores):
        for lang, values in t["per_language"].items():
            for metric, v in values.items():
                if metric != "n":
                    writer.writerow((task, model, method, seed, lang, metric, f"{v:.4f}"))
        for metric, v in t["average"].items():
            writer.writerow((task, model, method, seed, AVERAGE, metric, f"{v:.4f}"))
    return out.getvalue()


def _in_spec_order(scores: Scores):
    spec = scores.spec
    for task in spec.tasks:
        for model in spec.models:
            for method in spec.methods:
                for seed in spec.seeds:
                    key = (task.name, model.name, method, seed)
                    if key in scores.tables:
                        yield key, scores.tables[key]


# ------------------------------------------------------------------------------------- Markdown
def cell_text(values: list[float], seeds: int) -> str:
    """mean +- std over the seeds that finished; '–' when none did; '(k of n seeds)' while some are missing."""
    if not values:
        return "–"
    text = f"{statistics.fmean(values):.2f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.2f}"
    if len(values) < seeds:
        text += f" ({len(values)} of {seeds} seeds)"
    return text


def markdown(scores: Scores, output_dir: str) -> str:
    spec = scores.spec
    n = len(spec.seeds)
    seeds = ", ".join(map(str, spec.seeds))
    spread = "mean ± sample standard deviation over" if n > 1 else "one seed:"
    lines = [
        "# Test scores",
        "",
        f"Written by `flare reproduce` into `{output_dir}`: {spread} seeds {seeds}; unweighted averages over "
        "languages and tasks, as in the paper; – : not finished yet. Every score is in results.csv.",
    ]
    for task in spec.tasks:
        for model in spec.models:
            metric = scores.primary(task.name)
            langs = scores.languages(task.name, model.name)
            columns = langs + [AVERAGE]
            lines += ["", f"## {task.name} · {model.name} · {metric}", ""]
            lines += _table_head(["method", *columns])
            for method in spec.methods:
                row = [method]
                for lang in columns:
                    vals = [scores.value(task.name, model.name, method, s, lang) for s in spec.seeds]
                    row.append(cell_text([v for v in vals if v is not None], n))
                lines.append(_row(row))
    tasks = [t.name for t in spec.tasks]
    metrics = ", ".join(f"{t} {scores.primary(t)}" for t in tasks)
    lines += ["", f"## Average over tasks ({metrics})", ""]
    lines += _table_head(["model", "method", *tasks, AVERAGE])
    for model in spec.models:
        for method in spec.methods:
            row = [model.name, method]
            for task in tasks:
                vals = [scores.value(task, model.name, method, s, AVERAGE) for s in spec.seeds]
                row.append(cell_text([v for v in vals if v is not None], n))
            vals = [scores.task_average(model.name, method, s) for s in spec.seeds]
            row.append(cell_text([v for v in vals if v is not None], n))
            lines.append(_row(row))
    return "\n".join(lines) + "\n"


def _table_head(columns: list[str]) -> list[str]:
    align = ["---" if i == 0 or c in ("method", "model") else "---:" for i, c in enumerate(columns)]
    return [_row(columns), _row(align)]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
