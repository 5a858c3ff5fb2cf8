"""Translation: the real transformers path on a tiny random NLLB-architecture model and tokenizer built here
(NllbTokenizer over a locally trained BPE, M2M100 weights), the answer-span scheme, resumable output, the CLI."""

import json

import pytest
import torch

from flare.translate import (
    Translator,
    choose_markers,
    mark_answer,
    nllb_code,
    translate_test_rows,
    translate_to_file,
    translate_train_rows,
    unmark_answer,
)

TEXTS = [
    "The children are playing in the park.",
    "Watoto wanacheza bustanini.",
    "Nairobi is the capital of Kenya.",
    "Mji mkubwa zaidi wa Tanzania ni Dar es Salaam.",
    "Helsinki on Suomen pääkaupunki.",
]


@pytest.fixture(scope="module")
def tiny_mt(tmp_path_factory):
    """The built-in tiny NLLB-style checkpoint (real NllbTokenizer class, M2M100 architecture)."""
    from flare.default.build import save_tiny_nllb

    return save_tiny_nllb(tmp_path_factory.mktemp("tiny-nllb") / "model", seed=0)


class Recorder:
    """Wraps model.generate, keeping each call's inputs (the real generate still runs)."""

    def __init__(self, model):
        self.calls, self.generate = [], model.generate
        model.generate = self

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.generate(**kwargs)


def test_real_model_path_sets_source_code_and_forces_target_code(tiny_mt):
    tr = Translator.from_pretrained(str(tiny_mt), device="cpu", batch_size=2, max_length=64, max_new_tokens=6)
    rec = Recorder(tr.model)
    out = tr.translate(["", *TEXTS], "swh_Latn", "eng_Latn")
    assert len(out) == len(TEXTS) + 1 and out[0] == ""  # empty text: no model call, empty result
    assert len(rec.calls) == 3  # 5 texts in batches of 2
    sw, en = tr.tokenizer.convert_tokens_to_ids("swh_Latn"), tr.tokenizer.convert_tokens_to_ids("eng_Latn")
    for call in rec.calls:
        ids, mask = call["input_ids"], call["attention_mask"]
        first = ids[torch.arange(ids.shape[0]), mask.float().argmax(1)]  # first real token of each row
        assert (first == sw).all()  # NLLB: the source language code opens the input
        assert call["forced_bos_token_id"] == en
    with pytest.raises(ValueError, match="not a token"):
        tr.translate(["x"], "swh_Latn", "xxx_Latn")


class WordMT(Translator):
    """A stand-in for the MT model (the span scheme is model-independent): translates word by word with a
    dictionary, upper-casing unknown words, and keeps punctuation and markers where they are."""

    WORDS = {
        "the": "la",
        "capital": "kapitali",
        "of": "ya",
        "kenya": "kenia",
        "is": "ni",
        "nairobi": "nairobi",
        "what": "nini",
        "city": "mji",
        "lies": "iko",
        "on": "kwenye",
        "coast": "pwani",
    }

    def __init__(self, drop_markers=False):
        self.batch_size, self.max_length, self.calls, self.drop_markers = 8, 1000, [], drop_markers

    def _language_id(self, code):
        return 0

    def _n_tokens(self, text):
        return len(text.split())

    def _generate(self, texts, src, tgt):
        self.calls.append(list(texts))
        out = []
        for t in texts:
            words = []
            for w in t.split(" "):
                core = w.strip('.,?«»"[]')
                words.append(w.replace(core, self.WORDS.get(core.lower(), core.upper())) if core else w)
            text = " ".join(words)
            if self.drop_markers:
                text = text.replace("«", "").replace("»", "")
            out.append(text)
        return out


def test_generation_is_batched_by_length_and_returned_in_order():
    mt = WordMT()
    mt.batch_size = 2
    alone = [WordMT().translate([t], "eng_Latn", "swh_Latn")[0] for t in TEXTS]
    assert mt.translate(TEXTS, "eng_Latn", "swh_Latn") == alone
    assert len(set(alone)) == len(TEXTS)
    # batches hold texts of similar length (longest first), not the input order
    assert [len(c) for c in mt.calls] == [2, 2, 1]
    assert mt.calls[0] == sorted(TEXTS, key=len, reverse=True)[:2]


