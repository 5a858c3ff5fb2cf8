"""Tokenized examples, the deterministic data order, and padded two-stream batches.

Data order is a pure function of (seed, stage, epoch): ``torch.randperm`` under its own generator,
so a resumed run replays exactly the batches an uninterrupted run would see, and every process of a
distributed run knows the whole global batch (each takes its slice). The last incomplete global
batch of an epoch is dropped (every process must run the same number of steps).

Loss normalization: each global batch's loss is sum(token losses) / (number of loss tokens in the
whole global batch), whatever the split into processes and accumulation steps, so one process with
batch 32 and four processes with 8 each take the same step. (Per-micro-batch means would weight a
label token differently depending on its neighbours.)

Decoder alignment (``alignment``): "ours" lays a pair out as flare.tasks describes (prompts aligned
at their last token, the source carrying its own English answer when training). "authors" is their
layout, to reproduce their numbers: the target is prompt + answer + EOS, the source the English
prompt alone, each cut from the left to max_length (the tokenizer's truncation_side="left") and each
left-padded on its own to the batch's common width, so that the source's last prompt token sits on
the target's EOS and the target's answer reads source prompt tokens (or padding) at its positions.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import torch

from ..tasks import Encoded, Task, decoder_strings, encode, encode_decoder, tokenize_all

IGNORE = -100
ALIGNMENTS = ("ours", "authors")


@dataclasses.dataclass
class Example:
    """One row, tokenized: the target stream and (for FLARE) its English source stream."""

    index: int
    target: Encoded
    source: Encoded | None
    label: int = 0  # classification label (encoders and decoder scoring)
    # Decoders: the max_length the streams were encoded for, and (stream, max_length) -> that stream
    # encoded again, so collate can shorten the prompts of a batch whose longest answer is longer than
    # this row's own (see _fit_prompts). None: no width limit (examples built by hand).
    max_length: int | None = None
    reencode: Callable[[str, int], Encoded] | None = dataclasses.field(default=None, repr=False, compare=False)
    mt: object | None = dataclasses.field(default=None, repr=False, compare=False)  # FLARE MT: its MTRow
    alignment: str = "ours"  # decoders: "ours" | "authors" (module docstring)

    @property
    def loss_units(self) -> int:
        """What the loss is averaged over: answer tokens (decoders) or 1 (encoders)."""
        return len(self.target.answer) if self.target.answer else 1


def prepare(
    rows: Sequence[dict],
    task: Task,
    tokenizer,
    family: str,
    max_length: int,
    *,
    with_source: bool,
    with_answer: bool,
    alignment: str = "ours",
    mt=None,
) -> list[Example]:
    """Tokenize rows once (both streams); decoder strings go through the tokenizer in large batches.
    alignment: how decoder streams are laid out ("ours" | "authors", module docstring; encoders: ignored)."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"decoder_alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if family == "decoder" and alignment == "authors":
        return _prepare_authors(rows, task, tokenizer, max_length, with_source=with_source, with_answer=with_answer)
    cache = None
    if family == "decoder":
        streams = ("target", "source") if with_source else ("target",)
        cache = tokenize_all(
            tokenizer,
            (t for row in rows for st in streams for t in decoder_strings(task, row, st, with_answer=with_answer)),
        )
    out = []
    for i, row in enumerate(rows):
        target = encode(task, tokenizer, row, "target", max_length, family, with_answer=with_answer, cache=cache)
        source = (
            encode(task, tokenizer, row, "source", max_length, family, with_answer=with_answer, cache=cache)
            if with_source
            else None
        )
        example = Example(i, target, source, label=int(row.get("label", 0)) if task.kind == "classification" else 0)
        if family == "decoder":
            example.max_length = max_length
            example.reencode = _reencoder(task, tokenizer, row, with_answer)
        if mt is not None:  # FLARE MT's MTFeaturizer (flare.train.mt): the row's NLLB side
            example.mt = mt.row(row)
        out.append(example)
    return out


