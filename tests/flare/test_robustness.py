"""What a new user runs into (issue 10): no default deletes a run, bad values fail before any work in one
line with exit code 2, files follow the umask, a stopped run says so, interrupted renames are cleaned up,
the CLI explains itself, a run leaves a log file and its curves. One short built-in run (2 + 2 steps) is
shared by the tests that only read it; those that change a run work on a copy."""

import contextlib
import io
import json
import os
import shutil
import signal
import stat
import warnings
from pathlib import Path

import pytest
import torch

from flare.cli import EXIT_BAD_INPUT, EXIT_STOPPED, build_parser, main
from flare.data import read_rows, write_jsonl
from flare.default.sample import load_sample
from flare.train import TrainConfig, train

SHORT = ["--epochs", "1", "--stage1-epochs", "1", "--max-train-examples", "64", "--max-eval-examples", "8"]
QUIET = [*SHORT, "--no-progress"]


def short_config(path, **kw):
    values = dict(
        output_dir=str(path), stage1_epochs=1, epochs=1, max_train_examples=64, max_eval_examples=8, progress=False
    )
    values.update(kw)
    return TrainConfig.builtin(**values)


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The built-in default, shortened, run through the CLI under umask 002 with --no-progress."""
    out = tmp_path_factory.mktemp("finished") / "run"
    previous = os.umask(0o002)
    try:
        code, stdout, stderr = run_cli(["train", "--output-dir", str(out), *QUIET])
    finally:
        os.umask(previous)
    assert code == 0, stderr
    return out, stdout, stderr


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst, symlinks=True)
    return dst


# ------------------------------------------------------------------------ 1, 19: no default deletes a run
def test_1_builtin_default_refuses_an_existing_run_and_19_overwrite_leaves_a_clean_folder(
    finished_run, tmp_path, caplog
):
    run = copy_run(finished_run[0], tmp_path)
    before = (run / "results.json").read_bytes()
    code, _, err = run_cli(["train", "--output-dir", str(run), *QUIET])  # the built-in default, no --overwrite
    assert code == EXIT_BAD_INPUT
    one_line_error(err, "already holds files", "--overwrite")
    assert (run / "results.json").read_bytes() == before and (run / "stage1" / "adapter").is_dir()

    (run / "eval-test.json").write_text("{}")  # from an earlier `flare eval`
    (run / "notes.txt").write_text("mine")  # not flare's: stays
    code, _, err = run_cli(["train", "--output-dir", str(run), "--overwrite", *QUIET])
    assert code == 0, err
    assert not (run / "eval-test.json").exists() and (run / "notes.txt").read_text() == "mine"
    assert "notes.txt" in caplog.text  # said, not deleted


# ------------------------------------------------------------------------ 2, 3, 7, 14, 15, 16: data checked
def test_2_labels_outside_the_task_classes_fail_before_training_naming_the_row(tmp_path):
    rows = load_sample("train")[:64]
    rows[7]["label"] = 5
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match=r"row 7 \(id 'train-0007'\): label 5 is outside the task's 3 classes") as e:
        train(short_config(tmp_path / "out", train_file=str(tmp_path / "train.jsonl")))
    assert "0 = negative, 1 = neutral, 2 = positive" in str(e.value)
    assert not (tmp_path / "out").exists()
    # a test file too: the same label was scored as a wrong prediction
    write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(ValueError, match="label 5 is outside"):
        train(short_config(tmp_path / "out", test_file=str(tmp_path / "test.jsonl")))
    assert not (tmp_path / "out").exists()


def test_3_a_language_without_rows_is_an_error(tmp_path):
    code, _, err = run_cli(["train", "--output-dir", str(tmp_path / "out"), "--languages", "qaa,qbb", *QUIET])
    assert code == EXIT_BAD_INPUT
    one_line_error(err, "--languages: no train rows for 'qbb'", "languages found there: qaa, qab")
    assert not (tmp_path / "out").exists()
    # a file holding only some of the languages asked for
    write_jsonl(tmp_path / "train.jsonl", [r for r in load_sample("train") if r["lang"] == "qaa"])
    with pytest.raises(ValueError, match="no train rows for 'qab'"):
        train(short_config(tmp_path / "out", languages=("qaa", "qab"), train_file=str(tmp_path / "train.jsonl")))


def test_7_rows_with_empty_target_text_are_refused_by_id(tmp_path):
    rows = load_sample("train")[:64]
    rows[3]["text"] = ""
    rows[9]["text"] = "   "
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match=r"2 of 64 rows have an empty 'text' \(ids: train-0003, train-0009\)"):
        read_rows(tmp_path / "train.jsonl", "classification")


def test_14_a_broken_jsonl_line_gives_line_and_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a", "lang": "qaa", "text": "x", "label": 0}\n{"id": "b", "text": "bad\ttab"}\n')
    with pytest.raises(ValueError) as err:
        read_rows(path, "classification")
    assert f"{path}:2:25: not valid JSON: Invalid control character '\\t' at line 2, column 25" in str(err.value)


def test_15_a_row_without_lang_says_what_to_add(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"id": "a", "text": "x", "label": 0}])
    with pytest.raises(ValueError, match="row 0 \\(id 'a'\\) has no 'lang' field: add a 'lang' column") as err:
        read_rows(path, "classification")
    assert "pass lang=" not in str(err.value)


def test_16_translations_whose_ids_match_no_row_are_refused(tmp_path, caplog):
    write_jsonl(tmp_path / "tr.jsonl", [{"id": f"x-{i}", "source_text": "hello"} for i in range(5)])
    with pytest.raises(ValueError, match="none of its 5 ids matches one of the 192 test rows") as err:
        train(short_config(tmp_path / "out", test_translations=str(tmp_path / "tr.jsonl")))
    assert "x-0" in str(err.value) and "test-0000" in str(err.value)
    assert not (tmp_path / "out").exists()
    # some ids match: the others are said, not ignored silently
    from flare.tasks import get_task
    from flare.train.inputs import load_stage_data

    ids = [r["id"] for r in load_sample("test")]
    write_jsonl(tmp_path / "tr.jsonl", [{"id": i, "source_text": "hello"} for i in [*ids, "x-1", "x-2"]])
    cfg = short_config(tmp_path / "out", test_translations=str(tmp_path / "tr.jsonl"))
    with caplog.at_level("WARNING"):
        data = load_stage_data(cfg, get_task("toy"))
    assert "2 of its 194 ids match no test row (e.g. 'x-1')" in caplog.text
    assert data.test["qaa"][0]["source_text"] == "hello"


# ------------------------------------------------------------------------ 4, 5, 10: paths, one line, exit 2
def test_4_a_missing_model_path_is_one_line(tmp_path):
    code, _, err = run_cli(["train", "--model", "/nonexistent/model", "--output-dir", str(tmp_path / "out")])
    assert code == EXIT_BAD_INPUT
    one_line_error(err, "--model /nonexistent/model: model path not found")
    assert not (tmp_path / "out").exists()
    write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "lang": "ace", "text": "x", "label": 0}])
    argv = ["translate", "--task", "nusax", "--mode", "test", "--lang", "ace", "--input", str(tmp_path / "rows.jsonl")]
    code, _, err = run_cli([*argv, "--output", str(tmp_path / "o.jsonl"), "--model", "/nonexistent/mt"])
    assert code == EXIT_BAD_INPUT
    one_line_error(err, "--model /nonexistent/mt: model path not found")


def test_5_a_truncated_model_file_is_named_and_nothing_is_written(finished_run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(finished_run[0] / "base", model)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    out = tmp_path / "out"
    code, _, err = run_cli(["train", "--model", str(model), "--output-dir", str(out), *QUIET])
    assert code == EXIT_BAD_INPUT
    one_line_error(err, f"{weights}: not a readable safetensors file")
    assert not out.exists()  # no run_config.json left to refuse the rerun
    # a run that failed later, before its first stage began, left only its settings: the rerun proceeds
    out.mkdir()
    (out / "run_config.json").write_text("{}")
    (out / "train.log").write_text("an earlier attempt\n")
    code, _, err = run_cli(["train", "--output-dir", str(out), *QUIET])
    assert code == 0, err
    assert (out / "train.log").read_text().startswith("an earlier attempt")  # appended to, not replaced


def test_10_output_dir_a_file_or_read_only_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(["train", "--output-dir", str(tmp_path / "file"), *QUIET])
    assert code == EXIT_BAD_INPUT
    one_line_error(err, "is a file, not a folder")
    code, _, err = run_cli(["train", "--output-dir", str(tmp_path / "file" / "run"), *QUIET])
    assert code == EXIT_BAD_INPUT
    one_line_error(err, "is a file, not a folder")
    # read-only (simulated: the tests may run as root, for whom permissions do not apply)
    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == tmp_path / "ro" else real(p, mode, **k))
    code, _, err = run_cli(["train", "--output-dir", str(tmp_path / "ro" / "run"), *QUIET])
    assert code == EXIT_BAD_INPUT
    one_line_error(err, "is not writable")
    # any OSError a user causes: one line naming the file, exit 2 (--debug shows the traceback)
    import flare.train.runner as runner

    def denied(cfg, dist):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x" / "run_config.json"))

    monkeypatch.setattr(runner, "_prepare_output", denied)
    code, _, err = run_cli(["train", "--output-dir", str(tmp_path / "x"), *QUIET])
    assert code == EXIT_BAD_INPUT
    one_line_error(err, "run_config.json: Permission denied")
    with pytest.raises(PermissionError):
        run_cli(["train", "--output-dir", str(tmp_path / "x"), "--debug", *QUIET])


def test_10_eval_on_a_read_only_run_fails_before_scoring(finished_run, tmp_path, monkeypatch):
    import flare.train.restore as restore

    def never(*a, **k):
        raise AssertionError("the model was loaded and scored before the output was checked")

    monkeypatch.setattr(restore, "load_run_model", never)
    run = finished_run[0]
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == run else real(p, mode, **k))
    code, _, err = run_cli(["eval", "--run-dir", str(run)])
    assert code == EXIT_BAD_INPUT
    one_line_error(err, "is not writable")
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(["eval", "--run-dir", str(run), "--output", str(tmp_path / "file" / "e.json")])
    assert code == EXIT_BAD_INPUT
    one_line_error(err, "is a file, not a folder")


# ------------------------------------------------------------------------ 6: adapters checked by flare eval
@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_6_eval_refuses_a_truncated_or_nan_adapter(finished_run, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    run = copy_run(finished_run[0], tmp_path)
    file = run / "stage2" / "best" / "adapter_model.safetensors"
    if damage == "truncated":
        with open(file, "r+b") as f:
            f.truncate(file.stat().st_size // 2)
    else:
        tensors = load_file(str(file))
        name = next(iter(tensors))
        tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, str(file))
    code, _, err = run_cli(["eval", "--run-dir", str(run)])
    assert code == EXIT_BAD_INPUT
    one_line_error(err, str(file), "truncated" if damage == "truncated" else "NaN")
    assert not (run / "eval-test.json").exists()


# ------------------------------------------------------------------------ 8, 12, 13: stopped and resumed runs
STOPPED = ["--eval-steps", "1", *QUIET]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """The shortened built-in default stopped after stage 1's 2 steps and 1 of stage 2's (evaluated: best/)."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    code, _, err = run_cli(["train", "--output-dir", str(run), *STOPPED, "--stop-after-steps", "3"])
    assert code == EXIT_STOPPED and "stopped stage2 at step 1" in err
    return run


