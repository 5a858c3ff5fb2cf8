"""The anchors of the static report: other projects' Triton kernels, compiled and measured exactly
as ours are (``compile.compile_specs``, then ``sass.py`` and ``cost.py``).

* ``gemlite``: GemLite's 4-bit (A16W4) kernels from the ``gemlite`` PyPI package, the kernel its
  dispatch picks for the batch size (``core.get_matmul_type``: M = 1 -> GEMV_REVSPLITK, M in 5..63
  -> GEMM_SPLITK, M >= 64 -> GEMM; M = 2..4 stays GEMV) with the config GemLite itself loads on an
  H100 (its ``configs/h100.json`` cache, read at import on a device whose name contains "h100";
  an H200's name matches no file, and GemLite would autotune there). The weight setup is GemLite's
  default asymmetric 4-bit one: group 64 (our blocksize), bf16 scales and zeros folded as
  ``W = Wq * s + z`` (``W_group_mode`` 4), packed 8 per int32 along K (``data_contiguous``).
  Loaded through ``shims/gemlite_kernels.py`` (``import gemlite`` needs CUDA).
* ``bnb_dequant``: bitsandbytes 0.50's Triton NF4 dequantization, ``dequant_nf4_kernel`` in
  ``bitsandbytes/backends/triton/kernels_4bit.py`` (what its ``dequantize_4bit`` launches for
  nf4: 256 packed bytes per program, a where-tree decode, fp32 absmax; with double quantization
  bitsandbytes first restores absmax in a separate 8-bit kernel, not counted here). Loaded by file
  path. Also ``bnb_dequant_code``: the table-gather variant (``dequant_4bit_kernel``) its
  ``gemv_4bit`` path uses.

Each anchor launch says what one pass of its main loop dequantizes (``weights_per_pass``), how
many passes a program makes, and its FLOPs and bytes (Marlin's count: activations + 0.5 B per
weight + scales (+ zeros) + outputs).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Shape
from .compile import KernelSpec, specialize

GEMLITE_SOURCE = "benchmarks.static.shims.gemlite_kernels"
GROUP = 64  # GemLite group size = our NF4 blocksize


@dataclass(frozen=True)
class AnchorLaunch:
    provider: str
    op: str
    shape: Shape
    m: int  # rows of activations (0: the kernel does not depend on M)
    kernel: str  # short name for rows and plots
    spec: KernelSpec
    grid: tuple[int, ...]
    num_warps: int
    weights_per_pass: int  # weights dequantized by one pass of the main loop (per program if no loop)
    passes: int  # main-loop passes per program (1 without a loop)
    flops: float
    bytes: float
    config: str  # which config, and where it comes from

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


class _T:
    """A tensor argument as ``compile.specialize_arg`` reads it (dtype + alignment)."""

    def __init__(self, dtype):
        self.dtype, self.aligned = dtype, True


def _constexprs(kernel, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` plus the defaults of the kernel's remaining constexpr parameters (what the JIT
    binds when a launch leaves them out)."""
    import inspect

    out = dict(given)
    for p in kernel.params:
        if p.is_constexpr and p.name not in out:
            if p.default is inspect.Parameter.empty:
                raise ValueError(f"{kernel.__name__}: no value for constexpr {p.name}")
            out[p.name] = p.default
    return out


def _runtime(kernel, given: dict[str, Any]) -> dict[str, Any]:
    """Runtime arguments by name, defaults filled in (GemLite's ``meta_scale_norm_ptr=None``)."""
    import inspect

    out = {}
    for p in kernel.params:
        if p.is_constexpr:
            continue
        if p.name in given:
            out[p.name] = given[p.name]
        elif p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
        else:
            raise ValueError(f"{kernel.__name__}: no value for parameter {p.name}")
    return out


# ------------------------------------------------------------------------------------ GemLite
def gemlite_version() -> str | None:
    try:
        return importlib.metadata.version("gemlite")
    except importlib.metadata.PackageNotFoundError:
        return None


def _gemlite_config(matmul_type: str, key: tuple) -> dict[str, Any]:
    from .shims import gemlite_kernels

    configs = json.loads((gemlite_kernels.package_dir() / "configs" / "h100.json").read_text())
    table = configs.get(matmul_type, {})
    if str(key) not in table:
        raise KeyError(f"GemLite's h100.json has no {matmul_type} entry for {key}")
    return dict(table[str(key)])


