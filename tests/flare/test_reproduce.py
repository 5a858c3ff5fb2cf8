"""``flare reproduce``: the grid on the toy task with the built-in tiny model (shortened: 16 rows, 1 epoch per
stage, 8 test rows per language), its outputs, no rerun of finished cells, resume, changed specs, bad specs."""

import csv
import json
from pathlib import Path

import pytest

from flare.cli import EXIT_BAD_INPUT, EXIT_STOPPED, main
from flare.reproduce import load_spec, parse_spec, reproduce
from flare.reproduce.spec import METHODS
from flare.reproduce.table import Scores, cell_text, markdown

# 2 optimizer steps per stage (16 rows / batch 8): ~1-3 s per cell on 2 CPU cores.
SHORT = {
    "max_train_examples": 16,
    "epochs": 1,
    "stage1_epochs": 1,
    "batch_size": 8,
    "max_eval_examples": 8,
    "progress": False,
}
GRID_METHODS = ["zero-shot", "flare"]  # a stage-1 baseline and a stage-2 method
SEEDS = [1, 2]


def spec_dict(methods=GRID_METHODS, seeds=SEEDS, **overrides):
    return {"tasks": ["toy"], "models": [None], "methods": methods, "seeds": seeds, "overrides": {**SHORT, **overrides}}


