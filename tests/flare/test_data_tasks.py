"""Task encodings and batches: prompt layout and truncation, stream alignment, labels, data order, LR schedule."""

import pytest
import torch

from flare.default.build import build_tokenizer
from flare.tasks import TASKS, Task, best_span, encode_decoder, encode_encoder, get_task, label_token_ids, model_family
from flare.train.batching import IGNORE, collate, epoch_order, global_batches, micro_slices, prepare
from flare.train.loop import lr_at


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _row(text, source, label=2, rid="r"):
    return {
        "id": rid,
        "lang": "qaa",
        "text": text,
        "text_pair": None,
        "label": label,
        "source_text": source,
        "source_text_pair": None,
    }


def _words(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_decoder_prompt_layout_and_truncation(tok):
    task = get_task("toy")
    row = _row("dofubi dugede gero bedesa", "the food was great today")
    enc = encode_decoder(task, tok, row, "target", 64, with_answer=True)
    assert _words(tok, enc.prompt) == ["<s>", "Text", ":", "dofubi", "dugede", "gero", "bedesa", "Sentiment", ":"]
    assert _words(tok, enc.answer) == ["positive"]
    src = encode_decoder(task, tok, row, "source", 64, with_answer=True)
    assert _words(tok, src.prompt)[3:8] == ["the", "food", "was", "great", "today"]
    short = encode_decoder(task, tok, row, "source", 8, with_answer=True)  # 8 = bos + 4 template + 2 words + answer
    assert _words(tok, short.prompt) == ["<s>", "Text", ":", "the", "food", "Sentiment", ":"]
    assert len(short.prompt) + len(short.answer) == 8
    with pytest.raises(ValueError, match="raise --max-length"):
        encode_decoder(task, tok, row, "target", 5, with_answer=True)
    with pytest.raises(ValueError, match="has no source_text"):
        encode_decoder(task, tok, _row("a", None), "source", 64, with_answer=False)


def test_pair_truncation_shortens_the_longer_segment_first():
    class Chars:  # one token per character, no specials
        bos_token_id = None
        eos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    task = Task(
        name="t",
        kind="classification",
        prompt="P{text}H{text_pair}:",
        truncate=("text", "text_pair"),
        languages=(),
        metric="accuracy",
        labels=("a",),
        label_words=("a",),
    )
    row = {"id": "1", "text": "x" * 10, "text_pair": "y" * 4, "label": 0}
    enc = encode_decoder(task, Chars(), row, "target", 13, with_answer=False)
    text = "".join(map(chr, enc.prompt))
    assert text == "P" + " " + "x" * 4 + "H" + " " + "y" * 4 + ":"  # 13 tokens: only the longer field was cut
    enc = encode_decoder(task, Chars(), row, "target", 9, with_answer=False)
    assert "".join(map(chr, enc.prompt)) == "P xxHyy:" or len(enc.prompt) == 9


def test_label_words_must_start_with_distinct_tokens(tok):
    assert len(set(label_token_ids(get_task("toy"), tok))) == 3
    clash = Task(
        name="c",
        kind="classification",
        prompt="{text}",
        truncate=("text",),
        languages=(),
        metric="accuracy",
        labels=("a", "b"),
        label_words=("positive", "positive"),
    )
    with pytest.raises(ValueError, match="distinct tokens"):
        label_token_ids(clash, tok)


def test_decoder_batch_aligns_prompt_ends_of_both_streams(tok):
    task = get_task("toy")
    rows = [
        _row("dofubi gero", "the food was really great today", rid="a"),
        _row("dofubi gero bedesa rage dehu popu", "the bus", label=0, rid="b"),
    ]
    ex = prepare(rows, task, tok, "decoder", 64, with_source=True, with_answer=True)
    b = collate(ex, "decoder", task, tok.pad_token_id, with_answer=True)
    L = b["input_ids"].shape[1]
    assert b["source_input_ids"].shape == (2, L) and b["answer_len"] == 1
    sentiment = tok.convert_tokens_to_ids("Sentiment")
    for ids in (b["input_ids"], b["source_input_ids"]):
        assert (ids[:, L - 3] == sentiment).all()  # "... Sentiment : <answer>" ends every row at the same place
    assert b["labels"][:, -1].tolist() == [tok.convert_tokens_to_ids("positive"), tok.convert_tokens_to_ids("negative")]
    assert (b["labels"][:, :-1] == IGNORE).all()
    assert L == 12 and b["attention_mask"][0].tolist() == [0] * 4 + [1] * 8  # left padding only
    assert ex[0].loss_units == 1


def test_encoder_qa_span_positions_from_offsets(tok):
    task = get_task("tydiqa")
    context = "the food was great today"
    row = {
        "id": "q",
        "lang": "en",
        "question": "the bus",
        "context": context,
        "answers": {"text": ["great today"], "answer_start": [13]},
        "source_question": "the bus",
        "source_context": context,
        "source_answers": None,
    }
    enc = encode_encoder(task, tok, row, "target", 64, with_answer=True)
    words = _words(tok, enc.prompt)
    assert words[enc.start] == "great" and words[enc.end] == "today"
    assert best_span([0.0] * len(words), [0.0] * len(words), enc.offsets, context, 30) != ""
    logits = [0.0] * len(words)
    s, e = list(logits), list(logits)
    s[enc.start], e[enc.end] = 5.0, 5.0
    assert best_span(s, e, enc.offsets, context) == "great today"
    cut = encode_encoder(task, tok, row, "target", 7, with_answer=True)  # answer outside the window -> CLS
    assert (cut.start, cut.end) == (0, 0)


def test_model_family_and_task_registry():
    from flare.testing import tiny_config

    assert model_family(tiny_config("xlm-roberta")) == "encoder"
    assert {model_family(tiny_config(a)) for a in ("llama", "gemma2", "qwen2", "mistral")} == {"decoder"}
    assert set(TASKS) == {"xnli", "tydiqa", "nusax", "toy"}
    with pytest.raises(ValueError, match="unknown task"):
        get_task("mnli")


def test_data_order_is_deterministic_and_each_global_batch_splits_exactly():
    a = epoch_order(100, seed=1, stage=2, epoch=3)
    assert a == epoch_order(100, seed=1, stage=2, epoch=3) and sorted(a) == list(range(100))
    assert a != epoch_order(100, seed=1, stage=2, epoch=4) and a != epoch_order(100, seed=1, stage=1, epoch=3)
    batches = list(global_batches(100, 32, 1, 2, 3))
    assert len(batches) == 3 and all(len(b) == 32 for b in batches)  # the last partial batch is dropped
    batch = batches[0]
    for micro, accum, world in ((32, 1, 1), (8, 4, 1), (8, 2, 2), (4, 2, 4)):
        parts = [micro_slices(batch, micro, accum, rank, world) for rank in range(world)]
        flat = sorted(i for rank_parts in parts for p in rank_parts for i in p)
        assert flat == sorted(batch) and all(len(p) == micro for rp in parts for p in rp)


def test_learning_rate_schedule():
    lrs = [lr_at(s, 20, 2, 1.0) for s in range(1, 21)]
    assert lrs[:2] == [0.5, 1.0]  # linear warmup over 10% of the steps
    assert lrs[2] == 1.0 and lrs[-1] == pytest.approx(1 / 18) and min(lrs) > 0
    assert all(x > y for x, y in zip(lrs[2:], lrs[3:]))  # then linear decay
    assert lr_at(1, 5, 0, 2.0) == 2.0


def test_collate_rejects_mixed_source_rows(tok):
    task = get_task("toy")
    ex = prepare([_row("gero", "the bus")], task, tok, "decoder", 64, with_source=True, with_answer=True)
    ex += prepare([_row("gero", "the bus")], task, tok, "decoder", 64, with_source=False, with_answer=True)
    with pytest.raises(ValueError, match="mixes rows"):
        collate(ex, "decoder", task, tok.pad_token_id, with_answer=True)
    assert torch.is_tensor(collate(ex[:1], "encoder", task, tok.pad_token_id, with_answer=True)["class_labels"])


def _qa_row(rid, context, answer, source_answer):
    return {
        "id": rid,
        "lang": "qaa",
        "question": "food",
        "context": context,
        "answers": {"text": [answer], "answer_start": [0]},
        "source_question": "food",
        "source_context": context,
        "source_answers": {"text": [source_answer], "answer_start": [0]},
    }


def test_decoder_batch_never_exceeds_max_length_and_keeps_answers_aligned(tok):
    # Each stream is truncated against its own answer; the batch pads to the longest prompt plus the
    # longest answer over both streams and all rows, which used to come out wider than max_length.
    task = get_task("tydiqa")
    words = "the food was great today and "
    rows = [
        _qa_row("a", words * 20, "food", words * 3),  # long prompt, short target answer, long source answer
        _qa_row("b", words * 20, "food", "food"),  # long prompt, short answers: fits with its own answers only
    ]
    ex = prepare(rows, task, tok, "decoder", 64, with_source=True, with_answer=True)
    for e in ex:
        assert len(e.target.prompt) + len(e.target.answer) == 64 == len(e.source.prompt) + len(e.source.answer)
    b = collate(ex, "decoder", task, tok.pad_token_id, with_answer=True)
    A = b["answer_len"]
    assert b["input_ids"].shape == b["source_input_ids"].shape == (2, 64)
    assert A == len(ex[0].source.answer)  # the long English answer is kept whole
    colon = tok.convert_tokens_to_ids(":")
    for ids, mask, streams in (
        (b["input_ids"], b["attention_mask"], [e.target for e in ex]),
        (b["source_input_ids"], b["source_attention_mask"], [e.source for e in ex]),
    ):
        assert (ids[:, 64 - A - 1] == colon).all() and (mask[:, 64 - A - 1] == 1).all()  # prompts end at one column
        for row, enc in zip(ids.tolist(), streams):
            assert row[64 - A : 64 - A + len(enc.answer)] == enc.answer  # answers intact, right after the prompt
        assert (ids[:, 0] == tok.bos_token_id).all()  # shortened inside the context: the template is whole
    labels = b["labels"].tolist()
    for row, e in zip(labels, ex):
        assert [t for t in row if t != IGNORE] == e.target.answer  # the loss sees exactly the target answers
    short = collate(ex[1:], "decoder", task, tok.pad_token_id, with_answer=True)  # nothing to shorten: unchanged
    assert short["input_ids"][0].tolist() == ex[1].target.prompt + ex[1].target.answer


def test_a_training_cap_keeps_every_language(tmp_path):
    """max_train_examples takes rows in turn from each language, not the first language's only
    (hub datasets and files come one language after the other)."""
    import json
    from collections import Counter

    from flare.default.sample import load_sample
    from flare.train.config import TrainConfig
    from flare.train.inputs import load_stage_data

    rows = sorted(load_sample("train"), key=lambda r: r["lang"])  # all qaa rows, then all qab rows
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = TrainConfig(stages=("stage2",), max_train_examples=9, train_file=str(train_file))
    data = load_stage_data(cfg, get_task("toy"))
    assert len(data.train) == 9
    assert Counter(r["lang"] for r in data.train) == Counter({"qaa": 5, "qab": 4})