def test_8_eval_of_a_stopped_run_warns_and_names_its_adapter(stopped_run, tmp_path):
    run = copy_run(stopped_run, tmp_path)
    code, out, err = run_cli(["eval", "--run-dir", str(run)])
    assert code == 0, err
    assert "warning:" in err and "unfinished run (stopped inside stage 2, at step 1 of 2" in err
    saved = json.loads((run / "eval-test.json").read_text())
    assert saved["adapter"] == str(run / "stage2" / "best") and saved["finished"] is False


def test_12_resume_removes_temp_files_of_interrupted_renames_13_and_counts_its_own_steps(stopped_run, tmp_path):
    run = copy_run(stopped_run, tmp_path)
    # a kill at the rename of done.json / results.json leaves their temp files
    for stale in (run / "stage1" / ".done.json.k3j4.tmp", run / ".results.json.x8y9.tmp"):
        stale.write_text("{")
    code, out, err = run_cli(["train", "--output-dir", str(run), *STOPPED, "--resume"])
    assert code == 0, err
    assert not list(run.glob(".*.tmp")) and not list((run / "stage1").glob(".*.tmp"))
    # 13: the summary counts what this process did
    assert "stage1: 2 steps, finished by an earlier run" in out
    assert "stage2: 1 step in" in out and "(resumed at step 1; 2 steps in all)" in out, out
    assert json.loads((run / "results.json").read_text())["stages"]["stage2"]["resumed_at_step"] == 1


