"""``pack``: the packages the GPU image lacks, copied into a folder the device call carries
(``.gpu_site/``, appended to the children's ``sys.path``), and the device command that runs the
check there."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .budget import BUDGET_S
from .layout import PREFIX, REPO, rel, say

# Carried to the GPU machine (pack): importable there only as a fallback, after the image's own.
CARRY_DISTS = ("bitsandbytes", "pytest", "pluggy", "iniconfig", "pygments", "hypothesis", "sortedcontainers")
BNB_KEEP = ("_cpu.so", "_cuda130.so")  # torch 2.11+cu130 there: bitsandbytes loads libbitsandbytes_cuda130
CARRY_LIMIT = 64 * 2**20  # a device call carries at most 64 MiB of working tree + carried paths
COMMAND_LIMIT = 2000


def _dist_files(name: str) -> list[tuple[Path, str]]:
    """(installed file, path relative to site-packages) of one installed distribution."""
    import importlib.metadata as md

    dist = md.distribution(name)
    out = []
    for f in dist.files or ():
        in_site = str(f)
        if in_site.startswith("..") or "__pycache__" in in_site or in_site.endswith(".pyc"):
            continue
        if name == "bitsandbytes" and in_site.endswith(".so") and not in_site.endswith(BNB_KEEP):
            continue  # one CUDA build (the image's CUDA 13.0) and the CPU one: 125 MB -> ~5 MB
        src = Path(dist.locate_file(f))
        if src.is_file():
            out.append((src, in_site))
    return out


def tree_bytes(skip: Path | None = None) -> int:
    """What a device call sends besides the carried paths: tracked + untracked, not ignored files."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, timeout=60, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return 0
    total = 0
    skip = skip.resolve() if skip is not None else None
    for name in filter(None, out.decode().split("\0")):
        p = REPO / name
        if skip is not None and skip in p.resolve().parents:
            continue
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def _exclude(dest: Path) -> str | None:
    """Make git ignore the carried folder (so it travels only when carried); returns what was done."""
    if dest.parent.resolve() != REPO.resolve():
        return None
    pattern = f"/{dest.name}/"
    if subprocess.run(["git", "check-ignore", "-q", dest.name], cwd=REPO).returncode == 0:
        return None
    path = subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    if not path:
        return None
    exclude = REPO / path
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with open(exclude, "a", encoding="utf-8") as f:
        f.write(pattern + "\n")
    return f"added {pattern} to {path}"


def device_command(commit: str, budget_s: float = BUDGET_S, site: str = ".gpu_site") -> str:
    limit = int(budget_s + 90)  # SIGTERM before the call's 10 minutes; the check stops itself at budget_s
    return (f"export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLARE_BENCH_COMMIT={commit}; "
            f"timeout {limit} python3 -m benchmarks.gpu_check run --site {site} --out $OUT --budget-s {budget_s:.0f}")


def pack(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    from ..env import git_commit, now

    dest: Path = args.dest
    if dest.exists():
        if not (dest / "PACKED.json").exists() and any(dest.iterdir()):
            raise SystemExit(f"{dest} exists and was not made by pack (no PACKED.json): not touching it")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    manifest: dict[str, Any] = {"dists": {}, "made": now(), "python_here": sys.version.split()[0]}
    total = 0
    for name in args.dists:
        try:
            files = _dist_files(name)
            version = md.version(name)
        except md.PackageNotFoundError:
            manifest["dists"][name] = "absent here: not carried"
            continue
        size = 0
        for src, in_site in files:
            out = dest / in_site
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
            size += src.stat().st_size
        total += size
        manifest["dists"][name] = {"version": version, "files": len(files), "bytes": size}
    excluded = _exclude(dest)  # first: an unignored .gpu_site would travel twice and count in the tree
    tree = tree_bytes(skip=dest) if args.tree_size else 0
    manifest.update(carried_bytes=total, tree_bytes=tree)
    (dest / "PACKED.json").write_text(json.dumps(manifest, indent=2) + "\n")
    commit = git_commit()
    command = device_command(commit, args.budget_s, rel(dest) if dest.parent == REPO else str(dest))
    for name, info in manifest["dists"].items():
        if isinstance(info, str):
            say(f"  {name}: {info}")
        else:
            say(f"  {name} {info['version']}: {info['files']} files, {info['bytes'] / 2**20:.1f} MiB")
    say(f"carried: {rel(dest)} {total / 2**20:.1f} MiB; working tree {tree / 2**20:.1f} MiB; "
        f"together {(total + tree) / 2**20:.1f} of {CARRY_LIMIT / 2**20:.0f} MiB")  # fmt: skip
    if excluded:
        say(excluded)
    if total + tree > CARRY_LIMIT:
        say("TOO LARGE for one device call: carry fewer packages (--dists)")
        return 1
    if len(command) > COMMAND_LIMIT:
        say(f"the device command is {len(command)} characters, over {COMMAND_LIMIT}")
        return 1
    say("\ndevice tool, run:")
    say(json.dumps({"command": command, "carry": [rel(dest)], "timeout_s": 600}, indent=2))
    say(f"\nthen, with the reply's files_at:\n  python -m benchmarks.gpu_check merge <files_at>/{PREFIX}<device slug>")
    return 0
