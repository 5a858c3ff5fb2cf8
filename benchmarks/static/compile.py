"""Ahead-of-time compiles of Triton kernels for GPUs this machine does not have.

A ``KernelSpec`` is one specialization, as data: the kernel (``"package.module:function"`` or
``"/abs/path/file.py:function"``), each parameter's type, the constexpr values, the divisibility
attributes and the compile options. It is exactly what Triton's JIT hands ``triton.compile`` for a
launch, so an ahead-of-time compile of it gives the machine code a real launch would run:

    spec = spec_of(launch)                    # a flare_kernels.ops.plan.Launch (meta tensors do)
    [art] = compile_specs([spec], arch=90, triton_version="3.6.0")
    art.ok, art.error, art.cubin, art.metadata["registers"], art.metadata["spill_stores"]

The JIT's specialization rules (the same in triton 3.6 and 3.9, checked against both by
``tests/test_aot_compile.py``): an integer equal to 1 becomes the constant 1; other integers are
i32 when they fit, else i64 (u64 past 2**63 - 1), and carry ``tt.divisibility=16`` when divisible
by 16; floats are fp32; bools u1; None a constant; a tensor is a pointer to its dtype with
``tt.divisibility=16`` when its address is 16-byte aligned. Skipping these (compiling every int as
a plain i32) measures a different kernel: spill figures came out 3x too high.

Compiles run in subprocess workers (``_worker.py``, one Triton per process, ``TRITON_INTERPRET``
removed), ``jobs`` at a time, and are cached on disk under ``<cache>/aot`` keyed by the contents of
the kernel's source folder, the spec, the arch and the Triton version: a second run costs seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .toolchain import Toolchain, cache_dir, toolchain

WORKER = Path(__file__).with_name("_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]

# Per-task wall-clock ceiling inside a worker batch (a runaway compile fails the batch, not CI).
TASK_TIMEOUT_S = 600

_TORCH_TO_TRITON = {
    "float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16",
    "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5", "float8_e4m3fnuz": "fp8e4b8", "float8_e5m2fnuz": "fp8e5b16",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8",
    "uint64": "u64", "uint32": "u32", "uint16": "u16", "uint8": "u8", "bool": "u1",
}  # fmt: skip

# Constexpr values that are Triton dtypes travel as "tl.<attribute>" strings ("tl.bfloat16").
DTYPE_PREFIX = "tl."


# ------------------------------------------------------------------------------------ the spec
@dataclass(frozen=True, eq=False)
class KernelSpec:
    """One specialization of one kernel: what ``triton.compile`` gets (JSON-serializable).

    signature   parameter name -> Triton type ("*bf16", "i32", "fp32", ...) or "constexpr",
                in the kernel's parameter order
    constexprs  name -> value for every "constexpr" parameter (ints, bools, floats, None, and
                Triton dtypes as "tl.bfloat16")
    attrs       name -> divisibility (16) for the pointer and integer parameters that have it
    options     num_warps, num_stages, enable_fp_fusion, ... (``triton.compile`` options)
    """

    source: str
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any] = field(default_factory=dict)
    attrs: Mapping[str, int] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.source.rpartition(":")[2].rpartition(".")[2]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "signature": dict(self.signature),
            "constexprs": dict(self.constexprs),
            "attrs": dict(self.attrs),
            "options": dict(self.options),
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal specs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KernelSpec":
        return cls(d["source"], dict(d["signature"]), dict(d.get("constexprs", {})), dict(d.get("attrs", {})),
                   dict(d.get("options", {})))  # fmt: skip

    @property
    def key(self) -> str:
        """Short content hash of the spec."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KernelSpec) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def describe(self, keys: Iterable[str] | None = None) -> str:
        """A short readable id: name, chosen constexprs, the 1-valued ints, num_warps."""
        consts = {k: v for k, v in self.constexprs.items() if keys is None or k in keys}
        ones = [k for k, v in self.constexprs.items() if self.signature.get(k) == "constexpr" and v == 1
                and k not in consts and not isinstance(v, bool)]  # fmt: skip
        parts = [f"{k}={str(v).removeprefix(DTYPE_PREFIX)}" for k, v in consts.items()]
        if ones:
            parts.append("=1:" + ",".join(ones))
        parts.append(f"w{self.options.get('num_warps', '?')}s{self.options.get('num_stages', '?')}")
        return f"{self.name}[{' '.join(parts)}]"


