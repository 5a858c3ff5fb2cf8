"""Data: the hub loaders on local copies in the hub's layouts, local files, translations, missing-source reports,
the task encodings and the bundled toy sample."""

import csv
import json
from pathlib import Path

import pytest

from flare.data import (
    MissingSourceError,
    attach_translations,
    load_nusax,
    load_squad,
    load_tydiqa,
    load_xnli,
    read_rows,
    read_translations,
    require_sources,
    write_jsonl,
)
from flare.data.hub import XNLI_LABELS

HUB = Path(__file__).resolve().parents[1] / "fixtures" / "hub"
XNLI = str(HUB / "facebook__xnli")
TYDIQA = str(HUB / "google-research-datasets__tydiqa")
SQUAD = str(HUB / "rajpurkar__squad")
NUSAX = str(HUB / "indonlp__NusaX-senti")


# ----------------------------------------------------------------------------------------- hub loaders
def test_xnli_language_config_with_parallel_english():
    rows = load_xnli("sw", "train", path=XNLI, source="parallel")
    assert len(rows) == 4
    r = rows[2]
    assert r["id"] == "train-2" and r["lang"] == "sw"
    assert r["text"] == "Duka limefungwa Jumapili." and r["text_pair"] == "Duka hufunguliwa kila siku."
    assert XNLI_LABELS[r["label"]] == "contradiction"
    assert r["source_text"] == "The shop is closed on Sundays." and r["source_text_pair"] == "The shop opens every day."


def test_xnli_without_source_leaves_english_empty_and_english_config_is_its_own_source():
    ar = load_xnli("ar", "test", path=XNLI)
    assert [r["source_text"] for r in ar] == [None] * 3
    assert ar[0]["text"] == "النهر واسع جدا هنا."
    en = load_xnli("en", "validation", path=XNLI)
    assert all(r["source_text"] == r["text"] and r["source_text_pair"] == r["text_pair"] for r in en)
    # the configs are row-parallel: ids and labels agree
    assert [(r["id"], r["label"]) for r in ar] == [(r["id"], r["label"]) for r in load_xnli("en", "test", path=XNLI)]


def test_xnli_unknown_split_and_source():
    with pytest.raises(ValueError, match="split"):
        load_xnli("sw", "dev", path=XNLI)
    with pytest.raises(ValueError, match="source must be"):
        load_xnli("sw", "test", path=XNLI, source="gold")


def test_tydiqa_selects_language_by_id_prefix():
    rows = load_tydiqa("sw", "validation", path=TYDIQA)
    assert [r["id"] for r in rows] == ["swahili-404-1", "swahili-404-2"]
    r = rows[1]
    assert r["answers"] == {"text": ["Dar es Salaam"], "answer_start": [0]}
    assert r["context"][r["answers"]["answer_start"][0] :].startswith(r["answers"]["text"][0])
    assert r["source_context"] is None
    en = load_tydiqa("en", "validation", path=TYDIQA)
    assert en[0]["source_answers"] == en[0]["answers"]
    with pytest.raises(ValueError, match="no rows whose id starts with"):
        load_tydiqa("ko", "validation", path=TYDIQA)
    with pytest.raises(ValueError, match="has no language"):
        load_tydiqa("xx", "validation", path=TYDIQA)


def test_squad_is_english_qa_with_itself_as_source():
    rows = load_squad("train", path=SQUAD)
    assert rows[0]["lang"] == "en" and rows[0]["answers"]["text"] == ["1850"]
    assert rows[0]["context"][27:31] == "1850"
    assert rows[0]["source_question"] == rows[0]["question"]