def _prepare_authors(
    rows: Sequence[dict], task: Task, tokenizer, max_length: int, *, with_source: bool, with_answer: bool
) -> list[Example]:
    """Decoder examples in the authors' layout: target prompt + answer + EOS, source prompt only, left-truncated."""
    streams = ("target", "source") if with_source else ("target",)
    cache = tokenize_all(
        tokenizer,
        (
            t
            for row in rows
            for st in streams
            for t in decoder_strings(task, row, st, with_answer=with_answer and st == "target")
        ),
    )
    eos = tokenizer.eos_token_id
    out = []
    for i, row in enumerate(rows):
        encoded = []
        for stream in streams:
            answer_here = with_answer and stream == "target"
            # No field-wise shortening (a width no prompt reaches): the authors cut whole sequences from the left.
            enc = encode_decoder(task, tokenizer, row, stream, 1 << 30, with_answer=answer_here, cache=cache)
            answer = list(enc.answer)
            if answer_here and eos is not None and (not answer or answer[-1] != eos):
                answer.append(eos)  # QA answers end with EOS already; label words get it here
            encoded.append(_cut_left(Encoded(prompt=enc.prompt, answer=answer), max_length, row, stream))
        label = int(row.get("label", 0)) if task.kind == "classification" else 0
        source = encoded[1] if with_source else None
        out.append(Example(i, encoded[0], source, label=label, alignment="authors"))
    return out


def _cut_left(enc: Encoded, max_length: int, row: dict, stream: str) -> Encoded:
    excess = len(enc.prompt) + len(enc.answer) - max_length
    if excess <= 0:
        return enc
    if excess >= len(enc.prompt):
        raise ValueError(
            f"row {row.get('id')!r} ({stream}): its answer alone takes {len(enc.answer)} of max_length={max_length} "
            "tokens; raise --max-length"
        )
    return Encoded(prompt=enc.prompt[excess:], answer=enc.answer)


def _reencoder(task: Task, tokenizer, row: dict, with_answer: bool) -> Callable[[str, int], Encoded]:
    # Without the dataset-wide token cache: holding it for the whole run would cost more memory than
    # tokenizing again the few rows of a batch that need a shorter prompt.
    def reencode(stream: str, max_length: int) -> Encoded:
        return encode(task, tokenizer, row, stream, max_length, "decoder", with_answer=with_answer)

    return reencode


