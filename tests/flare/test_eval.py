"""Evaluation and the hub-task pipelines end to end on local copies: per-language tables and JSON, decoder
label-word scoring and generative QA (lockstep generation), encoder classification and extractive QA; each
through `train()` with a tiny checkpoint saved to disk and loaded the way a hub model is."""

import json
from pathlib import Path

import pytest
import torch

from flare.data import read_rows, write_jsonl
from flare.evaluate import EvalResult, evaluate, predict
from flare.tasks import get_task
from flare.train import TrainConfig, train

HUB = Path(__file__).resolve().parents[1] / "fixtures" / "hub"


def _fixture_words() -> list[str]:
    """Every word of the hub fixtures and the prompt templates."""
    import pyarrow.parquet as pq
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    texts = [t.prompt for t in (get_task("xnli"), get_task("nusax"), get_task("tydiqa"))]
    texts += [" ".join(t.label_words) for t in (get_task("xnli"), get_task("nusax"))]
    for f in HUB.rglob("*.parquet"):
        for row in pq.read_table(f).to_pylist():
            texts += [v for v in row.values() if isinstance(v, str)]
            texts += row["answers"]["text"] if "answers" in row else []
    words = {w for t in texts for w, _ in pre.pre_tokenize_str(t)}
    return sorted(words)


