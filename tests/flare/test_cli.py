"""The `flare` command line: argument errors, the built-in default (shortened), stop/resume, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flare.cli import EXIT_BAD_INPUT, EXIT_STOPPED, main

REPO = Path(__file__).resolve().parents[2]
SHORT = [
    "--epochs",
    "1",
    "--stage1-epochs",
    "1",
    "--max-train-examples",
    "64",
    "--max-eval-examples",
    "8",
    "--no-progress",
]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--lora-dropout", "2"], "lora_dropout (--lora-dropout) must be in [0, 1)"),
        (["train", "--fusion-modules", "q_proj", "--fusion", "none", "--r", "0"], "TrainConfig.r (--r)"),
        (["train", "--task", "xnli"], "needs --model"),
        (["train", "--stages", "stage2,stage3"], "--stages"),
        (["train", "--batch-size", "32", "--micro-batch-size", "5"], "not a multiple"),
        (["train", "--train-file", "/nonexistent/rows.jsonl"], "data file not found"),
        (["train", "--config", "{cfg}"], "unknown TrainConfig fields ['learning_rat']"),
        (["eval", "--run-dir", "/nonexistent/run"], "run_config.json not found"),
    ],
    ids=["dropout", "rank", "model", "stages", "micro-batch", "train-file", "config-file", "eval-run-dir"],
)
def test_bad_arguments_exit_2_with_a_one_line_message(tmp_path, capsys, argv, message):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"learning_rat": 1e-3}))
    argv = [a.replace("{cfg}", str(cfg)) for a in argv] + (
        ["--output-dir", str(tmp_path / "out")] if argv[0] == "train" else []
    )
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_argparse_errors_exit_2(capsys):
    for argv in ([], ["train", "--no-such-flag"], ["train", "--epochs", "many"], ["translate", "--task", "xnli"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


def test_builtin_default_via_cli_stop_and_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--output-dir", out, "--stop-after-steps", "3", *SHORT]) == EXIT_STOPPED
    assert "stopped stage2 at step 1" in capsys.readouterr().err  # stage 1 has 2 steps
    assert main(["train", "--output-dir", out, "--resume", *SHORT]) == 0
    text = capsys.readouterr().out
    assert "stage1: 2 steps, finished by an earlier run" in text  # 64 rows // 32, both stages
    assert "stage2: 1 step in" in text and "(resumed at step 1; 2 steps in all)" in text
    assert "toy / test" in text and "avg" in text and "results:" in text
    summary = json.loads((Path(out) / "results.json").read_text())
    assert len(summary["stages"]["stage1"]["loss_curve"]) == 2
    # the finished run again without --overwrite: refused like every other run, the run kept
    assert main(["train", "--output-dir", out, *SHORT]) == EXIT_BAD_INPUT
    assert "already holds files" in capsys.readouterr().err and (Path(out) / "results.json").is_file()


def test_sigint_checkpoints_at_the_step_boundary_and_resume_finishes(tmp_path, monkeypatch, capsys):
    import flare.train.loop as loop

    real = loop.Progress.update
    seen = {"n": 0}

    def update(self, *args, **kwargs):
        seen["n"] += 1
        if seen["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the first step
        return real(self, *args, **kwargs)

    monkeypatch.setattr(loop.Progress, "update", update)
    out = str(tmp_path / "run")
    assert main(["train", "--output-dir", out, *SHORT]) == EXIT_STOPPED
    assert "SIGINT: stopped stage1 at step 1" in capsys.readouterr().err  # the step finished, then a checkpoint
    assert (Path(out) / "stage1" / "checkpoints" / "step-00000001" / "state.json").is_file()
    monkeypatch.setattr(loop.Progress, "update", real)
    assert main(["train", "--output-dir", out, "--resume", *SHORT]) == 0
    capsys.readouterr()


def test_module_entry_point_runs_in_a_fresh_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "flare.cli", "train", "--help"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and "--learning-rate" in proc.stdout and "built-in default" in proc.stdout
