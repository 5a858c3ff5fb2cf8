"""Metrics: SQuAD-style answer normalization, exact match / F1, accuracy, macro-F1 (hand-computed cases)."""

import pytest

from flare.metrics import accuracy, classification_scores, exact_match, macro_f1, normalize_answer, qa_scores, token_f1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a pear ", "apple pear"),
        ("Levi's Stadium", "levis stadium"),
        ("theatre", "theatre"),  # articles only as whole words
        ("Dar es Salaam", "dar es salaam"),
        ("القاهرة.", "القاهرة"),
    ],
    ids=["articles+punct", "spaces", "apostrophe", "article-prefix", "multiword", "arabic"],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Nile", "Nile.") == 1.0
    assert exact_match("Nile river", "Nile") == 0.0
    # pred {nile, river}, gold {nile}: precision 1/2, recall 1 -> F1 2/3
    assert token_f1("Nile river", "the Nile") == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: pred a a b, gold a b b -> overlap 2, P=R=2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0
    assert token_f1("a", "") == 1.0  # "a" normalizes to nothing: both empty
    assert token_f1("cat", "") == 0.0


def test_qa_scores_takes_best_gold_and_averages_percent():
    scores = qa_scores(["Nile", "Paris France", "x"], [["the Nile", "Nile river"], ["Paris"], ["y"]])
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)


def test_qa_scores_errors():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        qa_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no gold answer"):
        qa_scores(["a"], [[]])
    with pytest.raises(ValueError, match="no predictions"):
        qa_scores([], [])


def test_accuracy_and_macro_f1_by_hand():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    assert accuracy(preds, labels) == pytest.approx(100 * 4 / 6)
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    assert macro_f1(preds, labels) == pytest.approx(100 * (0.5 + 0.8 + 2 / 3) / 3)


def test_macro_f1_classes_explicit_counts_absent_class_as_zero():
    # class 2 never true, never predicted: ignored by default, 0 when listed
    assert macro_f1([0, 1], [0, 1]) == pytest.approx(100.0)
    assert macro_f1([0, 1], [0, 1], classes=range(3)) == pytest.approx(200 / 3)
    scores = classification_scores([0, 1, 2], [0, 1, 1], num_classes=3)
    assert scores["accuracy"] == pytest.approx(200 / 3)
    assert set(scores) == {"accuracy", "macro_f1"}
