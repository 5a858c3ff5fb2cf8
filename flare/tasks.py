"""Tasks: what a model reads and predicts for XNLI, TyDiQA-GoldP, NusaX and the built-in toy task.

Two model families, as in the paper:

* decoders (Llama, Gemma, Qwen2, Mistral): a prompt in a fixed English template, filled with the
  row's text; classification predicts a *label word* (" entailment", " positive", ...) after the
  prompt, scored by restricting the next-token distribution to the label words' first tokens; QA is
  generative (the answer follows "Answer:", then EOS). Loss only on the answer/label tokens.
* encoders (XLM-R): classification with a sequence-classification head; QA extractive with a
  start/end head over the context (one window of max_length tokens, no stride).

FLARE fuses position i of the target row with position i of its English source row, so both rows
of a pair must line up. Decoder rows are laid out as
    [left padding] [BOS] prompt [answer] [right padding]
with the prompt part left-padded to the batch's longest prompt (over both streams) and the answer
part right-padded to the longest answer: the last prompt token of the target sits on the last prompt
token of the source, exactly as at inference, where both prompts are left-padded and the streams
then decode in lockstep (each generated target token fuses with the source's own generated token).
When training, the source row carries its own English answer (teacher forcing of the source stream).
Encoder rows are right-padded to a common length.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from .data.hub import NUSAX_LABELS, NUSAX_LANGUAGES, TYDIQA_LANGUAGES, XNLI_LABELS, XNLI_LANGUAGES
from .data.schema import check_kind

ENCODER_MODEL_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "xlm-roberta-xl",
        "camembert",
        "distilbert",
        "electra",
        "deberta",
        "deberta-v2",
        "mpnet",
        "rembert",
        "modernbert",
    }
)
FAMILIES = ("decoder", "encoder")


def model_family(model_or_config) -> str:
    """ "encoder" for BERT-style models (XLM-R), else "decoder"."""
    config = getattr(model_or_config, "config", model_or_config)
    return "encoder" if getattr(config, "model_type", None) in ENCODER_MODEL_TYPES else "decoder"


@dataclasses.dataclass(frozen=True)
class Task:
    """A benchmark task.

    Args:
        name: registry key.
        kind: "classification" or "qa".
        labels: class names in label-index order (classification).
        label_words: the words a decoder answers with, one per class (its first token must differ
            between classes).
        prompt: decoder template; ``{text}``, ``{text_pair}``, ``{question}``, ``{context}`` are filled
            from the row (or the source_* fields for the source stream).
        truncate: the fields shortened, longest first, when a prompt exceeds max_length.
        languages: the paper's evaluation languages.
        metric: the score used for model selection.
        max_answer_tokens: generation budget for QA.
    """

    name: str
    kind: str
    prompt: str
    truncate: tuple[str, ...]
    languages: tuple[str, ...]
    metric: str
    labels: tuple[str, ...] = ()
    label_words: tuple[str, ...] = ()
    max_answer_tokens: int = 32

    def __post_init__(self) -> None:
        check_kind(self.kind)
        if self.kind == "classification" and len(self.label_words) != len(self.labels):
            raise ValueError(f"task {self.name}: {len(self.labels)} labels but {len(self.label_words)} label words")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def fields(self, row: dict, stream: str) -> dict[str, str | None]:
        """The prompt fields of a row for the "target" or "source" stream."""
        if stream not in ("target", "source"):
            raise ValueError(f"stream must be 'target' or 'source', got {stream!r}")
        pre = "source_" if stream == "source" else ""
        names = ("text", "text_pair") if self.kind == "classification" else ("question", "context")
        return {n: row.get(pre + n) for n in names}

    def answer_text(self, row: dict, stream: str) -> str:
        """What the decoder is trained to say after the prompt, without the leading space."""
        if self.kind == "classification":
            return self.label_words[row["label"]]
        answers = row.get("source_answers" if stream == "source" else "answers")
        if not answers or not answers.get("text"):
            raise ValueError(
                f"row {row.get('id')!r} has no {'source_' if stream == 'source' else ''}answers to train on; "
                "translate-train output carries the English answers in 'source_answers'"
            )
        return answers["text"][0]


TASKS: dict[str, Task] = {
    "xnli": Task(
        name="xnli",
        kind="classification",
        prompt="Premise: {text}\nHypothesis: {text_pair}\nRelation:",
        truncate=("text", "text_pair"),
        languages=XNLI_LANGUAGES,
        metric="accuracy",
        labels=XNLI_LABELS,
        label_words=XNLI_LABELS,
    ),
    "nusax": Task(
        name="nusax",
        kind="classification",
        prompt="Text: {text}\nSentiment:",
        truncate=("text",),
        languages=NUSAX_LANGUAGES,
        metric="macro_f1",
        labels=NUSAX_LABELS,
        label_words=NUSAX_LABELS,
    ),
    "tydiqa": Task(
        name="tydiqa",
        kind="qa",
        prompt="Context: {context}\nQuestion: {question}\nAnswer:",
        truncate=("context",),
        languages=TYDIQA_LANGUAGES,
        metric="exact_match",
    ),
    # The built-in default's synthetic sentiment task (flare/default/); "qaa"/"qab" are ISO 639's
    # codes reserved for local use, standing for two toy languages.
    "toy": Task(
        name="toy",
        kind="classification",
        prompt="Text: {text}\nSentiment:",
        truncate=("text",),
        languages=("qaa", "qab"),
        metric="macro_f1",
        labels=NUSAX_LABELS,
        label_words=NUSAX_LABELS,
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


# ------------------------------------------------------------------------------------- encoding
@dataclasses.dataclass
class Encoded:
    """One row of one stream, before padding.

    Decoders: ``prompt`` (with BOS) and ``answer`` token ids; labels are the answer tokens.
    Encoders: ``prompt`` holds the whole input; ``start``/``end`` are the answer's token positions
    (QA; 0 = the CLS token when the answer is outside the window) and ``offsets`` map tokens to
    context characters (None outside the context).
    """

    prompt: list[int]
    answer: list[int] = dataclasses.field(default_factory=list)
    start: int = 0
    end: int = 0
    offsets: list | None = None


def _tok(tokenizer, text: str, cache: dict[str, list[int]] | None = None) -> list[int]:
    if cache is not None and text in cache:
        return cache[text]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decoder_strings(task: Task, row: dict, stream: str, *, with_answer: bool) -> list[str]:
    """Every string ``encode_decoder`` tokenizes for a row (for one batched tokenizer call over a dataset)."""
    out = [piece for piece, is_field in _template_pieces(task.prompt) if not is_field]
    out += [" " + v for v in task.fields(row, stream).values() if v is not None]
    if with_answer:
        out.append(" " + task.answer_text(row, stream))
    return out


def tokenize_all(tokenizer, texts, batch_size: int = 4096) -> dict[str, list[int]]:
    """{text: token ids} for the distinct texts, tokenized in batches (the fast tokenizer runs them in parallel:
    one call per string would dominate data preparation for XNLI's 392k training pairs)."""
    unique = list(dict.fromkeys(texts))
    cache = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i : i + batch_size]
        for text, ids in zip(chunk, tokenizer(chunk, add_special_tokens=False)["input_ids"]):
            cache[text] = ids
    return cache


