"""Compile worker, one Triton per process (started by ``compile.py``; stdlib + triton only).

    python _worker.py compile TASKS.json CLAIMS_DIR

TASKS.json: a list of {"spec": KernelSpec dict, "arch": 90, "out": folder}. Several workers share
one list and claim tasks by creating ``CLAIMS_DIR/<i>`` (atomic), so the load balances. Each task's
result is written to its ``out`` folder (artifact.json, <name>.cubin, <name>.ptx) through a
temporary folder renamed at the end, so a folder that exists is complete.

Kernel modules are loaded without running their parent packages' ``__init__`` (which would import
torch, seconds per worker): parents are stand-in namespace modules. When that fails (a kernel
module that needs its package initialised), the module is imported the ordinary way.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
# ptxas -v output (registers, spills) is printed only with this; a compile always runs ptxas
# (TRITON_ALWAYS_COMPILE) into a throwaway Triton cache: the caller keeps its own cache.
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"

INT_TYPES = {"i1", "i8", "i16", "i32", "i64", "u1", "u8", "u16", "u32", "u64"}
DTYPE_PREFIX = "tl."


def _light_import(module: str) -> types.ModuleType:
    parts = module.split(".")
    stub = sys.modules.get(module)
    if getattr(stub, "__aot_stub__", False):  # a stand-in parent, now wanted itself: run its __init__
        init = os.path.join(stub.__path__[0], "__init__.py")
        stub.__file__, stub.__aot_stub__ = init, False
        with open(init) as f:
            exec(compile(f.read(), init, "exec"), stub.__dict__)
        return stub
    if len(parts) == 1 or parts[0] in sys.modules:
        return importlib.import_module(module)
    top = importlib.util.find_spec(parts[0])
    if top is None or not top.submodule_search_locations:
        return importlib.import_module(module)
    before = set(sys.modules)
    try:
        path = list(top.submodule_search_locations)
        for i in range(1, len(parts)):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                stub = types.ModuleType(name)
                stub.__path__ = path
                stub.__package__ = name
                stub.__aot_stub__ = True
                stub.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
                stub.__spec__.submodule_search_locations = path
                sys.modules[name] = stub
            path = [os.path.join(p, parts[i]) for p in sys.modules[name].__path__]
        return importlib.import_module(module)
    except Exception:
        for name in set(sys.modules) - before:
            del sys.modules[name]
        return importlib.import_module(module)


def load_kernel(source: str):
    """The JITFunction named by "package.module:function" or "/path/file.py:function"."""
    from triton.runtime.jit import JITFunction

    module_name, _, qualname = source.rpartition(":")
    if module_name.endswith(".py"):
        name = "_aot_" + re.sub(r"\W", "_", module_name)
        spec = importlib.util.spec_from_file_location(name, module_name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        module = _light_import(module_name)
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):  # autotuner / heuristics wrappers
        obj = obj.fn
    if not isinstance(obj, JITFunction):
        raise TypeError(f"{source} is a {type(obj).__name__}, not a triton JITFunction")
    return obj


def decode_constexpr(value):
    if isinstance(value, str) and value.startswith(DTYPE_PREFIX):
        import triton.language as tl

        return getattr(tl, value[len(DTYPE_PREFIX):])
    return value


def jit_inputs(fn, spec: dict, arch: int):
    """(ASTSource, options dict) exactly as this Triton's JIT builds them for a launch with this
    specialization: the launch's keyword arguments as ``JITFunction.run`` completes them, the
    specialization list its binder would return, then its own ``_pack_args`` (so version
    differences, such as 3.9 giving constexpr parameters an empty attrs entry and 3.6 none, are
    that version's own)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    names = list(fn.arg_names)
    missing = [n for n in names if n not in spec["signature"]]
    if missing:
        raise ValueError(f"spec has no type for parameters {missing}")
    consts = {n: decode_constexpr(v) for n, v in spec["constexprs"].items()}
    if not hasattr(fn, "_pack_args"):  # another Triton: build the same pieces by hand
        return ast_source(fn, spec, names, consts), dict(spec["options"])
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = {**{n: consts[n] for n in names if fn.params[names.index(n)].is_constexpr}, **spec["options"]}
    # What JITFunction.run adds before parsing options (3.6: debug, instrumentation_mode;
    # 3.9 also fpsan_homomorphic_casts).
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    specialization, bound = [], {}
    for n in names:
        ty = spec["signature"][n]
        if ty == "constexpr":
            specialization.append(("constexpr", consts[n]))
            bound[n] = consts[n]
        elif ty.startswith("*") or ty in INT_TYPES - {"u1"}:
            specialization.append((ty, "D" if spec["attrs"].get(n) else ""))
            bound[n] = None
        else:  # fp32, u1: not specialized
            specialization.append((ty, None))
            bound[n] = None
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, None)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