def test_answer_span_markers_survive_translation():
    rows = [
        {
            "id": "1",
            "lang": "en",
            "question": "What is the capital of Kenya?",
            "context": "The capital of Kenya is Nairobi.",
            "answers": {"text": ["Nairobi"], "answer_start": [24]},
        }
    ]
    (out,) = translate_train_rows(rows, "qa", WordMT(), "sw", "swh_Latn")
    assert out["span"] == "marker"
    assert out["context"] == "la kapitali ya kenia ni nairobi."
    start, answer = out["answers"]["answer_start"][0], out["answers"]["text"][0]
    assert answer == "nairobi" and out["context"][start : start + len(answer)] == answer
    assert out["source_context"] == rows[0]["context"] and out["source_answers"] == rows[0]["answers"]
    assert out["question"] == "nini ni la kapitali ya kenia?"


def test_lost_markers_fall_back_to_search_then_report_unaligned():
    rows = [
        {
            "id": "a",
            "lang": "en",
            "question": "What city?",
            "context": "Nairobi lies on the coast.",
            "answers": {"text": ["Nairobi"], "answer_start": [0]},
        },
        {
            "id": "b",
            "lang": "en",
            "question": "What city?",
            "context": "Mombasa lies on the coast.",
            "answers": {"text": ["Mombasa lies"], "answer_start": [0]},
        },
    ]
    mt = WordMT(drop_markers=True)
    a, b = translate_train_rows(rows, "qa", mt, "sw", "swh_Latn")
    assert a["span"] == "search" and a["answers"] == {"text": ["nairobi"], "answer_start": [0]}
    assert b["span"] == "search" and b["answers"]["text"] == ["MOMBASA iko"]
    mt.WORDS = dict(WordMT.WORDS, lies="iko")
    rows[1]["answers"] = {"text": ["coast"], "answer_start": [20]}
    rows[1]["context"] = "Mombasa lies on the coast."

    class Paraphrase(WordMT):  # the passage says "pwani" but the lone answer comes back "ufuo"
        def _generate(self, texts, src, tgt):
            out = super()._generate(texts, src, tgt)
            return ["ufuo" if t == "pwani" else t for t in out]

    (c,) = translate_train_rows(rows[1:], "qa", Paraphrase(drop_markers=True), "sw", "swh_Latn")
    assert c["span"] == "unaligned" and c["answers"] == {"text": ["ufuo"], "answer_start": [-1]}


def test_marker_helpers():
    assert choose_markers("plain text") == ("«", "»")
    assert choose_markers("a «quoted» text") == ('"', '"')
    assert choose_markers('« and "') == ("[", "]")
    assert mark_answer("The capital is Nairobi.", 15, "Nairobi", ("«", "»")) == "The capital is «Nairobi»."
    with pytest.raises(ValueError, match="not at offset"):
        mark_answer("The capital is Nairobi.", 3, "Nairobi", ("«", "»"))
    assert unmark_answer("ni « Nairobi » sasa", ("«", "»")) == ("ni  Nairobi  sasa", 4, "Nairobi")
    assert unmark_answer('ni "Nairobi" sasa', ('"', '"')) == ("ni Nairobi sasa", 3, "Nairobi")
    assert unmark_answer("» Nairobi «", ("«", "»")) is None
    assert unmark_answer("ni «Nairobi» na «Kenya»", ("«", "»")) is None
    assert unmark_answer("ni «  » sasa", ("«", "»")) is None


def test_long_texts_are_split_into_sentences_and_rejoined():
    mt = WordMT()
    mt.max_length = 8
    long = "The capital of Kenya is Nairobi. Nairobi is the capital. What city?"
    assert mt.translate([long, "Kenya."], "eng_Latn", "swh_Latn") == [
        "la kapitali ya kenia ni nairobi. nairobi ni la kapitali. nini mji?",
        "kenia.",
    ]
    assert sorted(len(c) for c in mt.calls) == [4]  # 3 sentences + 1 short text in one batch


class CharMT(Translator):
    """One token per character; "translates" by returning what the model would see after truncation."""

    def __init__(self, max_length):
        self.batch_size, self.max_length, self.calls = 8, max_length, []

    def _language_id(self, code):
        return 0

    def _n_tokens(self, text):
        return len(text)

    def _generate(self, texts, src, tgt):
        self.calls.append(list(texts))
        return [t[: self.max_length - 2] for t in texts]  # NLLB's tokenizer keeps max_length - 2 text tokens