def _bos(tokenizer) -> list[int]:
    """[BOS] when the tokenizer itself prepends it (Llama, Gemma), else [] (Qwen2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _template_pieces(template: str) -> list[tuple[str, bool]]:
    """ "A: {x}\nB:" -> [("A:", False), ("{x}", True), ("\nB:", False)] (field pieces carry the brace name)."""
    pieces, rest = [], template
    while "{" in rest:
        head, _, tail = rest.partition("{")
        name, _, rest = tail.partition("}")
        if head:
            pieces.append((head, False))
        pieces.append((name, True))
    if rest:
        pieces.append((rest, False))
    return pieces


def label_token_ids(task: Task, tokenizer) -> list[int]:
    """First token of each label word (as it follows the prompt, with a leading space)."""
    first = [(_tok(tokenizer, " " + w) or [None])[0] for w in task.label_words]
    if None in first or len(set(first)) != len(first):
        raise ValueError(
            f"task {task.name}: the label words {task.label_words} must start with distinct tokens under this "
            f"tokenizer (got first tokens {first})"
        )
    return first


def encode_decoder(
    task: Task,
    tokenizer,
    row: dict,
    stream: str,
    max_length: int,
    *,
    with_answer: bool,
    cache: dict[str, list[int]] | None = None,
) -> Encoded:
    """Prompt (+ answer) token ids of one stream, the truncatable fields shortened to fit max_length.
    ``cache`` holds pre-tokenized strings (``tokenize_all``)."""
    values = task.fields(row, stream)
    answer: list[int] = []
    if with_answer:
        answer = list(_tok(tokenizer, " " + task.answer_text(row, stream), cache))
        if task.kind == "qa" and tokenizer.eos_token_id is not None:
            answer = answer + [tokenizer.eos_token_id]
    pieces = []
    for piece, is_field in _template_pieces(task.prompt):
        if is_field:
            value = values.get(piece)
            if value is None:
                if piece == "text_pair":  # single-sentence rows of a pair template
                    continue
                raise ValueError(f"row {row.get('id')!r} has no {('source_' if stream == 'source' else '') + piece}")
            pieces.append([piece, list(_tok(tokenizer, " " + value, cache))])
        else:
            pieces.append([None, _tok(tokenizer, piece, cache)])
    bos = _bos(tokenizer)
    budget = max_length - len(bos) - len(answer)
    excess = sum(len(ids) for _, ids in pieces) - budget
    # Shorten the longest truncatable field one token at a time: keeps both XNLI segments readable.
    while excess > 0:
        candidates = [p for p in pieces if p[0] in task.truncate and p[1]]
        if not candidates:
            raise ValueError(
                f"row {row.get('id')!r}: the prompt template and answer alone take more than max_length={max_length} "
                "tokens; raise --max-length"
            )
        longest = max(candidates, key=lambda p: len(p[1]))
        runner_up = max((len(c[1]) for c in candidates if c is not longest), default=0)
        cut = min(excess, max(1, len(longest[1]) - runner_up))
        longest[1] = longest[1][: len(longest[1]) - cut]
        excess -= cut
    return Encoded(prompt=bos + [t for _, ids in pieces for t in ids], answer=answer)


def encode_encoder(task: Task, tokenizer, row: dict, stream: str, max_length: int, *, with_answer: bool) -> Encoded:
    """Encoder input of one stream (text [+ text_pair], or question + context) with the answer's token span."""
    values = task.fields(row, stream)
    if task.kind == "classification":
        if values["text"] is None:
            raise ValueError(f"row {row.get('id')!r} has no {'source_' if stream == 'source' else ''}text")
        enc = tokenizer(values["text"], values["text_pair"], truncation=True, max_length=max_length)
        return Encoded(prompt=list(enc["input_ids"]))
    if values["question"] is None or values["context"] is None:
        raise ValueError(f"row {row.get('id')!r} has no {'source ' if stream == 'source' else ''}question/context")
    enc = tokenizer(
        values["question"],
        values["context"],
        truncation="only_second",
        max_length=max_length,
        return_offsets_mapping=True,
    )
    seq_ids = enc.sequence_ids()
    offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"], seq_ids)]
    limit = row.get("answer_context_chars")  # input-level fusion: answers come from the target part of the context
    if limit is not None:
        offsets = [o if o is not None and o[1] <= limit else None for o in offsets]
    out = Encoded(prompt=list(enc["input_ids"]), offsets=offsets)
    if with_answer:
        answers = row["answers"] if stream == "target" else (row.get("source_answers") or row["answers"])
        if answers["text"]:
            char_start = answers["answer_start"][0]
            char_end = char_start + len(answers["text"][0])
            tok_start = next((i for i, o in enumerate(offsets) if o and o[0] <= char_start < o[1]), None)
            tok_end = next((i for i, o in enumerate(offsets) if o and o[0] < char_end <= o[1]), None)
            if tok_start is not None and tok_end is not None and tok_start <= tok_end:
                out.start, out.end = tok_start, tok_end
    return out


def encode(
    task: Task,
    tokenizer,
    row: dict,
    stream: str,
    max_length: int,
    family: str,
    *,
    with_answer: bool,
    cache: dict[str, list[int]] | None = None,
) -> Encoded:
    if family == "decoder":
        return encode_decoder(task, tokenizer, row, stream, max_length, with_answer=with_answer, cache=cache)
    if family == "encoder":
        return encode_encoder(task, tokenizer, row, stream, max_length, with_answer=with_answer)
    raise ValueError(f"model family must be one of {FAMILIES}, got {family!r}")


def best_span(
    start_logits: Sequence[float], end_logits: Sequence[float], offsets: list, context: str, max_answer_tokens: int = 30
) -> str:
    """Highest-scoring context span (start <= end, at most max_answer_tokens long) as text."""
    best, best_score = "", float("-inf")
    valid = [i for i, o in enumerate(offsets) if o is not None]
    for a, i in enumerate(valid):
        for j in valid[a : a + max_answer_tokens]:
            if j - i + 1 > max_answer_tokens:
                break
            score = start_logits[i] + end_logits[j]
            if score > best_score:
                best_score, best = score, context[offsets[i][0] : offsets[j][1]]
    return best
