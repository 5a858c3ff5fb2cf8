"""What a cubin says: registers, spills, shared memory, and the main loop's instruction count.

Everything here reads files and runs the CUDA tools shipped in Triton's wheel (``cuobjdump``,
``ptxas``); nothing needs a GPU or a driver.

* ``resource_usage``: ``cuobjdump -res-usage`` per function: REG (registers per thread), STACK
  (bytes of stack frame: non-zero when the kernel spills or keeps arrays in local memory), SHARED
  (static shared memory; Triton's shared memory is dynamic and comes from the compile metadata),
  LOCAL.
* ``spill_bytes``: ``ptxas -v`` on the PTX, parsing "N bytes spill stores, M bytes spill loads".
  Run only where STACK > 0 ("where needed"): it recompiles the PTX, seconds per kernel.
* ``parse_sass`` / ``main_loop``: ``cuobjdump -sass`` listing; the main loop is the backward
  branch (``BRA`` to a lower address) spanning the most instructions (kernel-notes: this is
  where the K loop of a Triton kernel lands, also when software pipelining peels a prologue and
  an epilogue). A kernel without a backward branch (GemLite's GEMV, bitsandbytes' dequant) has
  no loop: its whole body is one pass.

Counts are static: both arms of a branch inside the loop are counted, NOPs (alignment padding)
are not.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# "/*0a30*/    @!P4 BRA 0xca90 ;" -> address, predicate, opcode (with modifiers), operands
_INST = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_RES = re.compile(r"^\s*Function\s+(\S+):\s*$")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Instruction:
    addr: int
    opcode: str  # with modifiers, e.g. "HGMMA.64x64x16.F32.BF16"
    operands: str
    predicated: bool

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]


@dataclass(frozen=True)
class Loop:
    """The instructions from a backward branch's target to the branch itself, inclusive."""

    start: int
    end: int
    instructions: int  # non-NOP instructions in [start, end]
    opcodes: dict[str, int] = field(default_factory=dict, compare=False)  # base opcode -> count


@dataclass(frozen=True)
class Resources:
    registers: int
    stack: int
    shared_static: int
    local: int


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """Instructions per function of a ``cuobjdump -sass`` (or ``nvdisasm -hex``-less) listing."""
    out: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            current = m.group(1)
            out[current] = []
            continue
        m = _INST.match(line)
        if m and current is not None:
            out[current].append(Instruction(int(m.group(1), 16), m.group(3), m.group(4).strip(), bool(m.group(2))))
    return out


def _branch_target(inst: Instruction) -> int | None:
    if inst.base not in ("BRA", "JMP", "BRX"):
        return None
    m = re.search(r"0x([0-9a-f]+)", inst.operands)
    return int(m.group(1), 16) if m else None


def _count(instrs: list[Instruction], start: int, end: int) -> tuple[int, dict[str, int]]:
    inside = [i for i in instrs if start <= i.addr <= end and i.base != "NOP"]
    return len(inside), dict(collections.Counter(i.base for i in inside))


def loops(instrs: list[Instruction]) -> list[Loop]:
    """Every backward branch as a loop, widest first (a branch to itself, the ``BRA`` after
    ``EXIT`` that pads a function, is not a loop)."""
    found = []
    for inst in instrs:
        target = _branch_target(inst)
        if target is not None and target < inst.addr:
            n, ops = _count(instrs, target, inst.addr)
            found.append(Loop(target, inst.addr, n, ops))
    return sorted(found, key=lambda lp: -lp.instructions)


def main_loop(instrs: list[Instruction]) -> Loop | None:
    """The backward branch spanning the most instructions, or None for straight-line code."""
    found = loops(instrs)
    return found[0] if found else None


def body_instructions(instrs: list[Instruction]) -> int:
    """Non-NOP instructions of a function up to its last EXIT (the padding loop after it excluded)."""
    exits = [i.addr for i in instrs if i.base == "EXIT"]
    last = max(exits) if exits else (instrs[-1].addr if instrs else -1)
    return sum(1 for i in instrs if i.addr <= last and i.base != "NOP")