def test_cjk_texts_are_split_at_full_width_stops_and_overlong_segments_are_reported(caplog):
    # Chinese/Japanese put no space after 。！？: the split used to need one, so a long passage stayed one
    # segment and lost everything past max_length tokens without a word.
    zh = "第一句话很长。第二句话也长！第三句话更长？"
    mt = CharMT(max_length=10)
    assert mt.translate([zh], "zho_Hans", "eng_Latn") == ["第一句话很长。 第二句话也长！ 第三句话更长？"]
    assert sorted(mt.calls[0]) == sorted(["第一句话很长。", "第二句话也长！", "第三句话更长？"])
    assert mt._split("他说：「好。」然后走了。。下一句很长的话")[0] == ["他说：「好。」然后走了。。", "下一句很长的话"]
    assert mt.truncated_segments == 0 and not caplog.records
    with caplog.at_level("WARNING", logger="flare.translate"):
        mt.translate(["这是一个没有句号的非常长的句子", "短。另一个没有句号的非常长的句子"], "zho_Hans", "eng_Latn")
        mt.translate(["又一个没有句号的非常长的句子"], "zho_Hans", "eng_Latn")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("2 text segment(s)") and "max_length=10" in warnings[0]
    assert mt.truncated_segments == 3  # warned once, counted throughout


def test_translate_test_rows_fill_source_fields():
    rows = [
        {"id": "1", "lang": "sw", "text": "the capital", "text_pair": None, "label": 0},
        {"id": "2", "lang": "sw", "text": "of Kenya", "text_pair": "is Nairobi", "label": 1},
    ]
    out = translate_test_rows(rows, "classification", WordMT(), "swh_Latn")
    assert out == [
        {"id": "1", "lang": "sw", "source_text": "la kapitali", "source_text_pair": None},
        {"id": "2", "lang": "sw", "source_text": "ya kenia", "source_text_pair": "ni nairobi"},
    ]


def test_nllb_codes():
    assert nllb_code("sw") == "swh_Latn" and nllb_code("ace") == "ace_Latn" and nllb_code("en") == "eng_Latn"
    assert nllb_code("bbc") == "ind_Latn"  # not in NLLB-200: Indonesian, with a warning
    assert nllb_code("zul_Latn") == "zul_Latn" and nllb_code("xx", "fra_Latn") == "fra_Latn"
    with pytest.raises(ValueError, match="no NLLB-200 code"):
        nllb_code("xx")


# ----------------------------------------------------------------------------------------- resumable file
def _rows(n):
    return [{"id": str(i), "lang": "sw", "text": f"the capital {i}", "text_pair": None, "label": 0} for i in range(n)]


def test_interrupted_translation_resumes_to_the_same_file(tmp_path):
    rows = _rows(10)

    def chunk(part):
        return translate_test_rows(part, "classification", WordMT(), "swh_Latn")

    full = tmp_path / "full.jsonl"
    translate_to_file(rows, full, chunk, chunk_size=3, progress=False)

    calls = []

    def flaky(part):
        calls.append(len(part))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return chunk(part)

    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        translate_to_file(rows, out, flaky, chunk_size=3, progress=False)
    partial = tmp_path / "out.jsonl.partial"
    assert not out.exists() and len(partial.read_text().splitlines()) == 6
    with open(partial, "a") as f:  # a torn line from a crash in the middle of a write
        f.write('{"id": "6", "la')
    report = translate_to_file(rows, out, chunk, chunk_size=3, resume=True, progress=False)
    assert report.resumed_from == 6 and report.rows == 10
    assert out.read_text() == full.read_text() and not partial.exists()
    with pytest.raises(FileExistsError):
        translate_to_file(rows, out, chunk, progress=False)
    (tmp_path / "other.jsonl.partial").write_text('{"id": "zz"}\n')  # a partial file of other input
    with pytest.raises(ValueError, match="prefix"):
        translate_to_file(rows, tmp_path / "other.jsonl", chunk, resume=True, progress=False)


