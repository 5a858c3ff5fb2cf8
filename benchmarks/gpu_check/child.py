"""Child processes with a deadline: SIGTERM at the phase's stop time, SIGKILL a grace later.

A child runs in its own process group, its output echoed (and copied to a log), and starts with
the carried site (``pack``) at the end of ``sys.path``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .layout import REPO

# A child gets SIGTERM this long before its phase's deadline (benchmarks.run closes its files) and
# SIGKILL this long after it: a phase overruns by at most STOP_AFTER_S, which RESERVE_S absorbs.
STOP_BEFORE_S = 8.0
STOP_AFTER_S = 7.0
STOP_GRACE_S = STOP_BEFORE_S + STOP_AFTER_S

# A child process starts with the carried site at the END of sys.path (the image's packages win).
_BOOT = (
    "import os, runpy, sys; s = os.environ.get('FLARE_GPU_SITE'); s and sys.path.append(s); "
    "m = sys.argv[1]; sys.argv = [m, *sys.argv[2:]]; runpy.run_module(m, run_name='__main__', alter_sys=True)"
)


def child_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-c", _BOOT, module, *args]


def child_env(site: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    if site is not None and site.is_dir():
        env["FLARE_GPU_SITE"] = str(site)
    env.update(extra or {})
    return env


def run_child(cmd: list[str], env: dict[str, str], *, stop_at: float, kill_at: float | None = None,
              log: Path | None = None, prefix: str = "  ") -> dict:  # fmt: skip
    """Run ``cmd`` in its own process group, echoing its output (and copying it to ``log``).

    At ``stop_at`` it gets SIGTERM (benchmarks.run and the measuring child then close their files),
    at ``kill_at`` (default ``stop_at`` + a grace) SIGKILL.
    """
    kill_at = stop_at + STOP_GRACE_S if kill_at is None else kill_at  # SIGTERM at stop_at, SIGKILL at kill_at
    sink = open(log, "w", encoding="utf-8") if log else None
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)  # fmt: skip

    tail: list[str] = []

    def pump():
        for line in proc.stdout:
            if sink:
                sink.write(line)
                sink.flush()
            print(prefix + line, end="", flush=True)
            tail.append(line.rstrip("\n"))
            del tail[:-40]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    out = {"rc": None, "terminated": False, "killed": False}
    try:
        while proc.poll() is None:
            now = time.time()
            if now >= kill_at:
                _signal(proc, signal.SIGKILL)
                out["killed"] = True
                break
            if now >= stop_at and not out["terminated"]:
                _signal(proc, signal.SIGTERM)
                out["terminated"] = True
            time.sleep(0.2)
    except BaseException:
        _signal(proc, signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
        raise
    finally:
        out["rc"] = proc.wait()
        reader.join(5)
        if sink:
            sink.close()
        out["tail"] = tail
    return out


def tagged(res: dict, tag: str) -> dict | None:
    """The JSON a child printed on its last line starting with ``tag``."""
    for line in reversed(res.get("tail", [])):
        if line.startswith(tag + " "):
            try:
                return json.loads(line[len(tag) + 1 :])
            except ValueError:
                return None
    return None


def brief(res: dict) -> dict:
    """A child's result for the record: exit status, and its last lines when it failed."""
    out = {k: v for k, v in res.items() if k != "tail"}
    if res.get("rc") not in (0, None) or res.get("killed"):
        out["last_lines"] = res.get("tail", [])[-10:]
    return out


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child's own group (start_new_session): nothing else
    except (ProcessLookupError, PermissionError):
        pass
