"""What a run leaves for a person to read: ``train.log`` (plain text, appended to by every process that
works on the run, resumptions included) and ``curves.png`` (training loss per step of each stage and the
validation score per evaluation), both in the output folder, both written by rank 0 only."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

LOG_FILE = "train.log"
CURVES_FILE = "curves.png"

# A logger of its own that reaches the file only: what goes to the screen is printed there already.
run_log = logging.getLogger("flare.run")
run_log.propagate = False
run_log.setLevel(logging.INFO)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def logging_to(path: Path | None):
    """Append ``run_log`` lines (and warnings of the flare package) to ``path`` while the block runs."""
    if path is None:
        yield
        return
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")  # open(): the mode follows the umask
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    warnings_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    warnings_handler.setLevel(logging.WARNING)
    warnings_handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    package = logging.getLogger("flare")
    run_log.addHandler(handler)
    package.addHandler(warnings_handler)
    try:
        yield
    finally:
        run_log.removeHandler(handler)
        package.removeHandler(warnings_handler)
        handler.close()
        warnings_handler.close()


def plot_curves(path: Path, stages: dict, metric: str) -> Path | None:
    """Loss per optimizer step of each stage (left) and the validation ``metric`` per evaluation (right)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend chosen, no global state touched
    except ImportError:
        run_log.info("curves: matplotlib is not installed, %s not written (pip install matplotlib)", path.name)
        return None
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_val = fig.subplots(1, 2)
    for name, stage in stages.items():
        steps = [h["step"] for h in stage.history]
        ax_loss.plot(steps, [h["loss"] for h in stage.history], label=name)
        if stage.evals:
            ax_val.plot([e["step"] for e in stage.evals], [e["score"] for e in stage.evals], "o-", label=name)
    ax_loss.set(title="training loss", xlabel="optimizer step", ylabel="mean loss")
    ax_val.set(title=f"validation {metric}", xlabel="optimizer step (stage 2)", ylabel=metric)
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, written atomically (temp + rename) with the umask's mode."""
    from ..data.files import follow_umask

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
