"""Ahead-of-time compiles of every kernel specialization the launch plans emit (issue 11).

The interpreter accepts code that compiled Triton rejects (module-level ``NAME: tl.constexpr = 1``
once passed every CPU test and failed on the first GPU launch). These tests compile, with no GPU,
every unique specialization that the launch plans of ``benchmarks.static.coverage.covering_specs()``
emit for sm_90, with the GPU image's Triton (3.6.0, installed on demand into an isolated folder)
and with the installed one; for sm_80, one spec per tile class with the installed Triton; and every
kernel at least once (``tile_extremes``) for sm_80 with 3.6.0 and for sm_100 with both: the budget,
about 6 s of compile per GEMM specialization on one core. A failure lists
each failing specialization with the compiler's message.

And they check that ``spec_of`` (what the plan compiles) is what each Triton's own JIT binder
computes for real tensors, so the compiled code is the code a launch runs.

Compiles are cached under ``$FLARE_KERNELS_CACHE`` (default ``~/.cache/flare-kernels``): a warm
run takes seconds. No test here is skipped: a Triton that cannot be installed is a failure.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from benchmarks.static import coverage
from benchmarks.static.compile import KernelSpec, compile_specs, spec_of, unique
from benchmarks.static.toolchain import (
    ARCH_NAMES,
    MAX_SHARED_BYTES,
    PINNED_VERSION,
    ToolchainError,
    installed_version,
    toolchain,
)

# (arch, triton version or None for the installed one, which specs). Cold-cache CPU time on the
# 2-core CI machine, triton 3.9 unless noted: sm_90 all 52 specs ~190 s (3.6: ~140 s), sm_80 on
# the 22 tile classes ~85 s, sm_100 on those 22 ~100 s, hence only the tile extremes and one spec
# of each skinny kernel (6 specs) there and for sm_80 under 3.6.
SPEC_SETS = {"all": lambda specs: specs, "tiles": coverage.tile_classes, "extremes": coverage.tile_extremes}
TARGETS = [
    (90, PINNED_VERSION, "all"),
    (90, None, "all"),
    (80, None, "tiles"),
    (80, PINNED_VERSION, "extremes"),
    (100, None, "extremes"),
    (100, PINNED_VERSION, "extremes"),
]


@pytest.fixture(scope="module")
def all_specs() -> list[KernelSpec]:
    return coverage.unique_specs()


def _chain(version: str | None):
    try:
        return toolchain(version)
    except ToolchainError as e:  # CI has PyPI: not being able to install is a failure, not a skip
        pytest.fail(f"cannot set up triton {version or 'installed'}: {e}")


def _target_id(target) -> str:
    arch, version, which = target
    return f"sm{arch}-triton{version or 'installed'}-{which}"


_compiled: dict[tuple, list] = {}


def _compile(target, all_specs):
    """The target's artifacts, compiled once per session (and cached on disk across sessions)."""
    if target not in _compiled:
        arch, version, which = target
        chain = _chain(version)
        _compiled[target] = compile_specs(SPEC_SETS[which](all_specs), arch, chain.version, jobs=2)
    return _compiled[target]