def make_checkpoint(path: Path, arch: str, head: str) -> Path:
    """A tiny random checkpoint + word-level tokenizer over the fixtures' words, saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from flare.testing import _model_class, tiny_config

    encoder = arch == "xlm-roberta"
    specials = ["<s>", "<pad>", "</s>", "<unk>"] if encoder else ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + _fixture_words())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    s, e = ("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])
    if encoder:  # XLM-R's template: <s> A </s></s> B </s>
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[s, e]
        )
    else:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[s])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="right" if encoder else "left",
    )
    overrides = dict(
        vocab_size=len(vocab),
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        max_position_embeddings=160,
    )
    if head == "sequence_classification":
        overrides["num_labels"] = 3
    config = tiny_config(arch, **overrides)
    torch.manual_seed(0)
    _model_class(arch, head)(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------- table / JSON
def test_table_and_average():
    r = EvalResult(
        task="nusax",
        split="test",
        primary="macro_f1",
        per_language={
            "ace": {"accuracy": 50.0, "macro_f1": 40.0, "n": 4},
            "jav": {"accuracy": 100.0, "macro_f1": 100.0, "n": 2},
        },
        average={"accuracy": 75.0, "macro_f1": 70.0},
    )
    lines = r.table().splitlines()
    assert lines[0] == "nusax / test"
    assert lines[1].split() == ["lang", "n", "accuracy", "macro_f1"]
    assert lines[3].split() == ["ace", "4", "50.00", "40.00"] and lines[-1].split() == ["avg", "6", "75.00", "70.00"]
    assert r.score == 70.0


# ----------------------------------------------------------------------------------------- encoder, NusaX
def test_encoder_classification_pipeline_on_nusax_copy(tmp_path, capsys):
    """XLM-R (unquantized, as in the paper) on the NusaX copy: hub loader, parallel English source (one test
    row has none: dropped and listed), classification head trained in full, flare eval reproduces the table."""
    model = make_checkpoint(tmp_path / "xlmr", "xlm-roberta", "sequence_classification")
    cfg = TrainConfig(
        task="nusax",
        model=str(model),
        languages=("ace", "jav"),
        dataset_path=str(HUB / "indonlp__NusaX-senti"),
        eval_source="parallel",
        missing_source="drop",
        batch_size=2,
        epochs=2,
        learning_rate=1e-3,
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    result = train(cfg)
    assert len(result.loss_curve("stage1")) == 4 and len(result.loss_curve("stage2")) == 8  # 4 eng rows; 8 ace+jav
    assert all(torch.isfinite(torch.tensor(result.loss_curve(s))).all() for s in ("stage1", "stage2"))
    assert result.test.per_language["ace"]["n"] == 2 and result.test.per_language["jav"]["n"] == 2  # id 7 dropped
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    test_report = next(r for r in summary["rows_without_translation"] if r["name"] == "test")
    assert test_report["missing_ids"] == ["7", "7"]  # once per language
    assert "classifier" in json.loads((result.adapter / "adapter_config.json").read_text())["modules_to_save"][0]

    from flare.cli import main

    assert main(["eval", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "nusax / test" in out and "ace" in out
    saved = json.loads((tmp_path / "run" / "eval-test.json").read_text())
    assert saved["per_language"] == result.test.to_dict()["per_language"]  # the reloaded model scores the same


# ----------------------------------------------------------------------------------------- decoder, TyDiQA
def test_decoder_generative_qa_pipeline_with_translation_files(tmp_path):
    """Llama in 4-bit: stage 1 on the SQuAD copy, stage 2 on a translate-train file, test on the TyDiQA copy with a
    translate-test file; answers generated with the English stream decoding in lockstep."""
    model = make_checkpoint(tmp_path / "llama", "llama", "causal_lm")
    squad = read_rows(str(HUB / "rajpurkar__squad" / "plain_text" / "train-00000-of-00001.parquet"), "qa", lang="en")
    # translate-train output: target rows with the English originals as source (as flare translate writes them)
    train_rows = [
        dict(
            r,
            id=f"sw-{r['id']}",
            lang="sw",
            source_question=r["question"],
            source_context=r["context"],
            source_answers=r["answers"],
        )
        for r in squad * 2
    ]
    for i, r in enumerate(train_rows):
        r["id"] = f"sw-{i}"
    write_jsonl(tmp_path / "train-sw.jsonl", train_rows)
    write_jsonl(
        tmp_path / "test-sw-en.jsonl",
        [
            {
                "id": "swahili-404-1",
                "source_question": "What is the largest lake in Africa?",
                "source_context": "Lake Victoria is the largest lake in Africa.",
            },
            {
                "id": "swahili-404-2",
                "source_question": "Which is the largest city of Tanzania?",
                "source_context": "Dar es Salaam is the largest city of Tanzania.",
            },
        ],
    )
    cfg = TrainConfig(
        task="tydiqa",
        model=str(model),
        languages=("sw",),
        dataset_path=str(HUB / "google-research-datasets__tydiqa"),
        english_path=str(HUB / "rajpurkar__squad"),
        train_file=str(tmp_path / "train-sw.jsonl"),
        test_translations=str(tmp_path / "test-sw-en.jsonl"),
        batch_size=2,
        epochs=1,
        learning_rate=1e-3,
        max_length=96,
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    result = train(cfg)
    assert len(result.loss_curve("stage1")) == 1 and len(result.loss_curve("stage2")) == 2
    scores = result.test.per_language["sw"]
    assert scores["n"] == 2 and 0.0 <= scores["exact_match"] <= scores["f1"] <= 100.0
    assert result.stages["stage2"].best_step is None  # TyDiQA: no selection set unless --eval-file is given

    # the generation path itself: strings out, one per row, with and without the English stream
    task = get_task("tydiqa")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    rows = [
        dict(r, source_question=r["question"], source_context=r["context"])
        for r in read_rows(
            str(HUB / "google-research-datasets__tydiqa" / "secondary_task" / "validation-00000-of-00001.parquet"),
            "qa",
            lang="xx",
        )
    ]
    for use_source in (True, False):
        answers = predict(
            result.model,
            task,
            tok,
            "decoder",
            rows,
            max_length=96,
            batch_size=3,
            use_source=use_source,
            device=torch.device("cpu"),
        )
        assert len(answers) == len(rows) and all(isinstance(a, str) for a in answers)


def test_missing_test_translation_is_an_error_naming_the_rows(tmp_path):
    from flare.data import MissingSourceError

    cfg = TrainConfig(
        task="xnli",
        model=str(tmp_path / "unused"),
        languages=("sw",),
        dataset_path=str(HUB / "facebook__xnli"),
        stages=("stage2",),
        output_dir=str(tmp_path / "run"),
    )
    with pytest.raises(MissingSourceError, match="validation: 3 of 3 rows have no English translation"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_encoder_extractive_qa_evaluation_path(tmp_path):
    import flare

    model_dir = make_checkpoint(tmp_path / "xlmr-qa", "xlm-roberta", "question_answering")
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = flare.get_flare_model(
        AutoModelForQuestionAnswering.from_pretrained(str(model_dir)),
        flare.FlareConfig(modules_to_save=("qa_outputs",)),
    )
    rows = {
        lang: [
            dict(r, source_question=r["question"], source_context=r["context"])
            for r in read_rows(
                str(HUB / "rajpurkar__squad" / "plain_text" / f"{split}-00000-of-00001.parquet"), "qa", lang=lang
            )
        ]
        for lang, split in (("en", "train"), ("xx", "validation"))
    }
    result = evaluate(
        model,
        get_task("tydiqa"),
        tok,
        "encoder",
        rows,
        split="test",
        max_length=64,
        batch_size=2,
        use_source=True,
        device=torch.device("cpu"),
    )
    assert set(result.per_language) == {"en", "xx"} and result.per_language["en"]["n"] == 2
    spans = predict(
        model,
        get_task("tydiqa"),
        tok,
        "encoder",
        rows["en"],
        max_length=64,
        batch_size=2,
        use_source=True,
        device=torch.device("cpu"),
    )
    assert all(s in r["context"] for s, r in zip(spans, rows["en"]))  # extractive: spans of the passage