def encode_constexpr(value: Any) -> Any:
    """A constexpr value as JSON: Triton dtypes become "tl.<name>" strings."""
    if type(value).__name__ == "constexpr" and hasattr(value, "value"):  # tl.constexpr(...) wrapper
        value = value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if _is_tl_dtype(value):
        import triton.language as tl

        for attr, obj in vars(tl).items():
            if obj is value or (_is_tl_dtype(obj) and obj == value and not attr.startswith("_")):
                return DTYPE_PREFIX + attr
    raise TypeError(f"cannot serialize constexpr value {value!r} ({type(value).__name__})")


def _is_tl_dtype(value: Any) -> bool:
    return any(c.__name__ == "dtype" and c.__module__.startswith("triton.language") for c in type(value).__mro__)


def specialize_arg(value: Any) -> tuple[str, Any, int | None]:
    """(type, constant value or None, divisibility or None) of one runtime argument, by the JIT's
    rules. ``value``: a tensor (anything with ``dtype`` and ``aligned`` or ``data_ptr()``), an
    int, a float, a bool or None."""
    if value is None:
        return "constexpr", None, None
    if isinstance(value, bool):
        return "u1", None, None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, None
        if -(2**31) <= value < 2**31:
            ty = "i32"
        elif -(2**63) <= value < 2**63:
            ty = "i64"
        else:
            ty = "u64"
        return ty, None, 16 if value % 16 == 0 else None
    if isinstance(value, float):
        return "fp32", None, None
    dtype = getattr(value, "dtype", None)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        if name not in _TORCH_TO_TRITON:
            raise TypeError(f"no Triton pointer type for tensors of {dtype}")
        aligned = value.aligned if hasattr(value, "aligned") else value.data_ptr() % 16 == 0
        return "*" + _TORCH_TO_TRITON[name], None, 16 if aligned else None
    raise TypeError(f"cannot specialize a runtime argument of type {type(value).__name__}")


def kernel_source(fn: Any) -> str:
    """"module:qualname" of a kernel (a JITFunction, InterpretedFunction or Python function),
    or "/path/file.py:name" when its module cannot be imported by name."""
    raw = getattr(fn, "fn", fn)
    module = raw.__module__
    if module in (None, "__main__") or module.startswith("<"):
        import inspect

        return f"{Path(inspect.getsourcefile(raw)).resolve()}:{raw.__qualname__}"
    return f"{module}:{raw.__qualname__}"


def specialize(
    kernel: Any, args: Mapping[str, Any], constexprs: Mapping[str, Any], options: Mapping[str, Any]
) -> KernelSpec:
    """The spec the JIT compiles for ``kernel`` called with runtime ``args`` (by name: tensors or
    ``TensorArg``s, ints, floats), compile-time ``constexprs`` and ``options``."""
    names = list(kernel.arg_names)
    signature: dict[str, str] = {}
    consts: dict[str, Any] = {}
    attrs: dict[str, int] = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
            consts[name] = encode_constexpr(constexprs[name])
        elif name in args:
            ty, const, div = specialize_arg(args[name])
            signature[name] = ty
            if ty == "constexpr":
                consts[name] = const
            elif div:
                attrs[name] = div
        else:
            raise ValueError(f"{kernel_source(kernel)}: no value for parameter {name!r}")
    return KernelSpec(kernel_source(kernel), signature, consts, attrs, dict(options))


def spec_of(launch: Any) -> KernelSpec:
    """What Triton's JIT would compile for a ``flare_kernels.ops.plan.Launch``."""
    return specialize(launch.kernel, launch.arg_specs(), launch.constexprs, launch.options)


def unique(specs: Iterable[KernelSpec]) -> list[KernelSpec]:
    """Specs without repeats, first occurrence order."""
    return list(dict.fromkeys(specs))


