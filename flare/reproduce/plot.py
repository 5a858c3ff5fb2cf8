"""``averages.png``: a bar per method and model, its average over tasks (mean over seeds, the seeds'
standard deviation as the error bar): the paper's headline comparison at a glance."""

from __future__ import annotations

import statistics
from pathlib import Path

from .table import Scores


def plot_averages(path: Path, scores: Scores) -> Path | None:
    """Write the bar plot atomically; None (nothing written) without matplotlib or without a finished method."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        return None
    from ..train.report import save_figure

    spec = scores.spec
    methods, models = list(spec.methods), list(spec.models)
    bars = {}  # (model, method) -> (mean, std)
    for model in models:
        for method in methods:
            values = [v for s in spec.seeds if (v := scores.task_average(model.name, method, s)) is not None]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                bars[model.name, method] = (statistics.fmean(values), std)
    if not bars:
        return None

    fig = Figure(figsize=(max(6.0, 1.1 * len(methods) * max(1, len(models)) ** 0.5 + 2), 4))
    ax = fig.subplots()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        xs, heights, errors = [], [], []
        for j, method in enumerate(methods):
            if (model.name, method) in bars:
                mean, std = bars[model.name, method]
                xs.append(j - 0.4 + width * (i + 0.5))
                heights.append(mean)
                errors.append(std)
        ax.bar(xs, heights, width, yerr=errors, capsize=3, label=model.name)
    tasks = ", ".join(f"{t.name} ({scores.primary(t.name)})" for t in spec.tasks)
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    seeds = ", ".join(map(str, spec.seeds))
    ax.set(ylabel="average test score (%)", title=f"average over tasks: {tasks}; seeds {seeds}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="model", fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)
