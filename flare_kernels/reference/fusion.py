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
    wq, bq, wk, bk, wv, bv = params
    q = F.linear(s, wq, bq)
    k = F.linear(t, wk, bk)
    v = F.linear(t, wv, bv)
    return _attention_probs(q, k, mask, t.shape[-1]) @ v


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
    wq, bq, wk, bk, wv, bv = params
    r = t.shape[-1]
    q = F.linear(s, wq, bq)
    k = F.linear(t, wk, bk)
    v = F.linear(t, wv, bv)
    probs = _attention_probs(q, k, mask, r)  # zero at padded keys: they get no gradient either
    dv = probs.transpose(-1, -2) @ dz
    dprobs = dz @ v.transpose(-1, -2)
    dscores = probs * (dprobs - (dprobs * probs).sum(dim=-1, keepdim=True)) / math.sqrt(r)
    dq = dscores @ k
    dk = dscores.transpose(-1, -2) @ q

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
