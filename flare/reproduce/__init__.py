"""``flare reproduce``: the paper's comparison as one command.

    spec.py     the experiment spec (tasks, models, methods, seeds, overrides) and the built-in toy one
    cells.py    one TrainConfig per (task, model, method, seed), the shared stage 1, each cell's status
    runner.py   run the missing cells in this process (resume, refuse changed ones), write the outputs
    table.py    results.csv and table.md in the paper's layout
    plot.py     averages.png

    from flare.reproduce import builtin_spec, load_spec, reproduce
    reproduce(builtin_spec(), "flare-reproduce")
"""

from .runner import ReproduceStopped, Summary, reproduce
from .spec import METHODS, Spec, builtin_spec, load_spec, parse_spec

__all__ = ["METHODS", "ReproduceStopped", "Spec", "Summary", "builtin_spec", "load_spec", "parse_spec", "reproduce"]
