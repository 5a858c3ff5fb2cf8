"""The authors' decoder scoring (greedy generation, exact string match) and alignment (each stream left-padded
on its own, target = prompt + answer + EOS, source = prompt alone, cut from the left), beside ours."""

from __future__ import annotations

import json

import pytest
import torch

from flare.default.build import build_tokenizer
from flare.evaluate import decode_answer, parse_label, predict, score
from flare.metrics import classification_scores
from flare.tasks import encode_decoder, get_task
from flare.train import TrainConfig, train
from flare.train.batching import IGNORE, collate, prepare

TOY = get_task("toy")  # label words negative, neutral, positive


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


ROWS = [
    {"id": "a", "lang": "qaa", "text": "dofubi gero", "label": 2, "source_text": "the food is really perfect"},
    {"id": "b", "lang": "qaa", "text": "vani luromu goso linu viko nivafe", "label": 0, "source_text": "bad"},
]


# ------------------------------------------------------------------------------------- scoring
def test_authors_scoring_is_an_exact_string_match_and_unparseable_outputs_count_wrong(tok):
    words = {w: tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in TOY.label_words}
    eos = tok.eos_token_id
    # cut at the first EOS, decoded, stripped: what the authors compared with the label word
    assert decode_answer(tok, [words["positive"], eos, words["negative"]], first_line=False) == "positive"
    assert decode_answer(tok, [words["positive"], words["neutral"], eos], first_line=False) == "positive neutral"
    assert decode_answer(tok, [eos], first_line=False) == ""
    outputs = ["positive", "  neutral\n", "positive neutral", "", "Positive", "positive."]
    preds = [parse_label(TOY, t) for t in outputs]
    assert preds == [2, 1, -1, -1, -1, -1]
    labels = [2, 1, 2, 0, 2, 2]  # the last four would be right by a lenient parse; the authors count them wrong
    assert classification_scores(preds, labels, 3)["accuracy"] == pytest.approx(100 * 2 / 6)
    # QA: the decoded string is the answer, scored by exact match (SQuAD normalization) as ours
    qa = get_task("tydiqa")
    gold = [{"answers": {"text": ["the Mediterranean Sea"]}}, {"answers": {"text": ["Nairobi"]}}]
    assert score(qa, gold, ["Mediterranean Sea", "Nairobi, Kenya"])["exact_match"] == 50.0


def test_authors_scoring_reads_generations_and_the_table_says_so(tmp_path):
    from flare.default.build import save_tiny_llama
    from flare.evaluate import evaluate
    from flare.train.modeling import flare_api, load_base_model, load_tokenizer

    path = save_tiny_llama(tmp_path / "base", build_tokenizer(), seed=0)
    tokenizer = load_tokenizer(str(path), "decoder")
    _, get_flare_model, _ = flare_api()
    # dense (quantize=False): 100 greedy steps of both streams take ~4x less time than over NF4 on a CPU
    model = get_flare_model(load_base_model(str(path), TOY, "decoder", quantize=False, device=torch.device("cpu")))
    common = dict(split="test", max_length=64, batch_size=8, use_source=True, device=torch.device("cpu"))
    authors = evaluate(model, TOY, tokenizer, "decoder", {"qaa": ROWS}, scoring="authors", alignment="authors", **common)
    # an untrained model rambles: its 100-token outputs match no label word and count as wrong
    assert authors.per_language["qaa"]["accuracy"] == 0.0
    assert "scoring authors: greedy generation of up to 100 tokens" in authors.table().splitlines()[0]
    ours = evaluate(model, TOY, tokenizer, "decoder", {"qaa": ROWS}, **common)
    assert "scoring ours: next-token logits" in ours.table().splitlines()[0]
    ours_preds = predict(model, TOY, tokenizer, "decoder", ROWS, **{k: v for k, v in common.items() if k != "split"})
    assert set(ours_preds) <= {0, 1, 2}  # ours always picks a label word


# ------------------------------------------------------------------------------------- alignment
def test_authors_alignment_layout(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    examples = prepare(ROWS, TOY, tok, "decoder", 64, with_source=True, with_answer=True, alignment="authors")
    batch = collate(examples, "decoder", TOY, pad, with_answer=True)
    ids, mask, src, src_mask = (batch[k].tolist() for k in ("input_ids", "attention_mask", "source_input_ids",
                                                            "source_attention_mask"))  # fmt: skip
    width = len(ids[0])
    assert len(src[0]) == width  # both streams padded to one width, so position i fuses with position i
    for i, row in enumerate(ROWS):
        full = encode_decoder(TOY, tok, row, "target", 64, with_answer=True)
        english = encode_decoder(TOY, tok, row, "source", 64, with_answer=False)
        target = full.prompt + full.answer + [eos]  # prompt + answer + EOS
        assert ids[i] == [pad] * (width - len(target)) + target  # left-padded on its own
        assert src[i] == [pad] * (width - len(english.prompt)) + english.prompt  # the prompt alone, no answer
        assert mask[i] == [0] * (width - len(target)) + [1] * len(target)
        assert src_mask[i] == [0] * (width - len(english.prompt)) + [1] * len(english.prompt)
        assert batch["labels"][i].tolist() == [IGNORE] * (width - len(full.answer) - 1) + full.answer + [eos]
    assert batch["answer_len"] == 2  # one label-word token + EOS
    # ours instead: the source carries its English answer, the prompts end at one column
    ours = collate(prepare(ROWS, TOY, tok, "decoder", 64, with_source=True, with_answer=True), "decoder", TOY, pad,
                   with_answer=True)  # fmt: skip
    assert ours["source_input_ids"][0, -1].item() == ours["input_ids"][0, -1].item() != eos

    # left truncation: the sequence loses its first tokens (BOS included), the answer and EOS stay
    short = prepare(ROWS[1:], TOY, tok, "decoder", 8, with_source=True, with_answer=True, alignment="authors")[0]
    full = encode_decoder(TOY, tok, ROWS[1], "target", 64, with_answer=True)
    assert short.target.prompt + short.target.answer == (full.prompt + full.answer + [eos])[-8:]
    assert short.target.prompt[0] != tok.bos_token_id
    assert len(short.source.prompt) == len(encode_decoder(TOY, tok, ROWS[1], "source", 64, with_answer=False).prompt)
    with pytest.raises(ValueError, match="its answer alone takes 2 of max_length=2 tokens"):
        prepare(ROWS[:1], TOY, tok, "decoder", 2, with_source=False, with_answer=True, alignment="authors")


def test_toy_run_with_the_authors_scoring_and_alignment(tmp_path):
    cfg = TrainConfig.builtin(output_dir=str(tmp_path / "run"), decoder_eval="authors", decoder_alignment="authors",
                              max_train_examples=16, max_eval_examples=4, batch_size=8, epochs=1, stage1_epochs=1,
                              progress=False)  # fmt: skip
    result = train(cfg)
    assert [len(s.history) for s in result.stages.values()] == [2, 2]
    assert all(torch.isfinite(torch.tensor(result.loss_curve(s))).all() for s in ("stage1", "stage2"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test"]["scoring"].startswith("authors:")
    assert set(saved["test"]["per_language"]) == {"qaa", "qab"}
