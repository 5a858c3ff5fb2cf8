"""FLARE fusion functions phi(s, t) in the rank-r bottleneck (the executable spec).

``s = A drop(x_s)`` is the source (English) stream, ``t = A drop(x_t)`` the target stream, both
[..., L, r] with positions aligned one to one. Per-token functions act on each position alone;
sequence-level ones mix the L positions of one sequence (dim -2) and never across sequences.

| name            | phi(s, t)                                             | locality |
|-----------------|-------------------------------------------------------|----------|
| none            | t  (plain LoRA; the source is ignored)                | token    |
| add             | s + t                                                 | token    |
| mul             | s * t                                                 | token    |
| add_relu        | relu(s) + relu(t)   (the paper's best, our default)   | token    |
| matmul          | s t^T t                                               | sequence |
| matmul_relu     | relu(s) relu(t)^T relu(t)                             | sequence |
| cross_attention | softmax((s Wq^T + bq)(t Wk^T + bk)^T / sqrt(r)) (t Wv^T + bv) | sequence |

Without a source stream every function is plain LoRA: phi = t.

Sequence-level functions take an optional key-padding ``mask`` [..., L] (True = a real position):
padded positions then contribute nothing (their rows of t leave t^T t and the keys/values of the
attention), so phi at a real position does not depend on how much padding the batch carries.

Cross-attention may split r into ``heads`` heads of r / heads dims (as nn.MultiheadAttention:
scale 1 / sqrt(r / heads) per head, heads concatenated, no output projection, which the paper's
fusion does not have) and drop attention probabilities (inverted dropout after the softmax, as
nn.MultiheadAttention's ``dropout``). Both settings travel with the parameters in
:class:`AttentionParams`; a plain tuple of six tensors means one head and no dropout.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

FUSIONS = ("none", "add", "mul", "add_relu", "matmul", "matmul_relu", "cross_attention")
PER_TOKEN_FUSIONS = FUSIONS[:4]
SEQUENCE_FUSIONS = FUSIONS[4:]
# Number of tensors in the parameter list of each fusion: Wq, bq, Wk, bk, Wv, bv for cross-attention.
FUSION_PARAM_COUNT = {name: 0 for name in FUSIONS} | {"cross_attention": 6}


class AttentionParams(tuple):
    """(Wq, bq, Wk, bk, Wv, bv) plus the attention's settings, so every layer that passes the
    fusion parameters through (launchers, glue) carries them without a new argument.

    ``heads`` must divide r. ``dropout_keep`` (bool [..., heads, L, L], True = kept) is the keep-mask
    of the attention probabilities, drawn once per forward and reused by the backward; with it
    kept probabilities are scaled by 1 / (1 - ``dropout_p``).
    """

    heads: int
    dropout_keep: torch.Tensor | None
    dropout_p: float

    def __new__(cls, tensors: Sequence[torch.Tensor], heads: int = 1, dropout_keep: torch.Tensor | None = None,
                dropout_p: float = 0.0) -> "AttentionParams":  # fmt: skip
        self = super().__new__(cls, tensors)
        self.heads, self.dropout_keep, self.dropout_p = heads, dropout_keep, dropout_p
        return self

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> "AttentionParams":
        """The same settings over other tensors (e.g. the parameters cast to fp32)."""
        return AttentionParams(tensors, self.heads, self.dropout_keep, self.dropout_p)


def attention_settings(params: Sequence[torch.Tensor]) -> tuple[int, torch.Tensor | None, float]:
    """(heads, dropout keep-mask or None, dropout p) of cross-attention parameters."""
    if isinstance(params, AttentionParams):
        return params.heads, params.dropout_keep, params.dropout_p
    return 1, None, 0.0


def check_heads(heads, r: int) -> None:
    """One-line error unless ``heads`` is a positive int dividing the rank r."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"cross-attention heads must be a positive integer, got {heads!r}")
    if r % heads:
        raise ValueError(f"cross-attention heads={heads} must divide the LoRA rank r={r}")