def _where(spec: KernelSpec) -> str:
    return coverage.covering_kernel_specs()[spec][0].id


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS, ids=_target_id)
def test_every_specialization_compiles(all_specs, target):
    arch, version, _ = target
    artifacts = _compile(target, all_specs)
    failed = [a for a in artifacts if not a.ok]
    report = [
        f"{a.spec.describe()}\n    from {_where(a.spec)}\n    {a.error}\n    "
        + "\n    ".join(a.detail.strip().splitlines()[-6:])
        for a in failed
    ]
    if failed:
        pytest.fail(
            f"{len(failed)} of {len(artifacts)} specializations fail to compile for sm_{arch} with triton "
            f"{artifacts[0].triton_version}:\n" + "\n".join(report),
            pytrace=False,
        )
    for a in artifacts:
        assert a.cubin is not None and a.cubin.stat().st_size > 0, a.summary()
        assert a.metadata.get("registers"), a.summary()


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS, ids=_target_id)
def test_shared_memory_fits_the_device(all_specs, target):
    """Triton compiles kernels that need more shared memory than the GPU has; their launch then
    raises OutOfResources. Checked here on every compiled specialization."""
    arch = target[0]
    limit = MAX_SHARED_BYTES[arch]
    over = [a for a in _compile(target, all_specs) if a.ok and a.metadata["shared_bytes"] > limit]
    lines = [
        f"{a.spec.describe()}\n    from {_where(a.spec)}\n    needs {a.metadata['shared_bytes']} B with triton "
        f"{a.triton_version}"
        for a in over
    ]
    if over:
        pytest.fail(
            f"{len(over)} specializations need more shared memory than {ARCH_NAMES[arch]} has ({limit} B):\n"
            + "\n".join(lines),
            pytrace=False,
        )


def test_covering_set_reaches_every_switch(all_specs):
    """The covering set reaches each value of each switch the launchers set (the calls are a
    hand-made covering set: this catches a launcher change that adds a path no call takes)."""
    seen: dict[tuple[str, str], set] = {}
    for spec in all_specs:
        for name, value in spec.constexprs.items():
            seen.setdefault((spec.name, name), set()).add(json.dumps(value))
    fwd = lambda name: {json.loads(v) for v in seen[("flare_fwd_kernel", name)]}  # noqa: E731
    dx = lambda name: {json.loads(v) for v in seen[("flare_dx_kernel", name)]}  # noqa: E731
    assert fwd("FUSION") == {0, 1, 2, 3} and dx("FUSION") == {0, 1, 2, 3}
    for switch in ("NESTED", "ROW_BLOCKS", "HAS_BIAS", "SOURCE_OUT", "NEED_SRC_S", "DROPOUT"):
        assert fwd(switch) == {True, False}, switch
    for switch in ("NESTED", "ROW_BLOCKS", "NEED_SRC_S", "DROPOUT"):
        assert dx(switch) == {True, False}, switch
    assert fwd("LORA") == {1, 2} and dx("LORA") == {1, 2}
    assert fwd("STACK") == {True, False} and fwd("SPLIT_K") == {True, False} and dx("SPLIT_N") == {True, False}
    for epilogue in ("flare_fwd_splitk_epilogue_kernel", "flare_dx_splitn_epilogue_kernel"):
        assert {json.loads(v) for v in seen[(epilogue, "LORA")]} == {1, 2}, epilogue
    assert {json.loads(v) for v in seen[("flare_dx_splitn_epilogue_kernel", "DROPOUT")]} == {True, False}
    assert fwd("LORA_DTYPE") == {"tl.bfloat16", "tl.float16", "tl.float32"}
    assert {s.signature["xt_ptr"] for s in all_specs if s.name == "flare_fwd_kernel"} == {"*bf16", "*fp16", "*fp32"}
    assert fwd("M") == {1}  # M = 1 became a constant somewhere; elsewhere M is a runtime i32
    assert {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"]) for s in all_specs if s.name == "flare_fwd_kernel"} == {
        (8, 32), (16, 32), (32, 64), (32, 128), (64, 128), (128, 128)
    }
    # The split forward's down programs (SPLIT_K with LORA 2) with fp32 products of 16-bit and of
    # dropped-out activations (lora_mma's two TF32 dots and dropped_lora_mma).
    down = {(s.signature["xt_ptr"], s.constexprs["DROPOUT"]) for s in all_specs if s.name == "flare_fwd_kernel"
            and s.constexprs["SPLIT_K"] and s.constexprs["LORA"] == 2 and s.constexprs["LORA_DTYPE"] == "tl.float32"}
    assert {("*bf16", True), ("*bf16", False)} <= down
    for name in ("lora_down_kernel", "lora_reduce_kernel", "lora_up_kernel"):
        assert {json.loads(v) for v in seen[(name, "DROPOUT")]} == {True, False}
    up = {json.loads(v) for v in seen[("lora_up_kernel", "LORA_DTYPE")]}
    assert up == {"tl.bfloat16", "tl.float16", "tl.float32"}
    dq = lambda name: {json.loads(v) for v in seen[("nf4_dequant_kernel", name)]}  # noqa: E731
    assert dq("ROW_BLOCKS") == {True, False} and dq("NESTED") == {True, False}
    assert {s.signature["out_ptr"] for s in all_specs if s.name == "nf4_dequant_kernel"} == {"*bf16", "*fp16", "*fp32"}
    # K not divisible by 16 somewhere: the K argument without divisibility.
    assert any(s.signature.get("K") == "i32" and "K" not in s.attrs for s in all_specs)


