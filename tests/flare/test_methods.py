"""The paper's baselines and evaluation modes (--method, --eval-mode) and stage-1 reuse (--stage1-from).

Row transforms and the resolution of modes are tested without a model; the end-to-end tests share one
stage 1 (module scope), trained once with the zero-shot evaluation, that every other run reuses."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flare.cli import EXIT_BAD_INPUT, main
from flare.default.build import build_tokenizer
from flare.default.sample import load_sample
from flare.tasks import encode_encoder, get_task
from flare.train import TrainConfig, TrainingStopped, train
from flare.train.batching import collate, prepare
from flare.train.methods import (
    SEPARATOR,
    concatenated,
    english_only,
    eval_inputs,
    resolve_eval_mode,
    stage2_inputs,
    target_only,
)

TOY, TYDIQA = get_task("toy"), get_task("tydiqa")
PAIR = dict(id="p", lang="sw", text="t1 words", text_pair="t2", label=1, source_text="e1", source_text_pair="e2 more")
QA = dict(
    id="q",
    lang="sw",
    question="swali gani",
    context="mji mkuu ni Nairobi kweli",
    answers={"text": ["Nairobi"], "answer_start": [12]},
    source_question="which question",
    source_context="the capital is Nairobi indeed",
    source_answers={"text": ["Nairobi"], "answer_start": [15]},
)


# ------------------------------------------------------------------------------------- modes and row transforms
def test_auto_resolves_to_each_methods_own_mode():
    assert resolve_eval_mode("flare", "auto") == "fused"
    assert resolve_eval_mode("flare", "auto", "none") == "target"  # --eval-source none: plain LoRA inference, as before
    assert resolve_eval_mode("lora", "auto") == "target"
    assert resolve_eval_mode("input-fusion", "auto") == "fused"
    assert resolve_eval_mode("flare-mt", "auto") == "fused"
    assert resolve_eval_mode("flare", "zero-shot") == "zero-shot"


def test_input_fusion_concatenates_target_then_english_per_field():
    row = concatenated(PAIR, get_task("xnli"))
    assert row["text"] == "t1 words" + SEPARATOR + "e1" and row["text_pair"] == "t2" + SEPARATOR + "e2 more"
    assert not any(k.startswith("source_") for k in row) and row["label"] == 1
    single = concatenated(dict(PAIR, text_pair=None, source_text_pair=None), TOY)
    assert single["text"] == "t1 words" + SEPARATOR + "e1" and single["text_pair"] is None
    qa = concatenated(QA, TYDIQA)
    assert qa["question"] == "swali gani" + SEPARATOR + "which question"
    # the target context comes first: the answer offsets still point at the answer, and spans stop at its end
    start = qa["answers"]["answer_start"][0]
    assert qa["context"][start : start + len("Nairobi")] == "Nairobi"
    assert qa["answer_context_chars"] == len(QA["context"])
    with pytest.raises(ValueError, match="input-fusion: row 'p' has no source_text"):
        concatenated(dict(PAIR, source_text=None), TOY)


def test_translate_test_reads_the_english_and_target_modes_drop_it():
    row = english_only(PAIR, get_task("xnli"))
    assert (row["text"], row["text_pair"]) == ("e1", "e2 more") and "source_text" not in row and row["label"] == 1
    qa = english_only(QA, TYDIQA)
    assert qa["context"] == QA["source_context"] and qa["answers"] == QA["answers"]  # gold stays the row's own
    assert target_only(PAIR, TOY) == {k: v for k, v in PAIR.items() if not k.startswith("source_")}
    with pytest.raises(ValueError, match="translate-test: row 'p' has no source_text"):
        english_only(dict(PAIR, source_text=None), TOY)


def test_input_fusion_doubles_the_length_and_the_baselines_run_no_source_stream():
    tok = build_tokenizer()
    rows = load_sample("test")[:4]
    fusion = stage2_inputs("input-fusion", 16)
    assert fusion.max_length == 32 and not fusion.use_source
    short = prepare(rows, TOY, tok, "decoder", 16, with_source=False, with_answer=True)
    fused = prepare(fusion.rows(rows, TOY), TOY, tok, "decoder", fusion.max_length, with_source=False, with_answer=True)
    for plain, both, row in zip(short, fused, rows):
        english = tok(" " + row["source_text"], add_special_tokens=False)["input_ids"]
        assert both.source is None and 16 < len(both.target.prompt) <= 32
        assert len(both.target.prompt) > len(plain.target.prompt)
        assert english[-3:] == both.target.prompt[-3 - 2 : -2]  # the English ends the text, before "Sentiment:"
    for inputs in (stage2_inputs("lora", 16), eval_inputs("lora", "target", 16), eval_inputs("flare", "zero-shot", 16)):
        examples = prepare(inputs.rows(rows, TOY), TOY, tok, "decoder", 16, with_source=inputs.use_source,
                           with_answer=True)  # fmt: skip
        batch = collate(examples, "decoder", TOY, tok.pad_token_id, with_answer=True)
        assert not inputs.use_source and "source_input_ids" not in batch
    assert stage2_inputs("flare", 16).use_source and eval_inputs("flare", "fused", 16).use_source


def test_encoder_qa_spans_stay_on_the_target_context_under_input_fusion():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {w for t in (QA["question"], QA["context"], QA["source_question"], QA["source_context"]) for w in t.split()}
    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    plain = encode_encoder(TYDIQA, tok, QA, "target", 32, with_answer=True)
    fused = encode_encoder(TYDIQA, tok, concatenated(QA, TYDIQA), "target", 32, with_answer=True)
    assert tok.convert_ids_to_tokens(fused.prompt[fused.start : fused.end + 1]) == ["Nairobi"]
    assert fused.start == plain.start + 2  # the question grew by its two English words
    english = [i for i, t in enumerate(tok.convert_ids_to_tokens(fused.prompt)) if t == "indeed"]
    assert english and all(fused.offsets[i] is None for i in english)  # no answer can come from the English


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(eval_mode="zero-shot"), "--eval-mode zero-shot scores the stage-1 model: pass --stages stage1"),
        (dict(eval_mode="translate-test", stages=("stage2",)), "pass --stages stage1"),
        (dict(eval_mode="fused", stages=("stage1",)), "--eval-mode fused scores the stage-2 adapter"),
        (dict(method="lora", eval_mode="fused"), "--method lora trains without English"),
        (dict(method="input-fusion", eval_source="none"), "auto (= fused for input-fusion) reads the English"),
        (dict(eval_mode="translate-test", stages=("stage1",), eval_source="none"), "--eval-source none drops it"),
        (dict(stage1_from="elsewhere", stages=("stage2",)), "--stages must include stage1"),
    ],
    ids=["zero-shot-stage2", "translate-test-stage2", "fused-stage1", "lora-fused", "fusion-no-english",
         "translate-test-no-english", "reuse-without-stage1"],  # fmt: skip
)
def test_bad_combinations_are_refused_in_one_line(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.builtin(**values)


# ------------------------------------------------------------------------------------- end to end, one stage 1
# Stage 1 on 192 English rows for 6 epochs at batch 16 (72 steps): enough to learn English sentiment (translate-test
# measured 93.8 macro-F1 on 16 rows per language) and not the toy languages (zero-shot 41.1). It is trained once,
# by the "whole" run; every other run reuses it.
STAGE1 = dict(stage1_epochs=6, batch_size=16, max_train_examples=192, max_eval_examples=16, progress=False)
# Stage 2: half an epoch (6 steps). max_train_examples caps both stages' rows, so stage-1 reuse compares it.
STAGE2 = dict(epochs=0.5)


def cfg(path, **values):
    return TrainConfig.builtin(output_dir=str(path), **{**STAGE1, **values})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of translate-train LoRA. "whole": stage 1 trained in the run, on toy rows stripped of their English
    (LoRA needs none, in training or at test). "lora": on the toy rows with English, reusing whole's stage 1,
    stopped in stage 2 and resumed."""
    # conftest's one-thread fixture is function-scoped, so it is not yet active here: the same reason (a second
    # OpenMP thread made this fixture 5x slower on the shared 2-core machine: 105 s against 22 s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _runs(tmp_path_factory.mktemp("methods"))
    finally:
        torch.set_num_threads(threads)


