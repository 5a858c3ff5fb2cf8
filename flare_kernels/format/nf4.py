"""NF4 weights in bitsandbytes' storage format.

Layout of a weight W of shape [N = out_features, K = in_features], blocksize BS::

    flat index   i = n * K + k                        (row-major)
    packed byte  packed[i // 2]                        (uint8)
    nibble       high 4 bits if i is even, low 4 bits if i is odd
                   byte = q[2j] << 4 | q[2j + 1]
    block        b = i // BS                           (blocks run across rows if K % BS != 0)
    value        W[n, k] = NF4[q[i]] * absmax[b]       (fp32 product, then cast)

With double quantization ("nested", the QLoRA default) absmax itself is stored as uint8 codes::

    absmax[b] = dyn[qa[b]] * nested_absmax[b // 256] + nested_offset      (fp32, two roundings)

where ``dyn`` is the 256-entry signed dynamic map. 4 + 8/BS + 32/(256*BS) bits per weight:
about 4.127 at BS = 64 (8.66 MB for a 4096 x 4096 projection).
"""

from __future__ import annotations

import sys
import warnings
from typing import NamedTuple

import torch
from torch import nn

from .codes import dynamic_code, nf4_code, round_to_code_cpu, round_to_code_cuda, round_to_nf4


def _is_dtensor(t: torch.Tensor) -> bool:
    """FSDP2 holds a sharded parameter as a DTensor between the layers that use it. No DTensor exists
    unless its module was imported; importing it here would add ~1.8 s to ``import flare_kernels``."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
NF4_ZERO_CODE = 7
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Every tensor of the weight is sharded, the code maps too: they add 1.1 KB to the 8.66 MB a
# 4096 x 4096 weight gathers, and each rank then holds exactly 1/world of the weight's bytes.
SHARDABLE = ("packed", "absmax", "code", "nested_absmax", "nested_code", "nested_offset")


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax of a flat fp32 tensor (last block may be short) and the padded [B, BS] view."""
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    return padded.abs().amax(dim=1), padded


def _quantize_blockwise_8bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' 8-bit dynamic blockwise quantization (blocksize 256) of fp32 ``values``."""
    code = dynamic_code(values.device)
    absmax, padded = _blockwise_absmax(values, NESTED_BLOCKSIZE)
    inverse = torch.where(absmax > 0, 1.0 / absmax, 0.0)
    scaled = (padded * inverse[:, None]).reshape(-1)[: values.numel()]
    rounding = round_to_code_cuda if values.device.type == "cuda" else round_to_code_cpu
    q = rounding(scaled, code)
    # An all-zero block gets code 0 on both devices (CPU: written explicitly; CUDA: 0 * (1/0) is
    # NaN, which the pivot search sends to index 0).
    q = torch.where(absmax.repeat_interleave(NESTED_BLOCKSIZE)[: values.numel()] == 0, 0, q)
    return q.to(torch.uint8), absmax, code


