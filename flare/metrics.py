"""Task metrics: accuracy (XNLI), macro-F1 (NusaX), exact match and token F1 (TyDiQA-GoldP).

All scores are percentages in [0, 100], as the paper and the SQuAD evaluation script report them.

QA answers are compared after SQuAD v1.1's normalization (the script TyDiQA-GoldP is scored with):
lower-case, drop ASCII punctuation, drop the English articles a/an/the, collapse whitespace. Token
F1 splits on whitespace. Each prediction is scored against every gold answer and the best counts.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Sequence

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalized strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall over the normalized, whitespace-split answers."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # Both empty is a match (SQuAD 2.0 convention); one empty scores 0.
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 (percent) of predictions against lists of gold answers (max over golds)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    em = f1 = 0.0
    for i, (pred, answers) in enumerate(zip(predictions, golds)):
        if isinstance(answers, str):
            answers = [answers]
        if not answers:
            raise ValueError(f"example {i} has no gold answer (TyDiQA-GoldP always has one)")
        em += max(exact_match(pred, g) for g in answers)
        f1 += max(token_f1(pred, g) for g in answers)
    n = len(predictions)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Percentage of predictions equal to their label."""
    _check_pairs(predictions, labels)
    return 100.0 * sum(int(p == y) for p, y in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence[int], labels: Sequence[int], classes: Iterable[int] | None = None) -> float:
    """Unweighted mean over classes of the per-class F1 (percent).

    ``classes`` defaults to every class seen in labels or predictions (scikit-learn's default). A
    class that is never predicted and never true has an undefined F1 and is only counted when
    listed in ``classes`` explicitly (then as 0, scikit-learn's ``zero_division=0``).
    """
    _check_pairs(predictions, labels)
    classes = sorted(set(labels) | set(predictions)) if classes is None else list(classes)
    total = 0.0
    for c in classes:
        tp = sum(1 for p, y in zip(predictions, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(predictions, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(predictions, labels) if p != c and y == c)
        total += 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
    return 100.0 * total / len(classes)


def classification_scores(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (over all ``num_classes`` classes), percent."""
    return {
        "accuracy": accuracy(predictions, labels),
        "macro_f1": macro_f1(predictions, labels, classes=range(num_classes)),
    }


def _check_pairs(predictions: Sequence, labels: Sequence) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("no predictions to score")