# ------------------------------------------------------------------------------------ artifacts
@dataclass(frozen=True, eq=False)
class Artifact:
    """The result of compiling one spec for one arch with one Triton version.

    metadata: registers, spill_stores, spill_loads, stack_bytes (ptxas -v), shared_bytes,
    num_warps, num_stages (the compiled kernel), res_usage (``cuobjdump -res-usage``), ptxas (the
    binary used), compile_s.
    """

    spec: KernelSpec
    arch: int
    triton_version: str
    ok: bool
    error: str = ""  # one line: the compiler's message
    detail: str = ""  # the rest of it (traceback, ptxas log)
    cubin: Path | None = None
    ptx: Path | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    cached: bool = False

    @property
    def registers(self) -> int | None:
        return self.metadata.get("registers")

    @property
    def spill_bytes(self) -> int | None:
        """Bytes of spill stores per thread (ptxas); None when unknown."""
        return self.metadata.get("spill_stores")

    def summary(self) -> str:
        where = f"sm_{self.arch} triton {self.triton_version}"
        if not self.ok:
            return f"{self.spec.describe()} [{where}]: {self.error}"
        m = self.metadata
        return (
            f"{self.spec.describe()} [{where}]: {m.get('registers')} regs, "
            f"{m.get('spill_stores')}/{m.get('spill_loads')} B spill st/ld, {m.get('shared_bytes')} B smem"
        )


def _module_file(module: str) -> Path:
    """The file of a dotted module, found without importing anything."""
    parts = module.split(".")
    top = importlib.util.find_spec(parts[0])
    if top is None:
        raise ImportError(f"no module named {parts[0]!r}")
    if not top.submodule_search_locations:
        return Path(top.origin)
    base = Path(list(top.submodule_search_locations)[0]).joinpath(*parts[1:])
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def source_files(source: str) -> list[Path]:
    """The files whose contents key a kernel's cache entries: every ``.py`` file in the folder of
    the kernel's module (its jit helpers usually live beside it)."""
    module = source.rpartition(":")[0]
    path = Path(module) if module.endswith(".py") else _module_file(module)
    return sorted(path.parent.glob("*.py"))


def _digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _entry_dir(root: Path, spec: KernelSpec, arch: int, version: str, source_digest: str) -> Path:
    key = hashlib.sha256(
        json.dumps([spec.to_json(), arch, version, source_digest, _digest([WORKER])]).encode()
    ).hexdigest()[:24]
    return root / "aot" / f"triton-{version}" / f"sm_{arch}" / f"{spec.name}-{key}"


def _load_artifact(entry: Path, spec: KernelSpec, arch: int, version: str, cached: bool) -> Artifact | None:
    try:
        data = json.loads((entry / "artifact.json").read_text())
    except (OSError, ValueError):
        return None
    if data.get("transient"):  # a failure that is not the compiler's (a kernel that did not load): retry next time
        shutil.rmtree(entry, ignore_errors=True)
        if cached:
            return None
    cubin, ptx = entry / f"{spec.name}.cubin", entry / f"{spec.name}.ptx"
    return Artifact(
        spec, arch, version, bool(data["ok"]), data.get("error", ""), data.get("detail", ""),
        cubin if cubin.exists() else None, ptx if ptx.exists() else None, data.get("metadata", {}), cached,
    )  # fmt: skip