def test_nusax_parquet_conversion_layout_and_missing_english_row_is_reported():
    rows = load_nusax("ace", "test", path=NUSAX, source="parallel")
    assert [r["id"] for r in rows] == ["7", "8", "9"]
    assert rows[1]["source_text"] == "The coffee was bitter and cold."
    assert rows[0]["source_text"] is None  # the fixture's English side lacks id 7
    with pytest.raises(MissingSourceError) as err:
        require_sources(rows, "classification", name="nusax/ace/test")
    assert err.value.report.missing_ids == ["7"]
    assert "1 of 3 rows have no English translation (ids: 7)" in str(err.value)
    kept, report = require_sources(rows, "classification", name="nusax/ace/test", policy="drop")
    assert [r["id"] for r in kept] == ["8", "9"] and report.as_dict()["missing_ids"] == ["7"]


def test_missing_dataset_gives_a_clear_error(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError)):
        load_xnli("sw", "test", path=str(tmp_path))


# ----------------------------------------------------------------------------------------- files
def _qa_row(i, src=True):
    row = {
        "id": f"q{i}",
        "lang": "sw",
        "question": "Ni nini?",
        "context": "Hii ni Nairobi.",
        "answers": {"text": ["Nairobi"], "answer_start": [7]},
    }
    if src:
        row.update(source_question="What is it?", source_context="This is Nairobi.")
    return row


def test_jsonl_csv_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_qa_row(0), _qa_row(1)]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    from_jsonl = read_rows(tmp_path / "qa.jsonl", "qa")
    with open(tmp_path / "qa.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**r, "answers": json.dumps(r["answers"])})  # nested values as JSON cells
    from_csv = read_rows(tmp_path / "qa.csv", "qa")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    from_parquet = read_rows(tmp_path / "qa.parquet", "qa")
    assert from_jsonl == from_csv == from_parquet
    assert from_jsonl[0]["answers"] == {"text": ["Nairobi"], "answer_start": [7]}
    assert from_jsonl[0]["source_answers"] is None


def test_read_rows_renames_columns_maps_string_labels_and_checks(tmp_path):
    path = tmp_path / "nli.tsv"
    path.write_text("premise\thypothesis\tlabel\nA\tB\tneutral\nC\tD\t2\n", encoding="utf-8")
    rows = read_rows(
        path,
        "classification",
        columns={"premise": "text", "hypothesis": "text_pair"},
        lang="sw",
        label_names=XNLI_LABELS,
    )
    assert [(r["id"], r["text"], r["text_pair"], r["label"], r["lang"]) for r in rows] == [
        ("0", "A", "B", 1, "sw"),
        ("1", "C", "D", 2, "sw"),
    ]
    with pytest.raises(ValueError, match="has no 'lang' field: add a 'lang' column"):
        read_rows(path, "classification", columns={"premise": "text"}, label_names=XNLI_LABELS)
    with pytest.raises(ValueError, match="unknown extension"):
        read_rows(tmp_path / "x.txt", "classification")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "lang": "sw", "text": "a", "label": "positive"}\n')
    with pytest.raises(ValueError, match="'label' must be a non-negative int"):
        read_rows(bad, "classification")
    dup = tmp_path / "dup.jsonl"
    dup.write_text(
        '{"id": 1, "lang": "sw", "text": "a", "label": 0}\n{"id": 1, "lang": "sw", "text": "b", "label": 0}\n'
    )
    with pytest.raises(ValueError, match="duplicate id"):
        read_rows(dup, "classification")
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"id": 1, "lang": "sw", "text": "a", "label": 0}\n{"id": 2, "la')
    with pytest.raises(ValueError, match=r"torn.jsonl:2:\d+: not valid JSON"):
        read_rows(torn, "classification")


def test_attach_translations_reports_rows_left_without_english(tmp_path):
    rows = load_xnli("sw", "test", path=XNLI)
    write_jsonl(
        tmp_path / "tr.jsonl",
        [
            {"id": "test-0", "source_text": "The river is wide.", "source_text_pair": "Narrow."},
            {"id": "test-2", "source_text": "The teacher spoke.", "source_text_pair": None},
        ],
    )
    attached, report = attach_translations(
        rows, read_translations(tmp_path / "tr.jsonl"), "classification", name="test"
    )
    assert attached[0]["source_text"] == "The river is wide."
    # test-1 has no record; test-2 lacks its hypothesis translation: both reported, none dropped
    assert len(attached) == 3 and report.missing_ids == ["test-1", "test-2"]
    assert rows[0]["source_text"] is None  # inputs untouched
    with pytest.raises(ValueError, match="none of the source fields"):
        write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "text": "y"}])
        read_translations(tmp_path / "bad.jsonl")


