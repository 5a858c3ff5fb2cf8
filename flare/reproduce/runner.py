"""Run what is missing of the grid, one cell after another in this process, then write the table.

A finished cell is never rerun; a started one is resumed (``resume=True``: its last checkpoint, or a finished
stage 1 kept); one whose run_config.json differs from the spec is refused before anything runs, unless
``overwrite`` (then it starts afresh with ``overwrite=True``). A Ctrl-C stops the cell at its next step
boundary with a checkpoint (flare train's own handling), and ``ReproduceStopped`` leaves; the same command
continues. Whatever happens, the files of the finished cells are written before returning.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from ..train.checkpoint import write_json
from .cells import STAGE1, Cell, build_cells, differences, results_test, status
from .plot import plot_averages
from .spec import DEFAULT_OUTPUT_DIR, Spec
from .table import Scores, csv_text, markdown

RESULTS_CSV, TABLE_MD, PLOT_PNG, SPEC_JSON = "results.csv", "table.md", "averages.png", "spec.json"


class ReproduceStopped(Exception):
    """A cell stopped early with a checkpoint (Ctrl-C, SIGTERM, stop_after_steps): exit code 3, rerun to go on."""


@dataclasses.dataclass
class Summary:
    output_dir: Path
    cells: list[Cell]
    before: dict[str, str]  # cell name -> status when the command started
    ran: list[str]  # cells this call trained or evaluated
    files: list[Path]  # what it wrote at the top of output_dir


def reproduce(
    spec: Spec, output_dir: str | Path | None = None, *, dry_run: bool = False, overwrite: bool = False, echo=print
) -> Summary:
    """Run the missing cells of ``spec`` into ``output_dir`` (None: the spec's, else flare-reproduce/) and
    write results.csv, table.md and averages.png there. ``dry_run``: list the cells and their status only."""
    from ..train.runner import check_output_dir

    out = Path(output_dir or spec.output_dir or DEFAULT_OUTPUT_DIR)
    cells = build_cells(spec, out)  # every TrainConfig checked: a bad field fails here, naming its cell
    before = {c.name: status(c) for c in cells}
    if dry_run:
        _list(cells, before, out, echo)
        return Summary(out, cells, before, [], [])
    changed = [c for c in cells if before[c.name] == "changed"]
    if changed and not overwrite:
        first = changed[0]
        others = f" and {len(changed) - 1} more cells" if len(changed) > 1 else ""
        raise ValueError(
            f"cell {first.name}{others} ran with other settings than the spec asks now {differences(first)} (now, "
            "before); pass --overwrite to rerun them, or choose another --output-dir"
        )
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SPEC_JSON, spec.to_dict())

    todo = [c for c in cells if before[c.name] != "done"]
    if len(todo) < len(cells):
        echo(f"{len(cells) - len(todo)} of {len(cells)} cells finished by an earlier run; {len(todo)} to run")
    progress = all(c.config.progress for c in cells)
    ran: list[str] = []
    try:
        _run(todo, before, progress, ran, echo)
    finally:
        files = write_outputs(spec, cells, out)
    return Summary(out, cells, before, ran, files)


def _run(todo: list[Cell], before: dict[str, str], progress: bool, ran: list[str], echo) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(todo, desc="cells", unit="cell", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    cell = None
    try:
        for cell in bar:
            _run_cell(cell, before[cell.name], bar if progress else None, echo)
            ran.append(cell.name)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop (a model loading, between cells)
        where = f"cell {cell.name}" if cell is not None else "before the first cell"
        raise ReproduceStopped(f"{where}: interrupted; run the same flare reproduce command again to go on") from None
    finally:
        bar.close()


def _run_cell(cell: Cell, state: str, bar, echo) -> None:
    from ..train import train
    from ..train.loop import TrainingStopped

    if bar is not None:
        bar.set_postfix_str(cell.name, refresh=True)
    # resume=True continues a started run from its checkpoint (or its saved stage 1); overwrite=True clears
    # a run made with other settings (only reached with --overwrite).
    cfg = dataclasses.replace(cell.config, resume=state == "partial", overwrite=state == "changed")
    t0 = time.perf_counter()
    try:
        train(cfg)
    except TrainingStopped as stop:
        raise ReproduceStopped(
            f"cell {cell.name}: {stop.reason}: stopped {stop.stage} at step {stop.step} with a checkpoint; run "
            "the same flare reproduce command again to continue"
        ) from None
    except (ValueError, OSError) as exc:
        text = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
        raise ValueError(f"cell {cell.name}: {text}") from exc
    line = f"{cell.name}: {_outcome(cell)}, {time.perf_counter() - t0:.1f} s"
    if state == "partial":
        line += " (resumed)"
    if bar is not None:
        bar.write(line, file=sys.stdout)  # above the bars, not through them
    else:
        echo(line)


def _outcome(cell: Cell) -> str:
    if cell.method == STAGE1:
        done = json.loads((cell.path / "stage1" / "done.json").read_text())
        return f"stage 1 trained ({done['steps']} steps)"
    test = results_test(cell)
    if test is None:
        return "finished without a test table"
    metric = test["primary"]
    langs = ", ".join(f"{lang} {v[metric]:.2f}" for lang, v in test["per_language"].items())
    return f"{metric} {test['average'][metric]:.2f} ({langs})"


def _list(cells: list[Cell], before: dict[str, str], out: Path, echo) -> None:
    counts = {s: sum(1 for v in before.values() if v == s) for s in ("done", "partial", "todo", "changed")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    echo(f"{len(cells)} cells in {out.resolve()} ({summary}); --dry-run: nothing run or written")
    for cell in cells:
        state = before[cell.name]
        note = f"  differs in {differences(cell)} (now, before): --overwrite reruns it" if state == "changed" else ""
        echo(f"  {state:<8} {cell.name}{note}")


def write_outputs(spec: Spec, cells: list[Cell], out: Path) -> list[Path]:
    """results.csv, table.md and averages.png from the finished cells, each written atomically."""
    from ..data.files import atomic_write_text

    scores = Scores.collect(spec, cells)
    atomic_write_text(out / RESULTS_CSV, csv_text(scores))
    atomic_write_text(out / TABLE_MD, markdown(scores, str(out)))
    files = [out / RESULTS_CSV, out / TABLE_MD]
    if plot_averages(out / PLOT_PNG, scores) is not None:
        files.append(out / PLOT_PNG)
    return files