# ------------------------------------------------------------------------ 9: Ctrl-C in the final test evaluation
def test_9_ctrl_c_during_the_test_evaluation_stops_at_once(tmp_path, monkeypatch):
    import flare.evaluate as ev

    real = ev.predict
    sent = []

    def predict(*args, **kwargs):
        if kwargs.get("desc", "").startswith("test") and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # one Ctrl-C as the test evaluation starts
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "predict", predict)
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--output-dir", str(run), "--stages", "stage2", *QUIET])
    assert code == EXIT_STOPPED
    assert "SIGINT received: stopping" in err  # said at once
    assert "SIGINT: stopped during the test evaluation" in err and f"flare eval --run-dir {run}" in err
    assert not (run / "results.json").exists() and (run / "stage2" / "adapter" / "adapter_config.json").is_file()
    monkeypatch.setattr(ev, "predict", real)
    code, out, err = run_cli(["train", "--output-dir", str(run), "--stages", "stage2", "--resume", *QUIET])
    assert code == 0, err  # training was complete: the resumed run only scores the test rows
    assert "stage2: 0 steps" in out and "toy / test" in out and (run / "results.json").is_file()


# ------------------------------------------------------------------------ 11, 18, item 3, 21: what a run leaves
def test_11_files_follow_the_umask(finished_run):
    run = finished_run[0]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and (run / "results.json") in files
    wrong = {str(p.relative_to(run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    wrong = {k: v for k, v in wrong.items() if v != oct(0o664)}
    assert not wrong, wrong  # umask 002 -> rw-rw-r--


def test_18_metric_named_signs_of_life_log_file_and_curves(finished_run):
    run, stdout, stderr = finished_run
    assert "stage1 epoch 1: step 2/2, loss" in stderr  # --no-progress still shows each epoch
    assert "stage2 step 2: validation macro_f1" in stderr
    log = (run / "train.log").read_text()
    for line in ("flare train: task toy", "stage1 epoch 1: step 2/2", "validation macro_f1", "toy / test", "done in"):
        assert line in log, line
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_21_the_stage2_adapter_says_stage1_is_merged_into_its_base(finished_run):
    run = finished_run[0]
    for name in ("best", "adapter"):
        text = (run / "stage2" / name / "README.md").read_text()
        assert "stage-1 LoRA" in text and str(run / "stage1" / "adapter") in text
        assert "plain PEFT" in text and "merged_stage1" in text


# ------------------------------------------------------------------------ 17: the CLI explains itself
def test_17_every_option_has_help_with_default_and_choices():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sub in commands.items():
        assert sub.description and len(sub.description) > 40, name
        for action in sub._actions:
            if action.dest in ("help", "verbose", "debug") or not action.option_strings:
                continue
            assert action.help, (name, action.option_strings)
            if not action.required and action.dest != "config":
                assert "default" in action.help, (name, action.option_strings, action.help)
    train_options = {a.dest: a for a in commands["train"]._actions}
    assert "add_relu" in train_options["fusion"].choices and "default: add_relu" in train_options["fusion"].help
    assert "default: 2e-05; built-in default: 0.005" in train_options["learning_rate"].help
    assert train_options["optimizer"].choices == ("auto", "adamw", "adamw8bit")
    text = commands["train"].format_help()
    assert "--r N" in text and "LoRA rank (default: 8)" in " ".join(text.split())


def test_17_a_bad_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--fusion", "concat"])
    assert exc.value.code == EXIT_BAD_INPUT and "invalid choice: 'concat'" in capsys.readouterr().err


# ------------------------------------------------------------------------ 20, 22: the library
def test_20_layers_refuse_a_non_positive_lora_alpha():
    import flare_kernels as fk

    dense = torch.nn.Linear(64, 32)
    for alpha in (-1, 0):
        with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
            fk.FlareLinear4bit.from_linear(dense, lora_alpha=alpha)
        with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
            fk.FlareLinear(dense, lora_alpha=alpha)


def test_22_generate_raises_no_deprecation_warning():
    from flare.testing import make_flare

    fm = make_flare("llama").eval()
    ids = torch.randint(3, 50, (2, 5))
    mask = torch.ones_like(ids)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cached = fm.generate(ids, mask, ids, mask, max_new_tokens=4, return_dict_in_generate=True, output_logits=True)
    assert not [w for w in seen if "past_key_values" in str(w.message)], [str(w.message) for w in seen]
    uncached = fm.generate(ids, mask, ids, mask, max_new_tokens=4, use_cache=False, return_dict_in_generate=True,
                           output_logits=True)  # fmt: skip
    # Cached decode steps run other GEMM shapes than the recompute: fp32 rounding, tokens up to a near-tie.
    from greedy_check import assert_greedy_agree

    tol = dict(rtol=1e-5, atol=1e-6)
    live = assert_greedy_agree(cached.source_sequences, uncached.source_sequences, cached.source_logits,
                               uncached.source_logits, 5, **tol, name="source")  # fmt: skip
    assert_greedy_agree(cached.sequences, uncached.sequences, cached.logits, uncached.logits, 5, **tol, live=live)