def test_a_translation_file_joining_languages_matches_each_row_by_language_and_id(tmp_path):
    # XNLI's ids repeat in every language ("test-0" in sw and in ur): keyed by id alone, a file joining
    # the per-language outputs of flare translate gave every row the last language's English.
    rows = [{"id": "test-0", "lang": lang, "text": f"{lang} premise", "text_pair": f"{lang} hypothesis", "label": 0}
            for lang in ("sw", "ur")]  # fmt: skip
    write_jsonl(tmp_path / "tr.jsonl", [
        {"id": "test-0", "lang": lang, "source_text": f"from {lang}", "source_text_pair": f"from {lang} too"}
        for lang in ("sw", "ur")
    ])  # fmt: skip
    attached, report = attach_translations(rows, read_translations(tmp_path / "tr.jsonl"), "classification")
    assert [r["source_text"] for r in attached] == ["from sw", "from ur"] and not report.missing_ids
    # a record naming no language still matches by id; one id twice without languages is refused
    write_jsonl(tmp_path / "plain.jsonl", [{"id": "test-0", "source_text": "a", "source_text_pair": "b"}])
    attached, _ = attach_translations(rows, read_translations(tmp_path / "plain.jsonl"), "classification")
    assert [r["source_text"] for r in attached] == ["a", "a"]
    write_jsonl(tmp_path / "twice.jsonl", [{"id": "test-0", "source_text": "a"}, {"id": "test-0", "source_text": "b"}])
    with pytest.raises(ValueError, match="appears twice .*no 'lang' column"):
        read_translations(tmp_path / "twice.jsonl")


def test_files_with_a_byte_order_mark_keep_their_first_column(tmp_path):
    # Excel's "CSV UTF-8" starts with a BOM: read as plain UTF-8 the first column was "\ufeffid", so every
    # row silently got its row number as id and no translation matched.
    (tmp_path / "test.csv").write_text("id,lang,text,label\nnx-17,jav,apik,2\nnx-42,jav,elek,0\n", encoding="utf-8-sig")
    (tmp_path / "tr.tsv").write_text("id\tsource_text\nnx-17\tgood\nnx-42\tbad\n", encoding="utf-8-sig")
    (tmp_path / "rows.jsonl").write_text('{"id": "nx-17", "lang": "jav", "text": "apik", "label": 2}\n', "utf-8-sig")
    rows = read_rows(tmp_path / "test.csv", "classification")
    assert [r["id"] for r in rows] == ["nx-17", "nx-42"]
    rows, report = attach_translations(rows, read_translations(tmp_path / "tr.tsv"), "classification")
    assert not report.missing_ids and [r["source_text"] for r in rows] == ["good", "bad"]
    assert read_rows(tmp_path / "rows.jsonl", "classification")[0]["id"] == "nx-17"


def test_write_jsonl_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"id": 1}])

    class Boom:
        def __iter__(self):
            yield {"id": 2}
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(path, Boom())
    assert path.read_text() == '{"id": 1}\n'  # the old content, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left


# ----------------------------------------------------------------------------------------- toy sample
def test_bundled_sample_is_what_the_generator_writes():
    from flare.default.sample import SAMPLE_PATH, SPLITS, generate, load_sample

    shipped = [json.loads(line) for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines()]
    assert shipped == generate()
    for split, n in SPLITS.items():
        rows = load_sample(split)
        assert len(rows) == n and {r["lang"] for r in rows} == {"qaa", "qab"}
        assert all(r["source_text"] and r["text"] != r["source_text"] for r in rows)
    english = [r["text"] for r in load_sample("test", english=True)]
    assert not set(english) & {r["text"] for r in load_sample("train", english=True)}  # no sentence in two splits