def _runs(root):
    files = {}
    for split in ("train", "validation", "test"):
        files[split] = root / f"{split}.jsonl"
        rows = [{k: v for k, v in r.items() if not k.startswith("source_")} for r in load_sample(split)]
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole = train(
        cfg(root / "whole", method="lora", train_file=str(files["train"]), eval_file=str(files["validation"]),
            test_file=str(files["test"]), **STAGE2)
    )  # fmt: skip
    lora = cfg(root / "lora", method="lora", stage1_from=str(whole.output_dir), **STAGE2)
    with pytest.raises(TrainingStopped):
        train(lora, stop_after_steps=1)
    return dict(root=root, whole=whole, lora=train(lora, resume=True))


def results(run):
    return json.loads((run.output_dir / "results.json").read_text())


def trainable(run):
    return load_file(str(run.output_dir / "stage2" / "adapter" / "trainable.safetensors"))


def test_lora_reusing_stage1_equals_training_it_and_is_plain_lora(runs, tmp_path):
    """Reusing stage 1 (stopped and resumed in stage 2) gives what training it in the run gave, bit for bit; and
    --method lora is a FLARE run with fusion none, bit for bit (whose source stream, fused with nothing, changes
    nothing)."""
    lora, whole = runs["lora"], runs["whole"]
    assert lora.stages["stage1"].from_earlier_run and not whole.stages["stage1"].from_earlier_run
    assert not (lora.output_dir / "stage1").exists()
    assert "reused from --stage1-from" in (lora.output_dir / "train.log").read_text()
    summary = results(lora)
    assert (summary["method"], summary["eval_mode"]) == ("lora", "target")
    assert summary["stage1_from"] == str(whole.output_dir)
    assert lora.test.eval_mode == "target" and "method lora, eval mode target" in lora.test.table()
    a, b = trainable(lora), trainable(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lora.test.per_language == whole.test.per_language
    saved = json.loads((lora.output_dir / "stage2" / "adapter" / "flare_config.json").read_text())
    assert saved["flare_config"]["fusion"] == "none" and saved["fusion_targets"] == []  # plain LoRA everywhere

    plain = train(cfg(tmp_path / "none", fusion="none", stage1_from=str(whole.output_dir), **STAGE2))
    c = trainable(plain)
    assert all(torch.equal(a[k], c[k]) for k in a) and plain.test.per_language == lora.test.per_language
    assert plain.test.eval_mode == "fused"  # its test ran the source stream: nothing to fuse it with
    assert main(["eval", "--run-dir", str(plain.output_dir), "--eval-mode", "target"]) == 0  # rescored without it
    rescored = json.loads((plain.output_dir / "eval-test-target.json").read_text())
    assert rescored["per_language"] == plain.test.per_language


def test_zero_shot_and_translate_test_score_the_stage1_model(runs, tmp_path, capsys):
    s1 = str(runs["whole"].output_dir)
    # reusing a stage 1, the run only evaluates: the target text, or the English in its place
    zs = train(cfg(tmp_path / "zs", stages=("stage1",), eval_mode="zero-shot", stage1_from=s1))
    tt = train(cfg(tmp_path / "tt", stages=("stage1",), eval_mode="translate-test", stage1_from=s1))
    for run, mode in ((zs, "zero-shot"), (tt, "translate-test")):
        assert run.stages["stage1"].from_earlier_run and run.adapter == runs["whole"].output_dir / "stage1" / "adapter"
        assert (results(run)["eval_mode"], results(run)["test"]["eval_mode"]) == (mode, mode)
    # stage 1 learned English sentiment, not the toy languages (measured 93.8 vs 41.1)
    assert tt.test.average["macro_f1"] > zs.test.average["macro_f1"] + 25, (tt.test.average, zs.test.average)
    # flare eval scores a finished run's (here: reused) stage 1 the same way
    lora_dir = runs["lora"].output_dir
    assert main(["eval", "--run-dir", str(lora_dir), "--eval-mode", "zero-shot"]) == 0
    scored = json.loads((lora_dir / "eval-test-zero-shot.json").read_text())
    assert scored["per_language"] == zs.test.per_language and scored["eval_mode"] == "zero-shot"
    capsys.readouterr()
    for run, mode, message in (
        (lora_dir, "fused", "--method lora trains without English"),
        (zs.output_dir, "target", "trained stage 1 only: score it with --eval-mode zero-shot"),
    ):
        assert main(["eval", "--run-dir", str(run), "--eval-mode", mode]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_a_stage1_run_trains_then_writes_its_zero_shot_table(tmp_path):
    """Without --stage1-from the stage-1 run trains (2 steps here), then scores; flare eval reads the same table."""
    run = train(cfg(tmp_path / "s1", stages=("stage1",), eval_mode="zero-shot", stage1_epochs=1, max_train_examples=32))
    assert run.stages["stage1"].steps == 2 and not run.stages["stage1"].from_earlier_run
    assert run.adapter == run.output_dir / "stage1" / "adapter" and run.test.per_language["qaa"]["n"] == 16
    assert results(run)["test"]["per_language"] == run.test.per_language
    assert main(["eval", "--run-dir", str(run.output_dir)]) == 0  # the run's own mode: zero-shot
    assert json.loads((run.output_dir / "eval-test.json").read_text())["per_language"] == run.test.per_language


def test_input_fusion_trains_and_flare_eval_reproduces_its_table(runs, tmp_path):
    run = train(cfg(tmp_path / "fusion", method="input-fusion", stage1_from=str(runs["whole"].output_dir), **STAGE2))
    assert (run.test.method, run.test.eval_mode) == ("input-fusion", "fused")
    assert main(["eval", "--run-dir", str(run.output_dir)]) == 0
    assert json.loads((run.output_dir / "eval-test.json").read_text())["per_language"] == run.test.per_language


def test_stage1_from_refuses_other_settings_and_unfinished_runs(runs, tmp_path, capsys):
    s1 = str(runs["whole"].output_dir)
    for values, message in (
        (dict(r=4), "other settings (r: 4 here, 8 there)"),
        (dict(seed=1), "seed: 1 here, 42 there"),
        (dict(stage1_learning_rate=1e-3), "stage1 learning rate: 0.001 here, 0.005 there"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            train(cfg(tmp_path / "other", stage1_from=s1, **STAGE2, **values))
        assert not (tmp_path / "other").exists()  # refused before anything was written
    with pytest.raises(TrainingStopped):
        train(cfg(tmp_path / "half", stages=("stage1",), stop_after_steps=1))
    with pytest.raises(ValueError, match="its stage 1 is unfinished"):
        train(cfg(tmp_path / "other", stage1_from=str(tmp_path / "half"), **STAGE2))
    capsys.readouterr()
    argv = ["train", "--output-dir", str(tmp_path / "cli"), "--stage1-from", s1, "--r", "4", "--no-progress"]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the line before it: "built-in default ..."
    assert err.startswith("flare train: error: --stage1-from") and "r: 4 here, 8 there" in err
    assert main(["train", "--output-dir", str(tmp_path / "cli"), "--eval-mode", "zero-shot"]) == EXIT_BAD_INPUT
    assert "pass --stages stage1" in capsys.readouterr().err and not (tmp_path / "cli").exists()


def test_the_summary_line_says_a_reused_stage_1_came_from_the_other_run():
    from flare.cli import stage_summary
    from flare.train.loop import StageResult

    history = [{"step": 1, "loss": 2.0}, {"step": 72, "loss": 0.5}]
    stage = StageResult(72, history, [], None, None, 0.0, 0.0, 0.0, from_earlier_run=True)
    line = stage_summary("stage1", stage, reused_from="/runs/a")
    assert line == "stage1: 72 steps, reused from --stage1-from /runs/a (loss 2.0000 -> 0.5000)"
    assert "finished by an earlier run" in stage_summary("stage1", stage)