def retensor(params: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """``tensors`` in place of ``params``, keeping attention settings if ``params`` has them."""
    return params.with_tensors(tensors) if isinstance(params, AttentionParams) else list(tensors)


def fusion_index(fusion: str) -> int:
    """Position of ``fusion`` in :data:`FUSIONS` (the integer the ops and kernels use)."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    return FUSIONS.index(fusion)


def is_per_token(fusion: str) -> bool:
    return fusion in PER_TOKEN_FUSIONS


def _keep_rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # where, not a product: a NaN at a padded position must not leak in.
    return t if mask is None else torch.where(mask[..., None], t, torch.zeros((), dtype=t.dtype, device=t.device))


def _split_heads(a: torch.Tensor, heads: int) -> torch.Tensor:
    # [..., L, r] -> [..., heads, L, r / heads]; one head keeps the tensor as is (bit-identical).
    return a if heads == 1 else a.unflatten(-1, (heads, -1)).transpose(-2, -3)


def _merge_heads(a: torch.Tensor, heads: int) -> torch.Tensor:
    return a if heads == 1 else a.transpose(-2, -3).flatten(-2)


def _head_mask(mask: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    return mask if mask is None or heads == 1 else mask[..., None, :]


def _dropped(probs: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    if keep is None:
        return probs
    return torch.where(keep, probs * (1.0 / (1.0 - p)), torch.zeros((), dtype=probs.dtype, device=probs.device))


def _head_keep(keep: torch.Tensor | None, t: torch.Tensor, heads: int) -> torch.Tensor | None:
    """The keep-mask [..., heads, L, L] checked, in the layout of the per-head probabilities."""
    if keep is None:
        return None
    want = (*t.shape[:-2], heads, t.shape[-2], t.shape[-2])
    if tuple(keep.shape) != want or keep.dtype != torch.bool:
        raise ValueError(f"attention dropout mask must be bool {want}, got {keep.dtype} {tuple(keep.shape)}")
    return keep[..., 0, :, :] if heads == 1 else keep


def _attention_probs(q, k, mask, r):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(r)
    if mask is None:
        return torch.softmax(scores, dim=-1)
    keys = mask[..., None, :]
    probs = torch.softmax(scores.masked_fill(~keys, float("-inf")), dim=-1)
    # A sequence with no real position attends to nothing (softmax over no keys would be NaN).
    return torch.where(keys.any(dim=-1, keepdim=True), probs, torch.zeros((), dtype=probs.dtype, device=probs.device))


def fuse(
    s: torch.Tensor | None,
    t: torch.Tensor,
    fusion: str,
    params: Sequence[torch.Tensor] = (),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """phi(s, t) for [..., L, r] inputs (any float dtype); ``s=None`` means no source: returns t.

    ``mask`` [..., L] (bool, True = real position) applies to the sequence-level functions only.
    """
    fusion_index(fusion)
    if s is None or fusion == "none":
        return t
    if fusion == "add":
        return s + t
    if fusion == "mul":
        return s * t
    if fusion == "add_relu":
        return F.relu(s) + F.relu(t)
    if fusion == "matmul":
        tk = _keep_rows(t, mask)
        return s @ (tk.transpose(-1, -2) @ tk)
    if fusion == "matmul_relu":
        rt = _keep_rows(F.relu(t), mask)
        return F.relu(s) @ (rt.transpose(-1, -2) @ rt)
    heads, keep, p = attention_settings(params)
    r = t.shape[-1]
    check_heads(heads, r)
    wq, bq, wk, bk, wv, bv = params
    q = _split_heads(F.linear(s, wq, bq), heads)
    k = _split_heads(F.linear(t, wk, bk), heads)
    v = _split_heads(F.linear(t, wv, bv), heads)
    probs = _attention_probs(q, k, _head_mask(mask, heads), r // heads)
    keep = _head_keep(keep, t, heads)
    return _merge_heads(_dropped(probs, keep, p) @ v, heads)


def _relu_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # torch's relu backward: zero where relu(x) <= 0 (NaN passes the gradient through).
    return torch.where(x <= 0, torch.zeros_like(g), g)


def fuse_backward(
    dz: torch.Tensor,
    s: torch.Tensor | None,
    t: torch.Tensor,
    fusion: str,
    params: Sequence[torch.Tensor] = (),
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, list[torch.Tensor]]:
    """Explicit gradients of :func:`fuse`: (ds or None, dt, d params), same dtypes as the inputs.

    Written out rather than taken from autograd so that op implementations (which run below the
    autograd dispatch key) can use it; the tests hold it to autograd of :func:`fuse`.
    """
    fusion_index(fusion)
    if s is None or fusion == "none":
        return None, dz, []
    if fusion == "add":
        return dz, dz, []
    if fusion == "mul":
        return dz * t, dz * s, []
    if fusion == "add_relu":
        return _relu_grad(dz, s), _relu_grad(dz, t), []
    if fusion in ("matmul", "matmul_relu"):
        relu = fusion == "matmul_relu"
        ls, lt = (F.relu(s), F.relu(t)) if relu else (s, t)
        lt = _keep_rows(lt, mask)
        gram = lt.transpose(-1, -2) @ lt  # [.., r, r], symmetric
        ds = dz @ gram
        dgram = ls.transpose(-1, -2) @ dz
        dt = _keep_rows(lt @ (dgram + dgram.transpose(-1, -2)), mask)
        if relu:
            ds, dt = _relu_grad(ds, s), _relu_grad(dt, t)
        return ds, dt, []
    heads, keep, p = attention_settings(params)
    wq, bq, wk, bk, wv, bv = params
    r = t.shape[-1]
    check_heads(heads, r)
    q = _split_heads(F.linear(s, wq, bq), heads)
    k = _split_heads(F.linear(t, wk, bk), heads)
    v = _split_heads(F.linear(t, wv, bv), heads)
    dzh = _split_heads(dz, heads)
    probs = _attention_probs(q, k, _head_mask(mask, heads), r // heads)  # zero at padded keys: no gradient
    keep = _head_keep(keep, t, heads)
    dv = _dropped(probs, keep, p).transpose(-1, -2) @ dzh
    dprobs = _dropped(dzh @ v.transpose(-1, -2), keep, p)  # the same mask as the forward's
    dscores = probs * (dprobs - (dprobs * probs).sum(dim=-1, keepdim=True)) / math.sqrt(r // heads)
    dq = _merge_heads(dscores @ k, heads)
    dk = _merge_heads(dscores.transpose(-1, -2) @ q, heads)
    dv = _merge_heads(dv, heads)

    def flat(a: torch.Tensor) -> torch.Tensor:
        return a.reshape(-1, a.shape[-1])

    def weight_grad(d: torch.Tensor, inp: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (flat(d).transpose(0, 1) @ flat(inp)).to(like.dtype)

    ds = dq @ wq
    dt = dk @ wk + dv @ wv
    dparams = [
        weight_grad(dq, s, wq), flat(dq).sum(0).to(bq.dtype),
        weight_grad(dk, t, wk), flat(dk).sum(0).to(bk.dtype),
        weight_grad(dv, t, wv), flat(dv).sum(0).to(bv.dtype),
    ]  # fmt: skip
    return ds, dt, dparams