def test_specs_dedupe_and_round_trip(all_specs):
    calls = coverage.covering_specs()
    launches = coverage.plan_launches(calls)
    assert len(all_specs) == len(unique(spec_of(launch) for _, launch in launches)) < len(launches)
    for spec in all_specs:
        again = KernelSpec.from_dict(json.loads(spec.to_json()))
        assert again == spec and hash(again) == hash(spec)


def test_spec_of_matches_installed_jit():
    """spec_of == the installed Triton's own JIT binder, on launches with real CPU tensors (an
    unaligned activation view, M = 1, K divisible by 16 and not) and on single values."""
    problems = coverage.jit_agreement()
    assert not problems, f"spec_of disagrees with triton {installed_version()}'s JIT:\n" + "\n".join(problems)


def test_spec_of_matches_pinned_jit():
    """The same check under the GPU image's Triton, in a subprocess (its own import of triton)."""
    chain = _chain(PINNED_VERSION)
    from benchmarks.static.compile import REPO_ROOT

    env = chain.env()
    env["PYTHONPATH"] = env["PYTHONPATH"] + ":" + str(REPO_ROOT)
    proc = subprocess.run(
        chain.command("-m", "benchmarks.static.coverage", "jit"),
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    problems = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not problems, f"spec_of disagrees with triton {chain.version}'s JIT:\n" + "\n".join(problems)


def test_toolchains_know_their_ptxas():
    """Each version's own get_ptxas: 3.6 runs ptxas for sm_90, 3.9 runs ptxas-blackwell."""
    pinned = _chain(PINNED_VERSION)
    assert pinned.ptxas(90).name == "ptxas" and pinned.ptxas(100).name == "ptxas-blackwell"
    assert pinned.ptxas(90).parent == pinned.bin_dir and pinned.cuobjdump.exists() and pinned.nvdisasm.exists()
    installed = _chain(None)
    assert installed.ptxas(90).exists() and installed.ptxas(80).name == "ptxas"


BAD_KERNEL = '''
import triton
import triton.language as tl

FLAG: tl.constexpr = 1  # accepted by the interpreter, rejected by the compiler


@triton.jit
def annotated_global_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n)
    if FLAG == 1:
        v = v * 2
    tl.store(x_ptr + offs, v, mask=offs < n)
'''


def test_a_compile_error_is_reported_not_raised(tmp_path, monkeypatch):
    """The bug these tests exist for: the compiler's message comes back on the artifact."""
    monkeypatch.setenv("FLARE_KERNELS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "kernels" / "bad.py"
    path.parent.mkdir()
    path.write_text(BAD_KERNEL)
    spec = KernelSpec(f"{path}:annotated_global_kernel", {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                      {"BLOCK": 128}, {"x_ptr": 16}, {"num_warps": 4})  # fmt: skip
    [art] = compile_specs([spec], 90, None)
    assert not art.ok and art.cubin is None
    assert art.error.startswith("CompilationError") and "Cannot access global variable FLAG" in art.error
    assert "if FLAG == 1" in art.detail