def ast_source(fn, spec: dict, names: list, consts: dict):
    """The ASTSource by hand: signature in parameter order, constants and attrs keyed by the
    parameter's index path, an attrs entry (possibly empty) for every pointer and integer."""
    from triton.compiler import ASTSource

    signature = {n: spec["signature"][n] for n in names}
    constexprs = {(names.index(n),): v for n, v in consts.items()}
    attrs = {}
    for i, n in enumerate(names):
        ty = signature[n]
        if ty.startswith("*") or ty in INT_TYPES - {"u1"}:
            div = spec["attrs"].get(n)
            attrs[(i,)] = [["tt.divisibility", div]] if div else []
    return ASTSource(fn, signature, constexprs, attrs)


def _parse_ptxas_log(log: str) -> dict:
    out = {}
    if m := re.search(r"Used (\d+) registers", log):
        out["registers"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out["stack_bytes"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    return out


def _res_usage(cuobjdump: str, cubin: Path) -> dict:
    try:
        text = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    m = re.search(r"REG:.*", text)
    return {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", m.group(0))} if m else {}


def compile_task(task: dict) -> tuple[dict, dict[str, bytes | str]]:
    """(artifact dict, files) for one task."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    spec, arch = task["spec"], task["arch"]
    name = spec["source"].rpartition(":")[2].rpartition(".")[2]
    try:
        fn = load_kernel(spec["source"])
        src, options = jit_inputs(fn, spec, arch)
    except Exception as e:  # not the compiler's fault: do not cache
        return {"ok": False, "cache": False, "error": f"cannot load {spec['source']}: {type(e).__name__}: {e}",
                "detail": traceback.format_exc()}, {}  # fmt: skip
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:
        message = str(e).strip() or type(e).__name__
        lines = [ln for ln in message.splitlines() if ln.strip()]
        # CompilationError puts the source excerpt first and the reason last.
        first = lines[-1].strip() if type(e).__name__ == "CompilationError" and lines else lines[0].strip()
        return {"ok": False, "cache": True, "error": f"{type(e).__name__}: {first}",
                "detail": message + "\n" + log.getvalue()[-4000:]}, {}  # fmt: skip
    elapsed = time.perf_counter() - start
    meta = kernel.metadata
    metadata = {
        "name": meta.name,
        "num_warps": meta.num_warps,
        "num_stages": meta.num_stages,
        "shared_bytes": meta.shared,
        "ptxas": str(get_ptxas(arch).path),
        "compile_s": round(elapsed, 3),
        **_parse_ptxas_log(log.getvalue()),
    }
    files = {f"{name}.cubin": kernel.asm["cubin"], f"{name}.ptx": kernel.asm["ptx"]}
    return {"ok": True, "cache": True, "error": "", "detail": "", "metadata": metadata}, files


def write_result(out: Path, artifact: dict, files: dict) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for fname, content in files.items():
        (tmp / fname).write_bytes(content if isinstance(content, bytes) else content.encode())
    cubins = [tmp / f for f in files if f.endswith(".cubin")]
    if cubins and artifact.get("metadata") is not None:
        from triton import knobs

        usage = _res_usage(knobs.nvidia.cuobjdump.path, cubins[0])
        artifact["metadata"]["res_usage"] = usage
        artifact["metadata"].setdefault("registers", usage.get("REG"))
    (tmp / "artifact.json").write_text(json.dumps(artifact, indent=1))
    if out.exists():
        shutil.rmtree(out, ignore_errors=True)
    try:
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def main_compile(task_file: str, claims: str) -> int:
    import tempfile

    tasks = json.loads(Path(task_file).read_text())
    Path(claims).mkdir(parents=True, exist_ok=True)
    parent = os.getppid()
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as triton_cache:
        os.environ["TRITON_CACHE_DIR"] = triton_cache
        for i, task in enumerate(tasks):
            if os.getppid() != parent:  # the caller is gone: stop
                return 1
            try:
                os.close(os.open(os.path.join(claims, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            artifact, files = compile_task(task)
            out = Path(task["out"])
            if artifact.pop("cache"):
                write_result(out, artifact, files)
            else:
                # Not cacheable (a load error): report through a sibling file the parent reads once.
                print(f"task {i} failed: {artifact['error']}", file=sys.stderr)
                write_result(out, artifact, {})
                (out / "artifact.json").write_text(json.dumps({**artifact, "transient": True}))
    return 0


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "compile":
        sys.exit(main_compile(*rest))
    sys.exit(f"unknown command {cmd!r}")
