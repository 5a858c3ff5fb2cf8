"""The one-call GPU check (benchmarks/gpu_check/) without a GPU: its CPU-side parts.

Argument parsing, the budget, ``pack`` into a temporary folder (size, expected files), a dry run
(every phase's plan, the folder's layout and content) and ``merge`` of a synthetic fetched folder
into a temporary results tree and README. About 20 s on 2 cores, most of it the dry run's
``pytest --collect-only`` child.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from benchmarks.gpu_check import budget, cli, compare, pack, testrun
from benchmarks.results import COLUMNS

STATIC_ROWS = [
    # op, provider, mode, shape, r, M, metric, p50, as benchmarks/static/report.py writes them: a
    # preset cell, a cell outside the preset (shape), a provider the preset leaves out, an anchor
    # op the benchmarks do not run; then rows the join ignores: the other GPU's metric, a
    # per-launch prediction, a non-time metric
    ("flare_add_relu", "ours", "fwd", "llama3.1-8b.q:4096x4096", 16, 1, "predicted_us_h100", 9.5),
    ("lora", "ours", "fwd+bwd", "llama3.1-8b.gate_up:14336x4096", 16, 4096, "predicted_us_h100", 900.0),
    ("lora", "ours", "fwd", "llama3.1-8b.down:4096x14336", 16, 1, "predicted_us_h100", 20.0),
    ("lora", "ours_bf16_fused_down", "bwd", "llama3.1-8b.q:4096x4096", 16, 64, "predicted_us_h100", 30.0),
    ("w4a16_gemm", "gemlite", "fwd", "llama3.1-8b.q:4096x4096", "", 1, "predicted_us_h100", 10.0),
    ("flare_add_relu", "ours", "fwd", "llama3.1-8b.q:4096x4096", 16, 1, "predicted_us_h200", 7.5),
    ("flare_add_relu", "ours:flare_fwd_kernel", "fwd", "llama3.1-8b.q:4096x4096", 16, 1,
     "predicted_launch_us_h100", 8.0),
    ("flare_add_relu", "ours", "fwd", "llama3.1-8b.q:4096x4096", 16, 1, "registers", 168.0),
]


def _write_csv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for row in rows:
            w.writerow([*row, "", "", "static-sm90-triton3.6.0", "triton=3.6.0", "abc"])


def test_arguments():
    assert cli.parse_args([]).cmd == "run"
    args = cli.parse_args(["--dry-run", "--budget-s", "100"])
    assert (args.cmd, args.dry_run, args.budget_s) == ("run", True, 100.0)
    assert cli.parse_args(["run", "--test-files", "a.py,b.py"]).test_files == ["a.py", "b.py"]
    assert cli.parse_args(["pack", "--dists", "pytest,pluggy"]).dists == ("pytest", "pluggy")
    args = cli.parse_args(["merge", "x", "--no-plots"])
    assert (args.cmd, args.folder, args.no_plots) == ("merge", Path("x"), True)
    with pytest.raises(SystemExit):
        cli.parse_args(["frobnicate"])


def test_budget_gives_each_phase_its_share_of_what_is_left():
    now = [1000.0]
    b = budget.Budget(480, reserve_s=20, clock=lambda: now[0])
    ends = {}
    for name in budget.SHARES:
        ends[name] = b.phase_end(name)
        now[0] = ends[name] - 50 if name == "tests" else ends[name]  # tests end 50 s early
    assert ends["compile"] == pytest.approx(1000 + 460 * budget.SHARES["compile"])
    assert ends["predicted"] == pytest.approx(1460)  # the last phase gets all that is left
    assert ends["bench"] - (ends["tests"] - 50) > 0.28 / 0.40 * (1460 - ends["tests"])  # it inherits the 50 s
    assert max(ends.values()) <= b.end


def test_predicted_metric_by_device_name():
    assert compare.predicted_metric("NVIDIA H100 80GB HBM3") == "predicted_us_h100"
    assert compare.predicted_metric("NVIDIA H200") == "predicted_us_h200"
    assert compare.predicted_metric("NVIDIA A100-SXM4-80GB") is None


def test_device_command_fits_the_device_tool():
    cmd = pack.device_command("0123456789ab")
    assert len(cmd) < pack.COMMAND_LIMIT
    assert "--out $OUT" in cmd and "FLARE_BENCH_COMMIT=0123456789ab" in cmd and "--site .gpu_site" in cmd


def test_pack_copies_the_carried_packages_under_64_mib(tmp_path, capsys):
    dest = tmp_path / "site"
    assert cli.main(["pack", "--dest", str(dest), "--no-tree-size"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((dest / "PACKED.json").read_text())
    for name in ("pytest", "pluggy", "iniconfig", "bitsandbytes"):
        assert isinstance(manifest["dists"][name], dict), manifest["dists"][name]
        assert list(dest.glob(f"{name}-*.dist-info/METADATA")), name  # importlib.metadata finds them there
    assert (dest / "pytest" / "__init__.py").exists() and (dest / "_pytest" / "python.py").exists()
    assert (dest / "bitsandbytes" / "__init__.py").exists()
    # the GPU image's CUDA 13.0 build and the CPU one: 4 MB of bitsandbytes' 125
    libs = sorted(p.name for p in (dest / "bitsandbytes").glob("libbitsandbytes_*.so"))
    assert libs == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"], libs
    assert manifest["dists"]["bitsandbytes"]["bytes"] < 10 * 2**20
    assert not list(dest.rglob("__pycache__"))
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert size == manifest["carried_bytes"] + (dest / "PACKED.json").stat().st_size
    assert size + pack.tree_bytes() < pack.CARRY_LIMIT
    call = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert call["carry"] == [str(dest)] and len(call["command"]) < pack.COMMAND_LIMIT and call["timeout_s"] == 600
    # a second pack replaces its own folder; a folder it did not make is refused
    assert cli.main(["pack", "--dest", str(dest), "--no-tree-size", "--dists", "iniconfig"]) == 0
    assert not (dest / "pytest").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["pack", "--dest", str(other), "--no-tree-size"])
    assert (other / "keep.txt").exists()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry")
    _write_csv(root / "static" / "results.csv", STATIC_ROWS)
    rc = cli.main(["run", "--dry-run", "--out", str(root), "--static", str(root / "static"),
                   "--test-files", "tests/test_gpu_shapes.py"])  # fmt: skip
    return rc, root / "gpu-check-nvidia-h100-80gb-hbm3"


def test_dry_run_writes_the_folder_with_every_phase_planned(dry_run):
    rc, folder = dry_run
    assert rc == 0
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert names == sorted(["gpu_check.json", "summary.md", "tests.txt", "predicted_vs_measured.csv"])
    assert len(names) <= 8 and not [p for p in folder.iterdir() if p.is_dir()]
    record = json.loads((folder / "gpu_check.json").read_text())
    assert record["dry_run"] is True
    phases = {p["name"]: p for p in record["phases"]}
    assert [p["name"] for p in record["phases"]] == ["environment", "compile", "tests", "bench", "predicted", "summary"]
    statuses = {n: (p["status"], p["reason"]) for n, p in phases.items()}
    assert all(status == "dry-run" for status, _ in statuses.values()), statuses
    # the planned timeline: every phase its share, ending before the reserve
    budgets = {n: p["budget_s"] for n, p in phases.items() if n in budget.SHARES}
    assert budgets["tests"] > budgets["bench"] > budgets["predicted"] > 0
    assert sum(budgets.values()) == pytest.approx(budget.BUDGET_S - budget.RESERVE_S, abs=1)
    # compile: the kernels of every test case and preset cell, from the launch plan
    comp = phases["compile"]["details"]
    assert comp["kernels"] >= 40 and not comp["errors"]
    assert set(comp["by_kernel"]) == {
        "flare_fwd_kernel", "flare_fwd_splitk_epilogue_kernel", "flare_dx_kernel", "flare_dx_splitn_epilogue_kernel",
        "lora_down_kernel", "lora_reduce_kernel", "lora_up_kernel", "nf4_dequant_kernel",
    }
    # tests: what pytest -m gpu collects, listed in tests.txt
    tests = phases["tests"]["details"]
    listed = [ln for ln in (folder / "tests.txt").read_text().splitlines() if "::" in ln]
    from test_gpu_shapes import GPU_CASES

    assert tests["collected"] == len(listed) == len(GPU_CASES)
    assert all("test_compiled_kernels_match_reference_at_real_shapes" in ln for ln in listed)
    assert any("gate_up-M8192" in ln for ln in listed) and any("-M1-" in ln for ln in listed)
    # bench: the gpu-check preset's cells and providers
    plan = phases["bench"]["details"]["plan"]
    assert plan["preset"] == "gpu-check" and plan["cases"] == 36
    assert all("ours" in provs for provs in plan["cells"].values())
    assert not any("reference" in p for provs in plan["cells"].values() for p in provs)


def test_dry_run_lists_the_predictions_it_would_compare(dry_run):
    _, folder = dry_run
    with open(folder / "predicted_vs_measured.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == compare.COMPARE_COLUMNS
    assert [(r["op"], r["provider"], r["M"], r["predicted_us"]) for r in rows] == [
        ("flare_add_relu", "ours", "1", "9.5"), ("lora", "ours", "4096", "900"), ("lora", "ours", "1", "20"),
        ("lora", "ours_bf16_fused_down", "64", "30"), ("w4a16_gemm", "gemlite", "1", "10")]  # fmt: skip
    assert {r["predicted_metric"] for r in rows} == {"predicted_us_h100"}
    assert rows[0]["measured_by"].startswith("benchmarks.run --preset gpu-check")
    assert rows[2]["measured_by"].startswith("gpu_check")  # down is not in the preset: measured on its own
    assert rows[3]["measured_by"].startswith("gpu_check") and rows[3]["measured_provider"] == "ours_bf16_fused_down"
    assert rows[4]["status"].startswith("not measured: op 'w4a16_gemm'")
    assert all(r["measured_us"] == "" for r in rows)
    assert all(r["status"] == "dry-run: not measured" for r in rows[:4])
    summary = (folder / "summary.md").read_text()
    assert "Dry run" in summary and "| lora | fwd+bwd | llama3.1-8b.gate_up:14336x4096 | 16 | 4096 | 900 |" in summary
    assert "{" not in summary.split("Compile:")[0]  # no unformatted placeholders


def test_compare_computes_ratios_and_names_what_is_missing():
    from benchmarks.results import cell_key

    rows = [dict(zip(COLUMNS, [*r, "", "", "", "", ""])) for r in STATIC_ROWS[:3]]
    for r, row in zip(rows, STATIC_ROWS):
        r["p50"] = str(row[7])
    hit = {"p50": "0.019", "p20": "0.018", "p80": "0.02"}
    measured = {cell_key("flare_add_relu", "ours", "fwd", "llama3.1-8b.q:4096x4096", 16, 1): hit}
    out = compare.compare(rows, measured, "predicted_us_h100", "static")
    assert out[0]["status"] == "ok" and float(out[0]["measured_us"]) == pytest.approx(19.0)
    assert float(out[0]["measured_over_predicted"]) == pytest.approx(2.0)
    assert out[1]["status"].startswith("not measured: the time budget")


def test_junit_counts_budget_skips_apart(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.a" name="ok"/>'
        '<testcase classname="tests.a" name="bad"><failure message="AssertionError: y: error 1.0e-01 &gt; ...">x'
        "</failure></testcase>"
        f'<testcase classname="tests.a" name="late"><skipped message="{"gpu-check time budget spent: not run"}"/>'
        "</testcase>"
        '<testcase classname="tests.a" name="nogpu"><skipped message="needs a CUDA GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    c = testrun.junit_counts(xml)
    assert (c["tests"], c["passed"], c["failed"], c["skipped"], c["skipped_budget"]) == (4, 1, 1, 1, 1)
    assert c["failures"] == ["tests.a::bad: AssertionError: y: error 1.0e-01 > ..."]
    assert budget.BUDGET_SKIP_REASON == "gpu-check time budget spent: not run"  # the reason conftest gives


def _fetched(tmp_path: Path, slug: str = "nvidia-h100-80gb-hbm3", dry: bool = False) -> Path:
    folder = tmp_path / "files_at" / f"gpu-check-{slug}"
    folder.mkdir(parents=True)
    (folder / "gpu_check.json").write_text(json.dumps({"dry_run": dry, "phases": []}))
    (folder / "summary.md").write_text("# GPU check\n")
    (folder / "tests.xml").write_text("<testsuites/>")
    (folder / "predicted_vs_measured.csv").write_text(",".join(compare.COMPARE_COLUMNS) + "\n")
    env = {"device": "NVIDIA H100 80GB HBM3", "commit": "0123456789ab", "ours_backend": "triton",
           "command": "python -m benchmarks.run --preset gpu-check"}  # fmt: skip
    (folder / "environment.json").write_text(json.dumps(env))
    rows = []
    for prov, ms in (("ours", 0.05), ("bnb_peft", 0.2)):
        for m in (1, 16):
            rows.append(("lora", prov, "fwd", "llama3.1-8b.q:4096x4096", 16, m, "time_ms", ms))
    rows += [("roofline", "device", "copy", "copy:1B", "", "", "copy_gbps", 3000.0),
             ("roofline", "device", "gemm", "gemm_bf16:8192^3", "", "", "gemm_tflops", 790.0)]  # fmt: skip
    _write_csv(folder / "results.csv", rows)
    return folder


def test_merge_copies_the_folder_and_regenerates_the_tables(tmp_path):
    folder = _fetched(tmp_path)
    results = tmp_path / "results"
    _write_csv(results / "cpu-xeon-2c" / "results.csv", [])
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\nafter\n")
    # given the folder holding it (the device tool's files_at), merge finds the one gpu-check folder
    argv = ["merge", str(folder.parent), "--results", str(results), "--readme", str(readme), "--no-plots"]
    assert cli.main(argv) == 0
    dest = results / folder.name
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert (dest / "results.csv").read_bytes() == (folder / "results.csv").read_bytes()
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert f"`{folder.name}`" in text and "NVIDIA H100 80GB HBM3" in text
    assert "| lora | fwd | 4.00x | 4.00x |" in text  # bnb_peft 0.2 ms / ours 0.05 ms


def test_merge_refuses_a_dry_run_and_a_foreign_csv(tmp_path):
    dry = _fetched(tmp_path, dry=True)
    with pytest.raises(SystemExit, match="dry run"):
        cli.main(["merge", str(dry), "--results", str(tmp_path / "r"), "--no-summary", "--no-plots"])
    (dry / "gpu_check.json").write_text(json.dumps({"dry_run": False}))
    (dry / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError):
        cli.main(["merge", str(dry), "--results", str(tmp_path / "r"), "--no-summary", "--no-plots"])
    assert not (tmp_path / "r").exists()
    shutil.rmtree(dry)


def test_log_counts_when_pytest_was_killed(tmp_path):
    log = tmp_path / "tests.txt"
    log.write_text("tests/a.py::t[x] PASSED [ 33%]\ntests/a.py::u[y-z] FAILED [ 66%]\n"
                   "tests/a.py::v SKIPPED (needs a CUDA GPU) [100%]\nnoise::line and more\n")
    c = testrun.log_counts(log)
    assert (c["tests"], c["passed"], c["failed"], c["skipped"]) == (3, 1, 1, 1)
    assert c["failures"] == ["tests/a.py::u[y-z]: FAILED (see tests.txt)"]