class NF4Tensors(NamedTuple):
    """The tensors and sizes of an NF4 weight, flat, as ops and kernels take them."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    nested_offset: torch.Tensor | None
    out_features: int
    in_features: int
    blocksize: int

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block scales as fp32, expanding double quantization the way bitsandbytes does."""
        if not self.nested:
            return self.absmax
        idx = torch.arange(self.absmax.numel(), device=self.absmax.device) // NESTED_BLOCKSIZE
        scales = self.nested_code[self.absmax.long()] * self.nested_absmax[idx]
        return scales + self.nested_offset

    def codes(self) -> torch.Tensor:
        """The 4-bit code of every value, uint8 [N, K]."""
        n, k = self.out_features, self.in_features
        unpacked = torch.stack((self.packed >> 4, self.packed & 0xF), dim=1).reshape(-1)
        return unpacked[: n * k].view(n, k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W as a dense [N, K] tensor, bit-identical to ``bitsandbytes.functional.dequantize_4bit``."""
        n, k = self.out_features, self.in_features
        total, bs = n * k, self.blocksize
        # One gather per byte from a 256-entry table of (high, low) value pairs, each pair read as a
        # single 8-byte word: 10x faster on a CPU than unpacking nibbles and indexing per value.
        pairs = torch.stack((self.code.repeat_interleave(16), self.code.repeat(16)), dim=1)
        words = torch.gather(pairs.contiguous().view(torch.int64).view(-1), 0, self.packed.long())
        values = words.view(torch.float32)[:total]
        absmax = self.absmax_fp32()
        full = total - total % bs
        scaled = (values[:full].view(-1, bs) * absmax[: full // bs, None]).view(-1)
        if full < total:  # a last, short block
            scaled = torch.cat((scaled, values[full:] * absmax[-1]))
        return scaled.view(n, k).to(dtype)


class NF4Weight(nn.Module):
    """A frozen NF4 weight (bitsandbytes layout, see the module docstring) held as buffers.

    Buffers: ``packed`` uint8 [ceil(N*K/2)], ``absmax`` (fp32 [n_blocks], or uint8 codes when
    nested), ``code`` fp32 [16], and when nested ``nested_absmax`` fp32 [ceil(n_blocks/256)],
    ``nested_code`` fp32 [256], ``nested_offset`` fp32 [] (a tensor, so kernels read it without a
    host sync). ``.to(device)`` moves them; dtype casts (``model.half()``) leave them as they are.

    ``make_shardable()`` turns them into frozen 1-D uint8 parameters holding the same bytes (what
    FSDP2 shards; see ``flare.train.fsdp``).
    """

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: tuple[int, int],
        blocksize: int = 64,
        *,
        code: torch.Tensor | None = None,
        nested_absmax: torch.Tensor | None = None,
        nested_code: torch.Tensor | None = None,
        nested_offset: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_blocksize(blocksize)
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"shape must be (out_features, in_features) with both > 0, got {tuple(shape)}")
        n_values = shape[0] * shape[1]
        n_blocks = -(-n_values // blocksize)
        packed = packed.view(torch.uint8).reshape(-1)
        if packed.numel() != -(-n_values // 2):
            raise ValueError(
                f"packed has {packed.numel()} bytes, shape {tuple(shape)} needs {-(-n_values // 2)}"
            )
        nested = nested_absmax is not None
        if nested != (nested_code is not None) or nested != (nested_offset is not None):
            raise ValueError("nested_absmax, nested_code and nested_offset go together")
        expected_absmax_dtype = torch.uint8 if nested else torch.float32
        if absmax.dtype != expected_absmax_dtype or absmax.numel() != n_blocks:
            raise ValueError(
                f"absmax must be {expected_absmax_dtype} with {n_blocks} entries for shape {tuple(shape)} "
                f"and blocksize {blocksize}, got {absmax.dtype} with {absmax.numel()}"
            )
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.blocksize = int(blocksize)
        self.dtype = dtype
        self.compute_dtype = compute_dtype
        self._byte_dtypes: dict[str, torch.dtype] | None = None  # set by make_shardable
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax.reshape(-1))
        self.register_buffer("code", nf4_code(packed.device) if code is None else code.float())
        self.register_buffer("nested_absmax", nested_absmax.float().reshape(-1) if nested else None)
        self.register_buffer("nested_code", nested_code.float() if nested else None)
        self.register_buffer(
            "nested_offset", nested_offset.float().reshape(()).to(packed.device) if nested else None
        )

    # ---------------------------------------------------------------- properties
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return (self._buffers if self._byte_dtypes is None else self._parameters)["packed"].device

    @property
    def shardable(self) -> bool:
        return self._byte_dtypes is not None

    def extra_repr(self) -> str:
        n, k = self.shape
        return f"shape=({n}, {k}), blocksize={self.blocksize}, double_quant={self.nested}, dtype={self.dtype}"

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) casts floating buffers; absmax and the code maps must stay fp32, so
        # keep each buffer's dtype and take only the device the conversion asks for.
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            if moved.dtype != buf.dtype:
                moved = buf.to(device=moved.device)
            self._buffers[name] = moved
        for name, param in self._parameters.items():  # the uint8 bytes after make_shardable: no dtype to keep
            moved = None if param is None else fn(param)
            if moved is not None and moved is not param:
                self._parameters[name] = nn.Parameter(moved, requires_grad=False)
        return self

    def make_shardable(self) -> "NF4Weight":
        """Hold every tensor (packed, absmax, code, nested_*) as a frozen 1-D uint8 parameter (a view of
        the same bytes, no copy) so FSDP2 can shard it along dim 0; idempotent.

        Why bytes: uint8 parameters are never cast by FSDP2's mixed precision (it casts floating ones
        only), so the fp32 scales keep their exact bits under ``param_dtype=bfloat16``, and the
        kernels read the gathered bytes as they are (``tensors()`` views them back).
        """
        if self._byte_dtypes is not None:
            return self
        dtypes = {}
        for name in SHARDABLE:
            t = self._buffers[name]
            if t is None:
                continue
            dtypes[name] = t.dtype
            del self._buffers[name]
            # reshape(-1): nested_offset is 0-dim, and FSDP2 shards dim 0
            self.register_parameter(name, nn.Parameter(t.reshape(-1).view(torch.uint8), requires_grad=False))
        self._byte_dtypes = dtypes
        return self

    # ---------------------------------------------------------------- values
    def tensors(self) -> NF4Tensors:
        """The flat view ops take (no copies)."""
        # Straight from the buffer dict: nn.Module.__getattr__ per buffer made this 14 us a call,
        # a tenth of a decode step's Python overhead on a CPU.
        b = self._buffers
        if self._byte_dtypes is None:
            return NF4Tensors(
                b["packed"], b["absmax"], b["code"], b["nested_absmax"], b["nested_code"], b["nested_offset"],
                self.shape[0], self.shape[1], self.blocksize,
            )
        p, dtypes = self._parameters, self._byte_dtypes
        if _is_dtensor(p["packed"]):
            raise RuntimeError(
                "this NF4 weight is sharded by FSDP (each rank holds a slice of its bytes): call the FSDP-wrapped "
                "block, or gather the model first (flare.train.fsdp.gathered)"
            )
        if "nested_absmax" not in dtypes:
            nested = (None, None, None)
        else:
            nested = (p["nested_absmax"].view(torch.float32), p["nested_code"].view(torch.float32),
                      p["nested_offset"].view(torch.float32).reshape(()))  # fmt: skip
        return NF4Tensors(
            p["packed"], p["absmax"].view(dtypes["absmax"]), p["code"].view(torch.float32), *nested,
            self.shape[0], self.shape[1], self.blocksize,
        )

    def absmax_fp32(self) -> torch.Tensor:
        return self.tensors().absmax_fp32()

    def codes(self) -> torch.Tensor:
        return self.tensors().codes()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W as a dense [N, K] tensor (default: the dtype it was quantized from), bit-identical to
        ``bitsandbytes.functional.dequantize_4bit``."""
        return self.tensors().dequantize(dtype or self.dtype)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_bnb(cls, obj) -> "NF4Weight":
        """Wrap a bitsandbytes ``Params4bit`` or ``Linear4bit`` (nf4) without copying its bytes.

        A weight that bitsandbytes has already repacked into its CPU-only layout (first eval-mode
        forward on a CPU with AVX512-BF16) is converted back, with a warning: its scales were
        rounded to bf16 by that repacking, so the values are those bitsandbytes computes with now.
        """
        compute_dtype = getattr(obj, "compute_dtype", None)
        param = getattr(obj, "weight", obj)
        state = getattr(param, "quant_state", None)
        if state is None:
            raise TypeError(
                f"from_bnb expects a bitsandbytes Params4bit or Linear4bit that has been quantized "
                f"(moved to its device), got {type(obj).__name__} without a quant_state"
            )
        if state.quant_type != "nf4":
            raise ValueError(
                f"only nf4 weights are supported, this weight is {state.quant_type!r} "
                f"(bitsandbytes' Linear4bit defaults to fp4: pass quant_type='nf4')"
            )
        shape = tuple(state.shape)
        if len(shape) != 2:
            raise ValueError(f"expected a 2-D quantized weight, got shape {shape}")
        if getattr(state, "packing_format_for_cpu", False):
            return cls._from_bnb_cpu_layout(param.data, state, compute_dtype)
        nested = bool(state.nested)
        return cls(
            param.data,
            state.absmax,
            shape,
            state.blocksize,
            code=state.code,
            nested_absmax=state.state2.absmax if nested else None,
            nested_code=state.state2.code if nested else None,
            nested_offset=state.offset if nested else None,
            dtype=state.dtype,
            compute_dtype=compute_dtype,
        )

    @classmethod
    def _from_bnb_cpu_layout(cls, data: torch.Tensor, state, compute_dtype) -> "NF4Weight":
        # bitsandbytes' CPU layout: rows in groups of 32, byte j of the 32-byte group for
        # (row group g, column pair p) holds entry j in its low nibble and entry 32 + j in its high
        # nibble, entries running over (32 rows) x (2 columns); absmax as bf16 [K / BS, N].
        n, k = (int(s) for s in state.shape)
        block_n = 32
        if n % block_n or k % 2:
            raise ValueError(f"unexpected bitsandbytes CPU layout for shape {(n, k)}")
        groups = data.view(torch.uint8).reshape(-1, block_n)
        entries = torch.cat((groups & 0xF, groups >> 4), dim=1)
        codes = entries.view(n // block_n, k // 2, block_n, 2).permute(0, 2, 1, 3).reshape(-1)
        if codes.numel() % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        packed = (codes[0::2] << 4) | codes[1::2]
        absmax = state.absmax.float().t().reshape(-1).contiguous()
        warnings.warn(
            "this bitsandbytes weight was repacked in place into its CPU-only layout (its first "
            "eval-mode forward), which rounded its scales to bf16; converting it back to NF4 with "
            "those scales. Wrap layers with from_bnb before any bitsandbytes forward to keep the "
            "exact original weights.",
            stacklevel=3,
        )
        return cls(
            packed.contiguous(),
            absmax,
            (n, k),
            state.blocksize,
            dtype=getattr(state, "original_dtype", torch.bfloat16),
            compute_dtype=compute_dtype,
        )


def quantize_nf4(
    w: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    *,
    compute_dtype: torch.dtype | None = None,
) -> NF4Weight:
    """Quantize a dense [N, K] weight to NF4 in pure torch.

    Bytes (packed codes, absmax, nested codes and scales) are identical to
    ``bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics=double_quant,
    quant_type="nf4")`` run on the same device.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"w must be a 2-D tensor [out_features, in_features], got {getattr(w, 'shape', type(w))}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"w must be float16, bfloat16 or float32, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    _check_blocksize(blocksize)
    w = w.detach()
    flat = w.reshape(-1).float()
    absmax, padded = _blockwise_absmax(flat, blocksize)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[: flat.numel()]
    q = round_to_nf4(scaled)
    if w.device.type == "cuda":
        # bitsandbytes' CUDA kernel scales by 1/0 = inf in an all-zero block: NaN compares false
        # everywhere in its decision tree, giving code 0.
        q = torch.where(absmax.repeat_interleave(blocksize)[: flat.numel()] == 0, 0, q)
    q = q.to(torch.uint8)
    if q.numel() % 2:
        # bitsandbytes rounds a zero into the spare nibble of an odd-sized weight: code 7 (0.0).
        q = torch.nn.functional.pad(q, (0, 1), value=NF4_ZERO_CODE)
    packed = (q[0::2] << 4) | q[1::2]
    kwargs = {}
    if double_quant:
        offset = absmax.mean()
        qabsmax, nested_absmax, nested_code = _quantize_blockwise_8bit(absmax - offset)
        absmax = qabsmax
        kwargs = dict(nested_absmax=nested_absmax, nested_code=nested_code, nested_offset=offset)
    return NF4Weight(
        packed, absmax, tuple(w.shape), blocksize, dtype=w.dtype, compute_dtype=compute_dtype, **kwargs
    )
