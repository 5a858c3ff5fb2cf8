"""Greedy decodes of one model by two code paths (KV cache or not, ours or transformers' loop).

The two paths run the same model at different GEMM shapes (a cached decode step multiplies B rows,
a full recompute B x L; oneDNN/MKL pick kernels and summation orders by shape and ISA), so their
logits agree to fp32 rounding, not bitwise, and on another CPU a near-tie between the two best
tokens may resolve differently. Each path's token is the exact argmax of its own logits (checked);
the tokens must agree at every step unless the logits there are a tie within the tolerance, after
which the sequences legitimately diverge and nothing later is compared.
"""

from __future__ import annotations

import torch

from flare.testing import assert_close_scaled


def assert_greedy_agree(seq_a, seq_b, logits_a, logits_b, start, *, rtol, atol, name="", live=None):
    """seq_*: [B, start + T] token ids; logits_*: T tensors [B, V] (the logits each step's token came from).

    ``live`` [B]: rows still comparable (False where another stream these logits read already
    diverged at a tie). Returns the rows that never diverged."""
    assert seq_a.shape == seq_b.shape, f"{name}: {tuple(seq_a.shape)} vs {tuple(seq_b.shape)}"
    assert torch.equal(seq_a[:, :start], seq_b[:, :start]), f"{name}: prompts differ"
    live = torch.ones(seq_a.shape[0], dtype=torch.bool) if live is None else live.clone()
    for t, (la, lb) in enumerate(zip(logits_a, logits_b)):
        ta, tb = seq_a[:, start + t], seq_b[:, start + t]
        assert torch.equal(ta, la.argmax(-1)) and torch.equal(tb, lb.argmax(-1)), f"{name}: step {t} not greedy"
        if not live.any():
            break
        assert_close_scaled(la[live], lb[live], rtol=rtol, atol=atol, name=f"{name} logits, step {t}")
        differ = live & (ta != tb)
        if differ.any():
            # Only a tie within the logits' agreement may pick different tokens.
            bound = 2 * (rtol * lb[live].double().abs().max().item() + atol)
            for lg in (la, lb):
                gap = (lg.gather(-1, ta[:, None]) - lg.gather(-1, tb[:, None])).abs().squeeze(-1)[differ]
                assert gap.max().item() <= bound, f"{name}: step {t} tokens differ by a margin of {gap.max():.3e}"
            live &= ~differ
    return live