def parse_res_usage(text: str) -> dict[str, Resources]:
    """``cuobjdump -res-usage`` output: per function REG / STACK / SHARED / LOCAL."""
    out: dict[str, Resources] = {}
    current = None
    for line in text.splitlines():
        m = _RES.match(line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            vals = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            out[current] = Resources(*(vals.get(k, 0) for k in ("REG", "STACK", "SHARED", "LOCAL")))
            current = None
    return out


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout + proc.stderr


def resource_usage(cubin: Path, cuobjdump: Path) -> dict[str, Resources]:
    return parse_res_usage(_run([str(cuobjdump), "-res-usage", str(cubin)]))


def disassemble(cubin: Path, cuobjdump: Path) -> dict[str, list[Instruction]]:
    return parse_sass(_run([str(cuobjdump), "-sass", str(cubin)]))


def parse_spills(text: str) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) summed over the functions of a ``ptxas -v`` log."""
    stores = loads = 0
    for s, ld in _SPILL.findall(text):
        stores, loads = stores + int(s), loads + int(ld)
    return stores, loads


def spill_bytes(ptx: Path, ptxas: Path, arch: int, out_dir: Path) -> tuple[int, int]:
    """Recompile the PTX with ``ptxas -v`` (Triton's defaults: -O3, the arch with its ``a``
    suffix on sm_90) and read the spill figures."""
    suffix = "a" if arch >= 90 else ""
    out = out_dir / (ptx.stem + ".spill-check.cubin")
    log = _run([str(ptxas), "-v", "-O3", f"--gpu-name=sm_{arch}{suffix}", str(ptx), "-o", str(out)])
    return parse_spills(log)


@dataclass(frozen=True)
class KernelSass:
    """One compiled kernel as the report reads it."""

    name: str
    resources: Resources
    loop: Loop | None
    body: int  # non-NOP instructions of the whole function
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0

    @property
    def loop_instructions(self) -> int:
        """Instructions of one pass of the main loop (the whole body when there is no loop)."""
        return self.loop.instructions if self.loop else self.body

    @property
    def outside_loop(self) -> int:
        return self.body - self.loop.instructions if self.loop else 0

    def opcode_count(self, *bases: str) -> int:
        if self.loop is None:
            return 0
        return sum(self.loop.opcodes.get(b, 0) for b in bases)


def to_dict(k: KernelSass) -> dict:
    loop = None if k.loop is None else [k.loop.start, k.loop.end, k.loop.instructions, dict(k.loop.opcodes)]
    return {"name": k.name, "resources": list(dataclasses.astuple(k.resources)), "loop": loop, "body": k.body,
            "spill_store_bytes": k.spill_store_bytes, "spill_load_bytes": k.spill_load_bytes}  # fmt: skip


def from_dict(d: dict) -> KernelSass:
    loop = None if d["loop"] is None else Loop(*d["loop"])
    return KernelSass(d["name"], Resources(*d["resources"]), loop, d["body"], d["spill_store_bytes"],
                      d["spill_load_bytes"])  # fmt: skip


def _code_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def analyze_cached(cubin: Path, cuobjdump: Path, ptx: Path | None = None, ptxas: Path | None = None,
                   arch: int = 90) -> KernelSass:  # fmt: skip
    """``analyze``, remembered beside the cubin (keyed by this file's contents): ``cuobjdump -sass``
    takes seconds per kernel on a loaded 2-core machine, and a cubin never changes."""
    memo = cubin.with_name(f"{cubin.stem}.sass-{_code_digest()}.json")
    try:
        return from_dict(json.loads(memo.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    k = analyze(cubin, cuobjdump, ptx, ptxas, arch)
    try:
        tmp = memo.with_name(memo.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(to_dict(k)))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache: analyse again next time
    return k


def analyze(cubin: Path, cuobjdump: Path, ptx: Path | None = None, ptxas: Path | None = None, arch: int = 90,
            name: str | None = None) -> KernelSass:  # fmt: skip
    """Resources, main loop and (where STACK > 0 and ``ptxas`` is given) spill bytes of a cubin's kernel."""
    res = resource_usage(cubin, cuobjdump)
    sass = disassemble(cubin, cuobjdump)
    if not sass:
        raise RuntimeError(f"{cubin}: no SASS functions found")
    fname = name if name in sass else next(iter(sass))
    instrs = sass[fname]
    r = res.get(fname) or next(iter(res.values()))
    stores = loads = 0
    if r.stack > 0 and ptx is not None and ptxas is not None:
        stores, loads = spill_bytes(ptx, ptxas, arch, cubin.parent)
    return KernelSass(fname, r, main_loop(instrs), body_instructions(instrs), stores, loads)
