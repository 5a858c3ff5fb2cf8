"""``merge``: a fetched gpu-check folder copied into benchmarks/results, the plots and the README's
benchmark tables regenerated."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .layout import FILES, PREFIX, rel, say


def find_folder(src: Path) -> Path:
    """The fetched gpu-check folder: ``src`` itself, or the one gpu-check-* folder inside it."""
    if (src / FILES["record"]).exists():
        return src
    found = [p for p in sorted(src.glob(f"{PREFIX}*")) if (p / FILES["record"]).exists()]
    if len(found) != 1:
        raise SystemExit(f"{src}: expected one {PREFIX}* folder with {FILES['record']}, found {len(found)}")
    return found[0]


def merge(args: argparse.Namespace) -> int:
    from ..results import read

    folder = find_folder(args.folder)
    record = json.loads((folder / FILES["record"]).read_text())
    if record.get("dry_run") and not args.allow_dry_run:
        raise SystemExit(f"{folder} is a dry run: nothing measured to merge (--allow-dry-run to copy it anyway)")
    if (folder / FILES["results"]).exists():
        read(folder / FILES["results"])  # the schema, or ValueError before anything is copied
    dest = args.results / folder.name
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in FILES.values():
        if (folder / name).exists():
            shutil.copy2(folder / name, dest / name)
            copied.append(name)
    say(f"merged {len(copied)} files into {rel(dest)}: {', '.join(copied)}")
    if (dest / FILES["results"]).exists() and not args.no_plots:
        from .. import plots

        for p in plots.plot_all(dest):
            say(f"plot: {rel(p)}")
    if not args.no_summary:
        from .. import summary

        if summary.update_readme(readme=args.readme, root=args.results):
            say(f"{rel(args.readme)}: benchmark tables regenerated (python -m benchmarks.summary)")
    return 0
