"""FLARE MT's alignment: which NLLB encoder states each LLM position reads, by character offsets.

The NLLB tokenizer and the LLM's tokenizer cut the same text differently, so positions cannot be
paired by index (the authors did, and padded the two encodings on opposite sides, so even equal
cuts would not have lined up). Instead both tokenizations are mapped to the characters of each
text field (premise, hypothesis / question, context / text), each encoded by NLLB on its own:

    LLM token i (span [a, b) in field f)  <-  mean of the NLLB states j of field f whose
                                              span [c, d) overlaps [a, b)  (max(a, c) < min(b, d))

Spans are taken without their leading whitespace (SentencePiece's "▁world" and a BPE " world"
both cover "world"), so a token never overlaps the previous word through the space between them.
An LLM position with no overlapping NLLB token (template text such as "Premise:", BOS/CLS/SEP,
the answer, padding, generated tokens, a field cut by truncation) reads a zero source: the fusion
then computes phi(0, A x_t), its "no source here" value. The pairing is computed per row on the
unpadded prompt and shifted by the row's own padding at collation (``mt_batch``), so it follows the
LLM's padding side (decoders left, encoders right) exactly.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import torch

Span = tuple[int, int]


def strip_span(span: Sequence[int] | None, text: str) -> Span | None:
    """``span`` [start, end) of ``text`` without its leading whitespace; None when nothing is left."""
    if span is None:
        return None
    start, end = int(span[0]), int(span[1])
    start, end = max(start, 0), min(end, len(text))
    while start < end and text[start].isspace():
        start += 1
    return (start, end) if start < end else None


def overlap_pairs(llm_spans: Sequence[Span | None], nllb_spans: Sequence[Span | None]) -> list[tuple[int, int]]:
    """(i, j) for every LLM token i and NLLB token j of one field whose character spans overlap.

    Both tokenizations run left to right over the same text, so their span ends are non-decreasing:
    a binary search finds the first NLLB token ending after a, then a short walk (O(n log m) rather
    than n x m: XNLI has 392k training pairs of up to 128 x 128 tokens).
    """
    real = [(j, s) for j, s in enumerate(nllb_spans) if s is not None]
    ends = [s[1] for _, s in real]
    pairs = []
    for i, span in enumerate(llm_spans):
        if span is None:
            continue
        a, b = span
        k = bisect.bisect_right(ends, a)
        while k < len(real) and real[k][1][0] < b:
            c, d = real[k][1]
            if max(a, c) < min(b, d):
                pairs.append((i, real[k][0]))
            k += 1
    return pairs


@dataclasses.dataclass
class MTRow:
    """One row's NLLB side: every field's NLLB ids (with the target language's code) and, once the
    LLM prompt is final, its (prompt position, field, NLLB position) pairs.

    Attributes:
        nllb_ids: per field (the task's field order; [] for an absent field) the NLLB input ids.
        language_code: the NLLB code they were encoded with (the row's language, never English).
        pairs: callable prompt ids -> [(prompt position, field index, NLLB position)], so a prompt
            shortened at collation (``batching._fit_prompts``) is aligned as it is finally fed.
    """

    nllb_ids: list[list[int]]
    language_code: str
    nllb_pad: int = 1
    pairs: object = dataclasses.field(repr=False, compare=False, default=None)


def mt_batch(rows: Sequence[MTRow], prompts: Sequence[list[int]], starts: Sequence[int], length: int,
             pad_id: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """Batch tensors of FLARE MT for LLM rows of ``length`` columns whose prompt begins at ``starts``.

    Returns ``mt_input_ids`` / ``mt_attention_mask`` [B, F, Ln] (each field its own NLLB sequence,
    right-padded: the alignment addresses states by index, so NLLB's padding side does not matter)
    and ``mt_alignment`` [B, length, F * Ln]: row i of batch row b holds 1/n at the n NLLB states
    (field-major) that LLM column i averages, zeros where it reads no source.
    """
    n_fields = max(len(r.nllb_ids) for r in rows)
    width = max(1, max(len(ids) for r in rows for ids in r.nllb_ids))
    b = len(rows)
    ids = torch.full((b, n_fields, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, n_fields, width), dtype=torch.long)
    align = torch.zeros((b, length, n_fields * width), dtype=torch.float32)
    for row, (r, prompt, start) in enumerate(zip(rows, prompts, starts)):
        for f, field_ids in enumerate(r.nllb_ids):
            ids[row, f, : len(field_ids)] = torch.tensor(field_ids, dtype=torch.long)
            mask[row, f, : len(field_ids)] = 1
        for pos, f, j in r.pairs(prompt):
            align[row, start + pos, f * width + j] = 1.0
    counts = align.sum(-1, keepdim=True)
    align = align / counts.clamp_min(1.0)  # mean over the overlapping NLLB tokens
    return {"mt_input_ids": ids, "mt_attention_mask": mask, "mt_alignment": align}


MT_KEYS = ("mt_input_ids", "mt_attention_mask", "mt_alignment")