def compile_specs(
    specs: Sequence[KernelSpec],
    arch: int | Sequence[int],
    triton_version: str | None = None,
    jobs: int = 2,
    *,
    use_cache: bool = True,
    log: Any = None,
) -> list[Artifact]:
    """Compile every spec for ``arch`` (or each arch of a sequence) with ``triton_version`` (None:
    the installed Triton; another version is installed into the cache first).

    Returns one ``Artifact`` per (spec, arch), specs-major: ``[(s0, a0), (s0, a1), (s1, a0), ...]``.
    Failures come back as ``ok=False`` artifacts with the compiler's message, never as exceptions
    (only a toolchain that cannot be set up raises ``ToolchainError``). ``log``: a callable given
    one progress line per finished batch.
    """
    archs = [arch] if isinstance(arch, int) else list(arch)
    chain = toolchain(triton_version)
    root = cache_dir()
    digests: dict[str, str] = {}
    tasks: list[tuple[KernelSpec, int, Path]] = []
    for spec in specs:
        if spec.source not in digests:
            digests[spec.source] = _digest(source_files(spec.source))
        for a in archs:
            tasks.append((spec, a, _entry_dir(root, spec, a, chain.version, digests[spec.source])))

    results: dict[Path, Artifact] = {}
    todo: list[tuple[KernelSpec, int, Path]] = []
    for spec, a, entry in tasks:
        art = _load_artifact(entry, spec, a, chain.version, cached=True) if use_cache else None
        if art is not None:
            results[entry] = art
        elif entry not in {t[2] for t in todo}:
            todo.append((spec, a, entry))
    if todo:
        start = time.perf_counter()
        failures = _run_workers(chain, todo, jobs)
        for spec, a, entry in todo:
            art = _load_artifact(entry, spec, a, chain.version, cached=False)
            if art is None:
                art = Artifact(spec, a, chain.version, False, *failures.get(entry, ("worker gave no result", "")))
            results[entry] = art
        if log:
            log(f"triton {chain.version}: compiled {len(todo)} for sm_{'/'.join(map(str, archs))} "
                f"in {time.perf_counter() - start:.1f} s ({len(tasks) - len(todo)} cached)")  # fmt: skip
    return [results[entry] for _, _, entry in tasks]


def _run_workers(chain: Toolchain, todo: list[tuple[KernelSpec, int, Path]], jobs: int) -> dict[Path, tuple[str, str]]:
    """Run ``jobs`` workers over the tasks (they claim tasks one by one, so the load balances).
    Returns (error, detail) for tasks whose worker died before writing a result."""
    jobs = max(1, min(jobs, len(todo)))
    with tempfile.TemporaryDirectory(prefix="flare-aot-") as tmp:
        task_file = Path(tmp) / "tasks.json"
        task_file.write_text(json.dumps([
            {"spec": spec.to_dict(), "arch": arch, "out": str(entry)} for spec, arch, entry in todo
        ]))  # fmt: skip
        env = chain.env()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(REPO_ROOT)) if p)
        logs = [Path(tmp) / f"worker-{i}.log" for i in range(jobs)]
        procs = []
        for log in logs:
            with open(log, "w") as stderr:  # a file, not a pipe: a chatty worker never blocks
                procs.append(subprocess.Popen(
                    chain.command(str(WORKER), "compile", str(task_file), str(Path(tmp) / "claims")),
                    env=env, cwd=str(REPO_ROOT), stdout=subprocess.DEVNULL, stderr=stderr,
                ))  # fmt: skip
        errors = []
        try:
            for p, log in zip(procs, logs):
                try:
                    p.wait(timeout=TASK_TIMEOUT_S * len(todo))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                if p.returncode:
                    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
                    errors.append((f"compile worker exited with status {p.returncode}: {tail[-1] if tail else ''}",
                                   "\n".join(tail[-40:])))  # fmt: skip
        finally:  # interrupted (Ctrl-C, a test timeout): no orphan compilers
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    missing = {entry: errors[0] if errors else ("worker gave no result", "") for _, _, entry in todo}
    return missing


def clear_cache() -> None:
    """Remove every cached compile (not the installed toolchains)."""
    shutil.rmtree(cache_dir() / "aot", ignore_errors=True)


# ------------------------------------------------------------------------------------ the JIT itself
def jit_spec(kernel: Any, args: Sequence[Any], constexprs: Mapping[str, Any], options: Mapping[str, Any]) -> KernelSpec:
    """The spec the running process's Triton JIT computes for a call ``kernel[grid](*args,
    **constexprs, **options)`` with real tensors, by running its own binder (the code a launch runs
    before ``triton.compile``); no GPU needed. The reference ``spec_of`` is tested against."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = getattr(kernel, "fn", kernel)
    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(fn)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = {**constexprs, **options}
    bound_args, specialization, opts = binder(*args, **kwargs)
    _, signature, consts, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, opts)
    names = list(jit.arg_names)
    divisibility = {}
    for path, pairs in attrs.items():
        for attr, value in pairs:
            if attr == "tt.divisibility":
                divisibility[names[path[0]]] = value
    return KernelSpec(
        kernel_source(kernel),
        {n: signature[n] for n in names},
        {names[path[0]]: encode_constexpr(v) for path, v in consts.items()},
        divisibility,
        dict(options),
    )