def gemlite_launch(shape: Shape, m: int) -> AnchorLaunch:
    """GemLite's launch for x [m, K] bf16 times a 4-bit [N, K] weight, as its dispatch makes it."""
    import torch
    import triton.language as tl

    from .shims import gemlite_kernels

    n, k = shape.n, shape.k
    utils = gemlite_kernels.module("utils")
    type_id = 1 * 100 + 4  # GemLite keys bf16 like fp16 (DType.FP16 = 1), W_nbits = 4
    if m >= 64:
        matmul_type, attr = "GEMM", "gemm"
    elif m > 4:
        matmul_type, attr = "GEMM_SPLITK", "gemm_splitK"
    else:
        matmul_type, attr = "GEMV_REVSPLITK", "gemv_revsplitK"
    key = (utils.get_closest_m(m), n, k, GROUP, 8, type_id)
    cfg = _gemlite_config(matmul_type, key)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    for drop in ("num_ctas", "num_buffers_warp_spec", "num_consumer_groups", "reg_dec_producer", "reg_inc_consumer"):
        cfg.pop(drop, None)
    kernel = getattr(gemlite_kernels, attr)
    bm, bn, bk = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    common = dict(
        N=n, K=k, W_nbits=4, group_size=GROUP, unpack_mask=15, elements_per_sample=8, type_id=type_id,
        input_dtype=tl.bfloat16, output_dtype=tl.bfloat16, acc_dtype=tl.float32, meta_dtype=tl.bfloat16,
        channel_scale_mode=0, W_group_mode=4, zero_is_scalar=False, data_contiguous=True,
    )  # fmt: skip
    tensors = dict(a_ptr=_T(torch.bfloat16), b_ptr=_T(torch.int32), c_ptr=_T(torch.bfloat16),
                   scales_ptr=_T(torch.bfloat16), zeros_ptr=_T(torch.bfloat16), scales_a_ptr=None)  # fmt: skip
    if matmul_type == "GEMV_REVSPLITK":
        split_k = 2  # fixed in GemLite's GEMV_REVSPLITK: each program does two BLOCK_K slices, no loop
        consts = dict(common, use_prehook=False, stride_am=k, stride_ak=1, stride_bk=n, stride_bn=1,
                      stride_cm=n, stride_cn=1, stride_meta_a_m=0, stride_meta_a_g=0, stride_meta_g=n,
                      stride_meta_n=1, dump_b_val=0, EVEN_K=k % (bk * split_k) == 0, EVEN_N=n % bn == 0,
                      **cfg)  # fmt: skip
        args = dict(tensors, M=m)
        grid = (math.ceil(m / bm) * math.ceil(n / bn), math.ceil(k / (bk * split_k)))
        per_pass, passes = bn * bk * split_k, 1
    else:
        split = cfg.get("SPLIT_K", 1)
        consts = dict(common, a_sizeof=2, b_sizeof=4, NUM_STAGES=num_stages, use_tma=False, use_5d_scales=False,
                      warp_specialize=False, EVEN_M=m % bm == 0, EVEN_N=n % bn == 0,
                      EVEN_K=k % (bk * split) == 0, **cfg)  # fmt: skip
        args = dict(tensors, M=m, M_CLOSEST=utils.get_closest_m(m), stride_am=k, stride_ak=1, stride_bk=n,
                    stride_bn=1, stride_cm=n, stride_cn=1, stride_meta_a_m=None, stride_meta_a_g=None,
                    stride_meta_g=n, stride_meta_n=1, load_scales_as_block=False, meta_scale_norm_ptr=0.0)  # fmt: skip
        grid = (math.ceil(m / bm) * math.ceil(n / bn), split) if matmul_type == "GEMM_SPLITK" else (
            math.ceil(m / bm) * math.ceil(n / bn),)  # fmt: skip
        per_pass, passes = bn * bk, math.ceil(k / (bk * split))
    options = {"num_warps": num_warps, "num_stages": num_stages}
    spec = specialize(kernel, _runtime(kernel, args), _constexprs(kernel, consts), options)
    spec = dataclasses.replace(spec, source=f"{GEMLITE_SOURCE}:{attr}")
    scales = 2 * 2 * (n * k // GROUP)  # bf16 scales + bf16 zeros per group
    moved = 2 * m * k + n * k / 2 + scales + 2 * m * n
    tile = f"{bm}x{bn}x{bk}" + (f" split-K {cfg['SPLIT_K']}" if "SPLIT_K" in cfg else "")
    config = (f"GemLite {gemlite_version()} {matmul_type} {tile}, {num_warps} warps, {num_stages} stages "
              f"(configs/h100.json key {key})")  # fmt: skip
    return AnchorLaunch("gemlite", "w4a16_gemm", shape, m, f"gemlite_{attr}", spec, grid, num_warps, per_pass,
                        passes, 2.0 * m * n * k, float(moved), config)  # fmt: skip


# ------------------------------------------------------------------------------------ bitsandbytes
def bnb_kernels_file() -> Path:
    spec = importlib.util.find_spec("bitsandbytes")  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("bitsandbytes is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "backends" / "triton" / "kernels_4bit.py"
    if not path.is_file():
        raise ImportError(f"{path} not found (bitsandbytes >= 0.45 ships it)")
    return path


def _load_by_path(path: Path):
    name = "_anchor_" + path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def bnb_launch(shape: Shape, variant: str = "nf4") -> AnchorLaunch:
    """bitsandbytes' Triton dequantization of one NF4 weight to bf16 (``dequantize_4bit_impl``:
    SPLIT_SIZE 256 packed bytes per program, the JIT's default 4 warps and 3 stages)."""
    import torch

    path = bnb_kernels_file()
    module = _load_by_path(path)
    fname = {"nf4": "dequant_nf4_kernel", "code": "dequant_4bit_kernel"}[variant]
    kernel = getattr(module, fname)
    n, k = shape.n, shape.k
    paired = n * k // 2
    split = 256
    args = dict(a_ptr=_T(torch.uint8), c_ptr=_T(torch.bfloat16), absmax_ptr=_T(torch.float32),
                num_paired_elements=paired, num_output_elements=n * k)  # fmt: skip
    if variant == "code":
        args["quant_ptr"] = _T(torch.float32)
    options = {"num_warps": 4, "num_stages": 3}
    spec = specialize(kernel, _runtime(kernel, args), _constexprs(kernel, dict(QUANT_BLOCK=GROUP, SPLIT_SIZE=split)),
                      options)  # fmt: skip
    spec = dataclasses.replace(spec, source=f"{path}:{fname}")
    moved = n * k / 2 + 4 * (n * k // GROUP) + 2 * n * k  # packed + fp32 absmax + bf16 output
    version = importlib.metadata.version("bitsandbytes")
    how = "where-tree decode" if variant == "nf4" else "16-entry table gather"
    config = f"bitsandbytes {version} {fname} ({how}), SPLIT_SIZE {split}, QUANT_BLOCK {GROUP}, 4 warps"
    provider = "bnb_dequant" if variant == "nf4" else "bnb_dequant_code"
    return AnchorLaunch(provider, "nf4_dequant", shape, 0, fname, spec, (math.ceil(paired / split),), 4,
                        2 * split, 1, 0.0, float(moved), config)  # fmt: skip


def anchor_launches(shapes: list[Shape], ms: list[int]) -> tuple[list[AnchorLaunch], dict[str, str]]:
    """Every anchor launch for the shapes and row counts, and {anchor (or anchor cell): why skipped}."""
    launches: list[AnchorLaunch] = []
    skipped: dict[str, str] = {}

    def why(e: Exception) -> str:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    if gemlite_version() is None:
        skipped["gemlite"] = "gemlite is not installed (pip install gemlite)"
    else:
        for shape in shapes:
            for m in ms:
                try:
                    launches.append(gemlite_launch(shape, m))
                except KeyError as e:  # no cached config: GemLite would autotune on the device
                    skipped[f"gemlite {shape.name} M={m}"] = str(e).strip("'\"") + " (it would autotune on the GPU)"
                except Exception as e:  # e.g. a GemLite version with other kernels or parameters
                    skipped["gemlite"] = why(e)
                    launches = [a for a in launches if a.provider != "gemlite"]
                    break
            if "gemlite" in skipped:
                break
    try:
        for shape in shapes:
            launches += [bnb_launch(shape, "nf4"), bnb_launch(shape, "code")]
    except Exception as e:
        skipped["bnb_dequant"] = why(e)
        launches = [a for a in launches if not a.provider.startswith("bnb")]
    return launches, skipped