def write_spec(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def snapshot(root: Path) -> dict[str, int]:
    """Every file under root with its modification time (ns)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "grid"
    summary = reproduce(parse_spec(spec_dict()), out)
    return out, summary


def test_grid_runs_every_cell_once_and_shares_stage_1(grid):
    out, summary = grid
    names = [c.name for c in summary.cells]
    assert names == [f"toy/builtin/{m}/seed-{s}" for s in SEEDS for m in ["stage1", *GRID_METHODS]]
    assert summary.ran == names and set(summary.before.values()) == {"todo"}
    for cell in summary.cells:
        stored = json.loads((cell.path / "run_config.json").read_text())
        assert cell.path == out.resolve() / "cells" / "toy" / "builtin" / cell.method / f"seed-{cell.seed}"
        assert stored["seed"] == cell.seed
        if cell.method != "stage1":  # every method reuses its seed's stage 1 instead of training its own
            assert stored["stage1_from"] == str(out.resolve() / "cells/toy/builtin/stage1" / f"seed-{cell.seed}")
            assert not (cell.path / "stage1" / "done.json").exists()
    zero_shot = json.loads((out / "cells/toy/builtin/zero-shot/seed-1/run_config.json").read_text())
    assert (zero_shot["stages"], zero_shot["eval_mode"]) == (["stage1"], "zero-shot")
    assert json.loads((out / "cells/toy/builtin/flare/seed-2/run_config.json").read_text())["method"] == "flare"


def test_grid_writes_csv_table_and_plot(grid):
    out, summary = grid
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert list(rows[0]) == ["task", "model", "method", "seed", "language", "metric", "score"]
    # 2 methods x 2 seeds x (qaa, qab, average) x (accuracy, macro_f1)
    assert len(rows) == 2 * 2 * 3 * 2
    assert {r["language"] for r in rows} == {"qaa", "qab", "average"}
    flare_s2 = json.loads((out / "cells/toy/builtin/flare/seed-2/results.json").read_text())["test"]
    key = ("flare", "2", "qab", "macro_f1")
    row = next(r for r in rows if (r["method"], r["seed"], r["language"], r["metric"]) == key)
    assert float(row["score"]) == pytest.approx(flare_s2["per_language"]["qab"]["macro_f1"], abs=1e-4)

    table = (out / "table.md").read_text()
    lines = table.splitlines()
    head = lines.index("## toy · builtin · macro_f1")
    assert lines[head + 2] == "| method | qaa | qab | average |"
    body = lines[head + 4 : head + 6]
    assert [line.split(" | ")[0] for line in body] == ["| zero-shot", "| flare"]  # methods as rows
    assert all(line.count(" ± ") == 3 for line in body)  # each language and the average: mean ± std of 2 seeds
    scores = [json.loads((out / f"cells/toy/builtin/flare/seed-{s}/results.json").read_text())["test"] for s in SEEDS]
    assert body[1].split(" | ")[3] == cell_text([t["average"]["macro_f1"] for t in scores], 2) + " |"
    assert "## Average over tasks (toy macro_f1)" in table
    assert (out / "averages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["averages.png", "cells", "results.csv", "spec.json", "table.md"]


def test_a_second_run_reruns_nothing(grid, monkeypatch, capsys):
    out, _ = grid
    before = snapshot(out / "cells")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr("flare.train.runner.train", no_training)
    same = write_spec(out.parent / "same.json", spec_dict())
    assert main(["reproduce", "--spec", same, "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "6 of 6 cells finished by an earlier run; 0 to run" in text and "| flare |" in text
    assert snapshot(out / "cells") == before


def test_dry_run_lists_status_and_writes_nothing(grid, tmp_path, capsys):
    out, _ = grid
    files = snapshot(out)
    assert main(["reproduce", "--spec", write_spec(tmp_path / "s.json", spec_dict()), "--output-dir", str(out),
                 "--dry-run"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "6 cells in" in text and "(6 done)" in text and "  done     toy/builtin/flare/seed-2" in text
    assert snapshot(out) == files
    fresh = tmp_path / "fresh"
    assert main(["reproduce", "--output-dir", str(fresh), "--dry-run"]) == 0  # the built-in spec
    text = capsys.readouterr().out
    assert "14 cells in" in text and "(14 todo)" in text and "toy/builtin/flare-mt/seed-2" in text
    assert not fresh.exists()


def test_changed_spec_is_refused_naming_the_cell(grid, tmp_path, capsys):
    out, _ = grid
    files = snapshot(out)
    changed = write_spec(tmp_path / "s.json", spec_dict(learning_rate=1e-3))
    assert main(["reproduce", "--spec", changed, "--output-dir", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("flare reproduce: error: cell toy/builtin/stage1/seed-1 and 5 more cells ran with other")
    # a finished stage 1 is compared on what stage 1 reads (stage1_reuse.STAGE1_FIELDS + derived values)
    assert "'stage1 learning rate': (0.001, 0.005)" in err and "--overwrite" in err and "\n" not in err
    assert snapshot(out) == files


def test_interrupted_cell_resumes_and_overwrite_reruns_only_changed_cells(tmp_path, capsys):
    out = tmp_path / "run"
    one = dict(methods=["translate-test"], seeds=[3])  # the cheapest method: it only scores stage 1
    stop = write_spec(tmp_path / "stop.json", spec_dict(**one, stop_after_steps=1))
    assert main(["reproduce", "--spec", stop, "--output-dir", str(out)]) == EXIT_STOPPED
    err = capsys.readouterr().err
    assert "cell toy/builtin/stage1/seed-3: stop_after_steps reached: stopped stage1 at step 1" in err
    assert "| translate-test | – | – | – |" in (out / "table.md").read_text()  # written when stopped too
    statuses = {c.name: s for c, s in zip(*_dry(out, spec_dict(**one)))}
    assert statuses == {"toy/builtin/stage1/seed-3": "partial", "toy/builtin/translate-test/seed-3": "todo"}

    summary = reproduce(parse_spec(spec_dict(**one)), out)  # stop_after_steps may differ: resumed, not refused
    stage1 = out / "cells/toy/builtin/stage1/seed-3"
    assert json.loads((stage1 / "results.json").read_text())["stages"]["stage1"]["resumed_at_step"] == 1
    assert summary.ran == ["toy/builtin/stage1/seed-3", "toy/builtin/translate-test/seed-3"]
    capsys.readouterr()

    # settings stage 1 does not read changed: the method cell is refused, then rerun with --overwrite; the
    # finished stage 1 is kept
    kept = snapshot(stage1)
    fewer = write_spec(tmp_path / "fewer.json", spec_dict(**one, max_eval_examples=4))
    assert main(["reproduce", "--spec", fewer, "--output-dir", str(out)]) == EXIT_BAD_INPUT
    assert "cell toy/builtin/translate-test/seed-3 ran with other settings" in capsys.readouterr().err
    assert main(["reproduce", "--spec", fewer, "--output-dir", str(out), "--overwrite"]) == 0
    test = json.loads((out / "cells/toy/builtin/translate-test/seed-3/results.json").read_text())["test"]
    assert {v["n"] for v in test["per_language"].values()} == {4}
    assert snapshot(stage1) == kept


def _dry(out: Path, data: dict):
    from flare.reproduce.cells import build_cells, status

    cells = build_cells(parse_spec(data), out)
    return cells, [status(c) for c in cells]


@pytest.mark.parametrize(
    "data, message",
    [
        ({**spec_dict(), "methods": ["flare", "mixup"]}, "unknown method 'mixup'; known: ['zero-shot'"),
        ({**spec_dict(), "overrides": {"learning_rat": 1e-3}}, "unknown TrainConfig fields ['learning_rat']"),
        ({**spec_dict(), "overrides": {"seed": 1}}, "['seed'] are set by flare reproduce per cell"),
        ({**spec_dict(), "tasks": [{"task": "toy", "r": 0}]}, "cell toy/builtin/stage1/seed-1: TrainConfig.r (--r)"),
        ({**spec_dict(), "tasks": ["squad"]}, "unknown task 'squad'"),
        ({**spec_dict(), "seed": [1]}, "unknown keys ['seed']"),
        ({**spec_dict(), "method_overrides": {"flare": {"stage1_epochs": 2}}}, "change stage-1 settings"),
        ("{not json", "line 1, column 2"),
    ],
    ids=["method", "field", "reserved", "bad-value", "task", "key", "stage1-override", "json"],
)
def test_bad_spec_is_one_line_with_exit_code_2(tmp_path, capsys, data, message):
    path = tmp_path / "spec.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    assert main(["reproduce", "--spec", str(path), "--output-dir", str(tmp_path / "out")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("flare reproduce: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_yaml_spec_reads_like_json(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "spec.yaml"
    path.write_text("tasks: [toy]\nmodels: [null]\nmethods: [lora, flare]\nseeds: [1]\noverrides: {epochs: 1}\n")
    spec = load_spec(path)
    assert spec == parse_spec({"tasks": ["toy"], "models": [None], "methods": ["lora", "flare"], "seeds": [1],
                               "overrides": {"epochs": 1}})  # fmt: skip
    assert spec.models[0].name == "builtin" and spec.methods == ("lora", "flare")


def test_table_means_stds_partial_seeds_and_task_average():
    spec = parse_spec(
        {"tasks": ["toy", {"task": "nusax", "languages": ["jav"]}], "models": ["org/Some-Model"],
         "methods": ["lora", "flare"], "seeds": [1, 2]}  # fmt: skip
    )

    def test(task, metric, per_language):
        return {"primary": metric, "per_language": {k: {metric: v, "n": 8} for k, v in per_language.items()},
                "average": {metric: sum(per_language.values()) / len(per_language)}}  # fmt: skip

    tables = {
        ("toy", "Some-Model", "flare", 1): test("toy", "macro_f1", {"qaa": 10.0, "qab": 30.0}),
        ("toy", "Some-Model", "flare", 2): test("toy", "macro_f1", {"qaa": 20.0, "qab": 40.0}),
        ("toy", "Some-Model", "lora", 1): test("toy", "macro_f1", {"qaa": 5.0, "qab": 15.0}),
        ("nusax", "Some-Model", "flare", 1): test("nusax", "macro_f1", {"jav": 50.0}),
        ("nusax", "Some-Model", "flare", 2): test("nusax", "macro_f1", {"jav": 70.0}),
    }
    lines = markdown(Scores(spec, tables), "out").splitlines()
    toy = lines.index("## toy · Some-Model · macro_f1")
    assert lines[toy + 2 : toy + 6] == [
        "| method | qaa | qab | average |",
        "| --- | ---: | ---: | ---: |",
        "| lora | 5.00 (1 of 2 seeds) | 15.00 (1 of 2 seeds) | 10.00 (1 of 2 seeds) |",
        "| flare | 15.00 ± 7.07 | 35.00 ± 7.07 | 25.00 ± 7.07 |",
    ]
    avg = lines.index("## Average over tasks (toy macro_f1, nusax macro_f1)")
    # flare per seed: (20 + 50) / 2 = 35 and (30 + 70) / 2 = 50 -> 42.5 ± 10.61; lora has no nusax: –
    assert lines[avg + 4 : avg + 6] == [
        "| Some-Model | lora | 10.00 (1 of 2 seeds) | – | – |",
        "| Some-Model | flare | 25.00 ± 7.07 | 60.00 ± 14.14 | 42.50 ± 10.61 |",
    ]


def test_builtin_spec_has_all_six_methods_and_two_seeds():
    from flare.reproduce import builtin_spec

    spec = builtin_spec()
    assert spec.methods == METHODS == ("zero-shot", "translate-test", "lora", "input-fusion", "flare", "flare-mt")
    assert spec.seeds == (1, 2) and [t.name for t in spec.tasks] == ["toy"] and spec.models[0].model is None