def epoch_order(n: int, seed: int, stage: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size


def global_batches(n: int, batch_size: int, seed: int, stage: int, epoch: int) -> Iterator[list[int]]:
    order = epoch_order(n, seed, stage, epoch)
    for b in range(steps_per_epoch(n, batch_size)):
        yield order[b * batch_size : (b + 1) * batch_size]


def micro_slices(batch: list[int], micro: int, accumulation: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches of one global batch: chunk k of the accumulation loop is split
    across processes, process r taking the r-th ``micro`` rows of it."""
    out = []
    for k in range(accumulation):
        chunk = batch[k * micro * world : (k + 1) * micro * world]
        out.append(chunk[rank * micro : (rank + 1) * micro])
    return out


# ------------------------------------------------------------------------------------- collation
def _fit_prompts(examples: Sequence[Example], answer_len: int) -> tuple[list[Encoded], list[Encoded]]:
    """(targets, sources) whose prompts fit max_length next to the batch's longest answer.

    A decoder row is [prompt][answer] padded to the batch's longest prompt plus its longest answer,
    over both streams (answers start at one column so the fused positions line up). Each stream was
    truncated against its own answer only, so a long prompt next to another stream's or row's long
    answer would make the batch wider than max_length (past the model's positions). Such prompts are
    encoded again for the shared answer width (the task's truncatable fields shortened as usual); the
    answers, and so the labels, stay as they are.
    """
    targets = [e.target for e in examples]
    sources = [e.source for e in examples if e.source is not None]
    limits = [e.max_length for e in examples if e.max_length is not None]
    if not limits:
        return targets, sources
    limit = min(limits)
    prompt_budget = limit - answer_len

    def fit(e: Example, stream: str, enc: Encoded) -> Encoded:
        if len(enc.prompt) <= prompt_budget:
            return enc
        if e.reencode is None:
            raise ValueError(f"example {e.index}: prompt of {len(enc.prompt)} tokens does not fit max_length={limit}")
        try:
            short = e.reencode(stream, prompt_budget + len(enc.answer))
        except ValueError:
            raise ValueError(
                f"example {e.index} ({stream}): its prompt cannot be shortened to {prompt_budget} tokens, which "
                f"is what max_length={limit} leaves next to the batch's longest answer ({answer_len} tokens); "
                "raise --max-length"
            ) from None
        if short.answer != enc.answer:  # the labels must not change with the batch
            raise RuntimeError(f"example {e.index} ({stream}): re-encoding changed the answer tokens")
        return short

    targets = [fit(e, "target", e.target) for e in examples]
    sources = [fit(e, "source", e.source) for e in examples if e.source is not None]
    return targets, sources


def _decoder_rows(encs: list[Encoded], prompt_len: int, answer_len: int, pad: int):
    ids, mask, labels = [], [], []
    for e in encs:
        left = prompt_len - len(e.prompt)
        right = answer_len - len(e.answer)
        ids.append([pad] * left + e.prompt + e.answer + [pad] * right)
        mask.append([0] * left + [1] * (len(e.prompt) + len(e.answer)) + [0] * right)
        labels.append([IGNORE] * (left + len(e.prompt)) + e.answer + [IGNORE] * right)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def _authors_rows(encs: list[Encoded], width: int, pad: int):
    """Each row [left padding] prompt answer, right-aligned at ``width``; labels on the answer tokens."""
    ids, mask, labels = [], [], []
    for e in encs:
        n = len(e.prompt) + len(e.answer)
        ids.append([pad] * (width - n) + e.prompt + e.answer)
        mask.append([0] * (width - n) + [1] * n)
        labels.append([IGNORE] * (width - len(e.answer)) + e.answer)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def _encoder_rows(encs: list[Encoded], length: int, pad: int):
    ids = [e.prompt + [pad] * (length - len(e.prompt)) for e in encs]
    mask = [[1] * len(e.prompt) + [0] * (length - len(e.prompt)) for e in encs]
    return torch.tensor(ids), torch.tensor(mask)


def collate(examples: Sequence[Example], family: str, task: Task, pad_id: int, *, with_answer: bool) -> dict:
    """Pad target (and source) rows to one shape. Keys: input_ids, attention_mask, [source_input_ids,
    source_attention_mask], and the loss targets: labels (decoders), class_labels or
    start_positions/end_positions (encoders); answer_len (decoders: the right-padded answer width)."""
    targets = [e.target for e in examples]
    sources = [e.source for e in examples if e.source is not None]
    if sources and len(sources) != len(targets):
        raise ValueError("a batch mixes rows with and without an English source")
    both = targets + sources
    batch: dict = {}
    if family == "decoder" and examples and examples[0].alignment == "authors":
        width = max(len(e.prompt) + len(e.answer) for e in both)
        batch["input_ids"], batch["attention_mask"], labels = _authors_rows(targets, width, pad_id)
        if sources:
            batch["source_input_ids"], batch["source_attention_mask"], _ = _authors_rows(sources, width, pad_id)
        answer_len = max(len(e.answer) for e in targets) if with_answer else 0
        if with_answer:
            batch["labels"] = labels
        batch["answer_len"] = answer_len
    elif family == "decoder":
        answer_len = max(len(e.answer) for e in both) if with_answer else 0
        targets, sources = _fit_prompts(examples, answer_len)
        prompt_len = max(len(e.prompt) for e in targets + sources)
        batch["input_ids"], batch["attention_mask"], labels = _decoder_rows(targets, prompt_len, answer_len, pad_id)
        if sources:
            batch["source_input_ids"], batch["source_attention_mask"], _ = _decoder_rows(
                sources, prompt_len, answer_len, pad_id
            )
        if with_answer:
            batch["labels"] = labels
        batch["answer_len"] = answer_len
    else:
        length = max(len(e.prompt) for e in both)
        batch["input_ids"], batch["attention_mask"] = _encoder_rows(targets, length, pad_id)
        if sources:
            batch["source_input_ids"], batch["source_attention_mask"] = _encoder_rows(sources, length, pad_id)
        if task.kind == "classification":
            batch["class_labels"] = torch.tensor([e.label for e in examples])
        else:
            batch["start_positions"] = torch.tensor([e.target.start for e in examples])
            batch["end_positions"] = torch.tensor([e.target.end for e in examples])
    if any(e.mt is not None for e in examples):  # FLARE MT: NLLB ids, alignment to the final padded prompts
        from ..modeling.mt_align import mt_batch

        starts = batch["attention_mask"].argmax(dim=1).tolist()  # each row's first real column: its prompt's
        batch.update(mt_batch([e.mt for e in examples], [t.prompt for t in targets], starts,
                              batch["input_ids"].shape[1], examples[0].mt.nllb_pad))  # fmt: skip
    return batch


def count_tokens(batch: dict) -> int:
    """Non-padding tokens in both streams (for tokens/s)."""
    n = int(batch["attention_mask"].sum())
    if "source_attention_mask" in batch:
        n += int(batch["source_attention_mask"].sum())
    return n
