"""The row format every loader produces and every consumer (tasks, training, evaluation) reads.

Rows are plain dicts (picklable, JSON-serializable) with these fields:

classification (XNLI, NusaX, the built-in toy task)
    id, lang          str, str (ISO code of the *target* text; "en" for English rows)
    text              target-language text (XNLI: the premise)
    text_pair         second segment or None (XNLI: the hypothesis)
    label             int class index
    source_text       English text of the same example (the FLARE source stream), or None
    source_text_pair  English second segment, or None (must be set when text_pair is)

qa (TyDiQA-GoldP, SQuAD)
    id, lang
    question, context target-language question and passage
    answers           {"text": [str, ...], "answer_start": [int, ...]} (character offsets)
    source_question, source_context   English question and passage, or None
    source_answers    English answers in the same format, or None (needed only to train
                      decoders on the source stream with teacher forcing; see flare.tasks)

"Source" always means the English side that FLARE fuses; English rows (stage 1) need none.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

KINDS = ("classification", "qa")

CLASSIFICATION_FIELDS = ("id", "lang", "text", "text_pair", "label", "source_text", "source_text_pair")
QA_FIELDS = ("id", "lang", "question", "context", "answers", "source_question", "source_context", "source_answers")

_SHOWN_IDS = 20  # ids quoted in a message; the full list stays on the report object


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
    return kind


def required_source_fields(row: dict, kind: str) -> tuple[str, ...]:
    """The English fields a row needs before FLARE can use it."""
    if check_kind(kind) == "qa":
        return ("source_question", "source_context")
    return ("source_text", "source_text_pair") if row.get("text_pair") is not None else ("source_text",)


def has_source(row: dict, kind: str) -> bool:
    return all(isinstance(row.get(f), str) and row[f].strip() for f in required_source_fields(row, kind))


@dataclasses.dataclass
class SourceReport:
    """Which rows lack their English translation: a count and the ids, never a silent drop."""

    name: str
    total: int
    missing_ids: list[str]

    @property
    def missing(self) -> int:
        return len(self.missing_ids)

    def message(self) -> str:
        shown = ", ".join(self.missing_ids[:_SHOWN_IDS])
        more = f" and {self.missing - _SHOWN_IDS} more" if self.missing > _SHOWN_IDS else ""
        return f"{self.name}: {self.missing} of {self.total} rows have no English translation (ids: {shown}{more})"

    def as_dict(self) -> dict:
        return {"name": self.name, "total": self.total, "missing": self.missing, "missing_ids": self.missing_ids}


class MissingSourceError(ValueError):
    """Rows without their English source where FLARE needs one. ``.report`` lists them all."""

    def __init__(self, report: SourceReport, hint: str = "") -> None:
        self.report = report
        super().__init__(report.message() + (f". {hint}" if hint else ""))


MISSING_POLICIES = ("error", "drop")


def require_sources(
    rows: Sequence[dict], kind: str, *, name: str, policy: str = "error"
) -> tuple[list[dict], SourceReport]:
    """Check every row has its English source.

    policy "error" raises ``MissingSourceError`` naming the count and ids; "drop" removes those rows
    and logs the same count and ids as a warning. Either way the returned report lists them, and the
    training/evaluation summaries store it.
    """
    if policy not in MISSING_POLICIES:
        raise ValueError(f"missing-source policy must be one of {MISSING_POLICIES}, got {policy!r}")
    kept, missing = [], []
    for row in rows:
        (kept if has_source(row, kind) else missing).append(row)
    report = SourceReport(name=name, total=len(rows), missing_ids=[str(r.get("id")) for r in missing])
    if missing:
        if policy == "error":
            raise MissingSourceError(
                report,
                hint="Translate them (flare translate), attach a translation file, or pass "
                "--missing-source drop to leave them out (they are then listed in the run summary)",
            )
        logger.warning("%s; dropping them (policy 'drop')", report.message())
    return kept, report


def _label_help(label_names: Sequence[str] | None, num_labels: int) -> str:
    if label_names:
        return ", ".join(f"{i} = {name}" for i, name in enumerate(label_names))
    return f"0..{num_labels - 1}"


def validate_rows(
    rows: Iterable[dict],
    kind: str,
    *,
    name: str,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    empty: str = "error",
) -> list[dict]:
    """Check the fields a task needs are present and well-typed; raise ValueError naming the row.

    ``num_labels`` (or ``label_names``): class labels must lie in 0..num_labels-1, checked here so a bad
    label fails before any training rather than as an IndexError in stage 2 (or a silently wrong score).
    Empty target texts are refused with the ids of every such row (``empty="warn"``: kept, and the same
    message logged: hub datasets, which a user cannot edit)."""
    check_kind(kind)
    if num_labels is None and label_names:
        num_labels = len(label_names)
    out = []
    seen: set[str] = set()
    blank: list[str] = []
    for i, row in enumerate(rows):
        rid = row.get("id")
        where = f"{name} row {i} (id {rid!r})"
        if rid is None or str(rid) == "":
            raise ValueError(f"{where}: every row needs an 'id'")
        if str(rid) in seen:
            raise ValueError(f"{where}: duplicate id {rid!r}")
        seen.add(str(rid))
        if kind == "classification":
            if not isinstance(row.get("text"), str):
                raise ValueError(f"{where}: 'text' must be a string, got {type(row.get('text')).__name__}")
            label = row.get("label")
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                valid = f": one of {_label_help(label_names, num_labels)}" if num_labels else ""
                raise ValueError(f"{where}: 'label' must be a non-negative int class index{valid}, got {label!r}")
            if num_labels is not None and label >= num_labels:
                raise ValueError(
                    f"{where}: label {label} is outside the task's {num_labels} classes "
                    f"({_label_help(label_names, num_labels)}); fix the row or choose the task it belongs to"
                )
            if not row["text"].strip():
                blank.append(str(rid))
        else:
            for f in ("question", "context"):
                if not isinstance(row.get(f), str):
                    raise ValueError(f"{where}: {f!r} must be a string")
            answers = row.get("answers")
            if not isinstance(answers, dict) or len(answers.get("text", [])) != len(answers.get("answer_start", [])):
                raise ValueError(
                    f"{where}: 'answers' must be {{'text': [...], 'answer_start': [...]}} of equal lengths"
                )
            if not row["question"].strip() or not row["context"].strip():
                blank.append(str(rid))
        out.append(row)
    if blank:
        fields = "'text'" if kind == "classification" else "'question' or 'context'"
        more = f" and {len(blank) - _SHOWN_IDS} more" if len(blank) > _SHOWN_IDS else ""
        shown = ", ".join(blank[:_SHOWN_IDS]) + more
        message = f"{name}: {len(blank)} of {len(out)} rows have an empty {fields} (ids: {shown})"
        if empty != "warn":
            raise ValueError(f"{message}; fill them in or remove those rows")
        logger.warning(message)
    return out
