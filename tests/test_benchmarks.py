"""The benchmark harness: its providers compute the op, its run writes the schema, ratios and files.

Nothing here asserts a speed (speed lives in the benchmark results); these tests hold the harness
to doing what it says: every provider computes the same FLARE-LoRA projection as the reference
(so the side-by-side numbers compare the same work), the one command writes results.csv with its
schema, derived metrics consistent with the times, environment.json and the plots, resumes
without re-measuring, and regenerates the README table between its markers only. A
pytest-benchmark group times the CPU providers at a toy shape (harness check, not a target).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import counts, summary
from benchmarks.config import PRESETS, SHAPES, Case, Shape
from benchmarks.ops import make_callable
from benchmarks.providers import LayerWeights, all_providers, make_inputs
from benchmarks.results import COLUMNS
from flare_kernels.reference import flare_lora_reference

REPO = Path(__file__).resolve().parent.parent
TOY = Shape("toy.q", 96, 256, flare=True)
CPU = torch.device("cpu")
NF4_PROVIDERS = ("ours", "reference", "bnb_peft", "bnb_peft_cpu_packed", "unsloth_style")
DENSE_PROVIDERS = ("dense_bf16",)


def _provider(name: str):
    p = next(p for p in all_providers() if p.name == name)
    reason = p.unavailable(CPU)
    if reason:
        pytest.skip(f"{name}: {reason}")
    return p


# ------------------------------------------------------------------------------------------ counts
def test_nf4_bytes_match_kernel_notes():
    # kernel-notes.md: 8.66 MB for a 4096 x 4096 projection with double quantization, 30.3 MB for gate/up.
    assert counts.nf4_bytes(4096, 4096) / 1e6 == pytest.approx(8.66, abs=0.01)
    assert counts.nf4_bytes(14336, 4096) / 1e6 == pytest.approx(30.3, abs=0.05)
    assert counts.nf4_bytes(64, 64, nested=False) == 64 * 64 // 2 + 4 * 64 + 64


def test_flops_and_bytes_by_hand():
    shape = Shape("s", n=8, k=16, flare=True)
    flare_fwd = Case("flare_add_relu", shape, r=2, m=4, mode="fwd")
    # both streams through W (2*2*4*8*16), down-projection of both (2*2*4*16*2), up-projection of targets (2*4*2*8)
    assert counts.flops(flare_fwd) == 2 * 2 * 4 * 8 * 16 + 2 * 2 * 4 * 16 * 2 + 2 * 4 * 2 * 8
    lora_bwd = Case("lora", shape, r=2, m=4, mode="bwd")
    assert counts.flops(lora_bwd) == 2 * 4 * 8 * 16 + 2 * 4 * 8 * 2 + 2 * 4 * 2 * 16 + 2 * 4 * 2 * 16 + 2 * 4 * 8 * 2
    both = Case("lora", shape, r=2, m=4, mode="fwd+bwd")
    assert counts.flops(both) == counts.flops(Case("lora", shape, 2, 4, "fwd")) + counts.flops(lora_bwd)
    weight = counts.nf4_bytes(8, 16)
    lora = (2 * 16 + 8 * 2) * 4
    assert counts.bytes_moved(flare_fwd) == 2 * 4 * 16 * 2 + weight + lora + 2 * 4 * 8 * 2
    # roofline: the slower of compute and memory
    assert counts.roofline_ms(flare_fwd, 1e-9, 1e9) == pytest.approx(counts.flops(flare_fwd) / 1e3 * 1e3)


def test_presets_select_flare_only_where_the_method_fuses():
    cases = PRESETS["full"].cases()
    assert len({c.key for c in cases}) == len(cases)
    flare_shapes = {c.shape.name for c in cases if c.op == "flare_add_relu"}
    assert flare_shapes == {s.name for s in SHAPES.values() if s.flare}
    assert {c.m for c in cases} == {1, 16, 128, 512, 4096, 16384}
    cpu = PRESETS["cpu"]
    assert all(not cpu.runs("reference_compiled", c) for c in cpu.cases() if c.mode != "fwd")


# ------------------------------------------------------------------------------------------ providers
def _case(op: str, mode: str, m: int = 5) -> Case:
    return Case(op, TOY, r=8, m=m, mode=mode)


def _reference(weights: LayerWeights, inp, case: Case, dense: bool):
    w = weights.dense if dense else weights.nf4()
    a, b = weights.trainable_lora()
    x = inp.x.detach().clone().requires_grad_(case.mode != "fwd")
    out = flare_lora_reference(x, w, a, b, weights.scaling, source=inp.src, fusion=case.fusion,
                               compute_dtype=torch.bfloat16, return_source_output=inp.src is not None)  # fmt: skip
    return out, x, a, b


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("op", ["flare_add_relu", "lora"])
@pytest.mark.parametrize("name", NF4_PROVIDERS + DENSE_PROVIDERS)
def test_provider_computes_the_reference_forward(name, op):
    provider = _provider(name)
    case = _case(op, "fwd")
    weights = LayerWeights(TOY, 8, CPU)
    inp = make_inputs(case, CPU)
    layer = provider.build(weights)
    with torch.no_grad():
        y, y_src = layer(inp, case)
    ref, *_ = _reference(weights, inp, case, dense=name in DENSE_PROVIDERS)
    # bf16 outputs from other summation orders: a few bf16 ulps; bitsandbytes' CPU eval path
    # computes with bf16-rounded scales (kernel-notes.md), hence its looser bound.
    tol = 2e-2 if name == "bnb_peft_cpu_packed" else 1e-2
    assert y.shape == ref.y.shape and _rel(y, ref.y) < tol
    if op == "flare_add_relu":
        assert y_src is not None and _rel(y_src, ref.y_source) < tol
    else:
        assert y_src is None


@pytest.mark.parametrize("name", ["ours", "reference", "bnb_peft", "unsloth_style", "dense_bf16"])
def test_provider_gradients_match_the_reference(name):
    provider = _provider(name)
    case = _case("flare_add_relu", "fwd+bwd")
    weights = LayerWeights(TOY, 8, CPU)
    inp = make_inputs(case, CPU)
    layer = provider.build(weights)
    make_callable([layer], inp, case)()()
    ref, x, a, b = _reference(weights, inp, case, dense=name == "dense_bf16")
    ref.y.backward(inp.dy)
    assert _rel(inp.x.grad, x.grad) < 1e-2
    got_a, got_b = (p.grad for p in layer.params)
    assert _rel(got_a, a.grad) < 2e-2 and _rel(got_b, b.grad) < 2e-2


def test_bwd_mode_times_the_backward_only():
    case = _case("lora", "bwd")
    inp = make_inputs(case, CPU)
    layer = _provider("ours").build(LayerWeights(TOY, 8, CPU))
    fn = make_callable([layer], inp, case)()  # setup ran the forward
    assert inp.x.grad is None
    fn()
    first = inp.x.grad.clone()
    fn()  # the retained graph runs again: gradients accumulate
    assert torch.allclose(inp.x.grad.float(), 2 * first.float(), rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------------------------------ pytest-benchmark
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", ["ours", "bnb_peft", "unsloth_style", "dense_bf16"])
def test_benchmark_providers_toy(benchmark, name, mode):
    """Timed by pytest-benchmark at a toy shape (``pytest tests/test_benchmarks.py --benchmark-only``)."""
    provider = _provider(name)
    case = _case("flare_add_relu", mode, m=16)
    inp = make_inputs(case, CPU)
    layer = provider.build(LayerWeights(TOY, 8, CPU))
    fn = make_callable([layer], inp, case)()
    benchmark.group = f"flare_add_relu {mode} {TOY.label} r=8 M=16"
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    if mode == "fwd+bwd":  # the timed call trained: gradients reached the input and the adapter
        assert inp.x.grad is not None and all(p.grad is not None for p in layer.params)


# ------------------------------------------------------------------------------------------ the command
def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "benchmarks.run", "--preset", "smoke", "--out", str(out), "--no-readme",
           "--quiet", "--cpu-budget-s", "0.02", "--tokens", "1,16", *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu-test"
    _run(out)
    return out


def test_run_writes_schema_metrics_and_ratios(smoke_run):
    rows = _rows(smoke_run / "results.csv")
    env = json.loads((smoke_run / "environment.json").read_text())
    assert env["device_type"] == "cpu"
    assert {"device", "versions", "commit", "roofline", "load_average_start", "runs", "memory_method"} <= set(env)
    assert all(r["device"] == env["device_slug"] and r["commit"] == env["commit"] for r in rows)
    assert {r["metric"] for r in rows if r["op"] == "roofline"} >= {"copy_gbps", "gemm_tflops"}

    times = {}
    by_cell: dict[tuple, set[str]] = {}
    for r in rows:
        if r["op"] in ("flare_add_relu", "lora"):
            cell = (r["op"], r["provider"], r["mode"], r["shape"], r["r"], r["M"])
            by_cell.setdefault(cell, set()).add(r["metric"])
            if r["metric"] == "time_ms":
                times[cell] = float(r["p50"])
                assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
    assert times, "no op was measured"
    providers = {c[1] for c in times}
    assert {"ours", "bnb_peft", "unsloth_style", "dense_bf16"} <= providers
    for cell, metrics in by_cell.items():
        assert {"time_ms", "tflops", "gbps", "roofline_frac", "peak_mem_mib"} <= metrics, cell
    # ratio_to_ours = provider time / ours time, in the same cell
    ratios = [r for r in rows if r["metric"] == "ratio_to_ours" and r["op"] in ("flare_add_relu", "lora")]
    assert ratios
    for r in ratios:
        cell = (r["op"], r["provider"], r["mode"], r["shape"], r["r"], r["M"])
        ours = (r["op"], "ours", *cell[2:])
        assert float(r["p50"]) == pytest.approx(times[cell] / times[ours], rel=1e-3)
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
    # throughput rows are the case's counts over the time
    case = Case("lora", PRESETS["smoke"].shapes[0], 8, 16, "fwd")
    t = times[("lora", "ours", "fwd", case.shape.label, "8", "16")]
    tf = next(float(r["p50"]) for r in rows if r["metric"] == "tflops" and r["op"] == "lora"
              and r["provider"] == "ours" and r["mode"] == "fwd" and r["M"] == "16")  # fmt: skip
    assert tf == pytest.approx(counts.flops(case) / t / 1e9, rel=1e-3)
    # end to end: all three arms, training and decoding
    e2e = {(r["op"], r["provider"]) for r in rows if r["op"].startswith("e2e") and r["metric"] == "tokens_per_s"}
    arms = {"authors_style"} | ({"ours_flare", "ours_qlora"} if not env["e2e"]["skipped"] else set())
    assert {(op, a) for op in ("e2e_train", "e2e_decode") for a in arms} <= e2e


def test_run_writes_plots(smoke_run):
    for name in ("speedup_flare_add_relu.png", "speedup_lora.png", "roofline.png", "e2e.png"):
        data = (smoke_run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_resume_skips_measured_cells(smoke_run):
    before = [r for r in _rows(smoke_run / "results.csv") if r["metric"] == "time_ms" and r["op"] != "roofline"]
    _run(smoke_run, "--resume", "--skip-e2e", "--no-plots")
    after = [r for r in _rows(smoke_run / "results.csv") if r["metric"] == "time_ms" and r["op"] != "roofline"]
    assert len(after) == len(before)
    env = json.loads((smoke_run / "environment.json").read_text())
    assert env["ops"]["measured"] == 0 and env["ops"]["resumed"] > 0 and len(env["runs"]) == 2


def test_summary_rewrites_only_between_markers(smoke_run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nbefore\n{summary.BEGIN}\nold table\n{summary.END}\nafter\n")
    assert summary.update_readme(readme, root=smoke_run.parent)
    text = readme.read_text()
    head, rest = text.split(summary.BEGIN)
    table, tail = rest.split(summary.END)
    assert head == "# title\nbefore\n" and tail == "\nafter\n"
    assert "old table" not in table
    assert "cpu-test/results.csv" in table and "| M=1 | M=16 |" in table
    assert "End to end" in table
    missing = tmp_path / "NO_MARKERS.md"
    missing.write_text("# nothing\n")
    assert not summary.update_readme(missing, root=smoke_run.parent)
    assert missing.read_text() == "# nothing\n"


def test_summary_puts_gpu_first_and_reports_the_down_projection_placement(tmp_path):
    from benchmarks.results import Row, Writer

    shape = "llama3.1-8b.q:4096x4096"
    times = {"ours": 1.0, "bnb_peft": 3.0, "ours_bf16_fused_down": 0.8, "ours_bf16_split_down": 1.2}
    for slug in ("nvidia-h200", "cpu-xeon-2c"):
        with Writer(tmp_path / slug, slug, "torch=x", "abc", resume=False) as w:
            w.write([Row("roofline", "device", "copy", "copy:1B", "", "", "copy_gbps", 4000.0),
                     Row("roofline", "device", "gemm", "gemm_bf16:8192^3", "", "", "gemm_tflops", 790.0)])
            w.write([Row("lora", p, "fwd", shape, 16, 4096, "time_ms", t, t, t) for p, t in times.items()])
    text = summary.render(tmp_path)
    assert text.index("`nvidia-h200`") < text.index("`cpu-xeon-2c`")
    assert "| lora | fwd | 3.00x |" in text  # bnb_peft / ours
    assert "`ours_bf16_split_down` / `ours_bf16_fused_down`" in text and "| lora | fwd | 1.50x |" in text