def test_resume_after_a_write_torn_just_before_its_newline(tmp_path):
    # The crash left the last record complete but without its "\n": the next chunk used to be appended
    # on the same line, and the finished file was not valid JSONL.
    from flare.data import read_table

    rows = _rows(4)

    def chunk(part):
        return translate_test_rows(part, "classification", WordMT(), "swh_Latn")

    out = tmp_path / "out.jsonl"
    first = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk(rows[:2]))
    (tmp_path / "out.jsonl.partial").write_text(first[:-1])
    report = translate_to_file(rows, out, chunk, chunk_size=2, resume=True, progress=False)
    assert report.resumed_from == 2 and report.rows == 4
    assert [r["id"] for r in read_table(out)] == ["0", "1", "2", "3"]
    assert out.read_text().startswith(first)
    # Torn inside a multi-byte character (ensure_ascii=False output of non-Latin text): cut off, not a crash.
    out.unlink()
    torn = json.dumps({"id": "2", "lang": "sw", "source_text": "首都"}, ensure_ascii=False).encode()[:-4]
    (tmp_path / "out.jsonl.partial").write_bytes(first.encode() + torn)
    report = translate_to_file(rows, out, chunk, chunk_size=2, resume=True, progress=False)
    assert report.resumed_from == 2 and [r["id"] for r in read_table(out)] == ["0", "1", "2", "3"]


def test_cli_translate_with_a_local_model_and_input_file(tiny_mt, tmp_path, capsys):
    from flare.cli import main
    from flare.data import attach_translations, read_rows, read_translations

    src = tmp_path / "sw.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows(5)))
    out = tmp_path / "sw-en.jsonl"
    rc = main(
        [
            "translate",
            "--task",
            "nusax",
            "--mode",
            "test",
            "--lang",
            "sw",
            "--input",
            str(src),
            "--output",
            str(out),
            "--model",
            str(tiny_mt),
            "--device",
            "cpu",
            "--max-length",
            "32",
            "--batch-size",
            "2",
            "--chunk-size",
            "2",
        ]
    )
    assert rc == 0 and "wrote 5 rows" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["0", "1", "2", "3", "4"] and all("source_text" in r for r in records)
    rows, _ = attach_translations(read_rows(src, "classification"), read_translations(out), "classification")
    assert all(isinstance(r["source_text"], str) for r in rows)
    assert (
        main(
            [
                "translate",
                "--task",
                "nusax",
                "--mode",
                "test",
                "--lang",
                "xx",
                "--input",
                str(src),
                "--output",
                str(tmp_path / "x.jsonl"),
                "--model",
                str(tiny_mt),
            ]
        )
        == 2
    )
    assert "no NLLB-200 code" in capsys.readouterr().err


def test_cli_translate_checks_the_language_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from flare.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the MT model was loaded before the language code was checked")

    monkeypatch.setattr(Translator, "from_pretrained", never)
    src = tmp_path / "xx.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows(2)))
    argv = ["translate", "--task", "nusax", "--mode", "test", "--lang", "xx", "--input", str(src)]
    assert main(argv + ["--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "no NLLB-200 code known for language 'xx'" in err and "--lang-code" in err  # the option that exists


def test_cli_translate_train_from_the_hub_copy_reports_unlocated_spans(tiny_mt, tmp_path, capsys):
    """translate-train of SQuAD (TyDiQA's English counterpart) from its hub layout: a random model loses the
    markers, so every row is written with its separately translated answer and listed as unaligned."""
    from pathlib import Path

    from flare.cli import main
    from flare.data import read_rows

    squad = Path(__file__).resolve().parents[1] / "fixtures" / "hub" / "rajpurkar__squad"
    out = tmp_path / "squad-sw.jsonl"
    argv = [
        "translate",
        "--task",
        "tydiqa",
        "--mode",
        "train",
        "--lang",
        "sw",
        "--split",
        "train",
        "--dataset-path",
        str(squad),
        "--output",
        str(out),
        "--model",
        str(tiny_mt),
        "--device",
        "cpu",
        "--max-length",
        "48",
    ]
    assert main(argv) == 0
    message = capsys.readouterr().out
    rows = read_rows(out, "qa")
    assert [r["id"] for r in rows] == ["5733be284776f41900661182", "5733be284776f4190066117f"]
    assert all(r["lang"] == "sw" and r["source_context"] and r["source_answers"]["text"] for r in rows)
    spans = {r["span"] for r in rows}
    assert spans <= {"marker", "search", "unaligned"}
    unaligned = [r for r in rows if r["span"] == "unaligned"]
    assert all(r["answers"]["answer_start"] == [-1] for r in unaligned)
    assert ("answer spans not located" in message) == bool(unaligned)
