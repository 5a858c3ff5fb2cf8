"""FLARE MT (``--method flare-mt``): NLLB encoder states of the target text, mapped, as every fusion's source.

Tiny local models only: the built-in word-level tokenizer + tiny Llama (4-bit) and the built-in tiny
NLLB (a real NllbTokenizer over a local BPE, an M2M100 model), as ``flare train`` builds them.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flare
from flare.default.build import build_tokenizer, load_4bit, save_tiny_llama, save_tiny_nllb
from flare.default.sample import load_sample
from flare.modeling.mt_align import overlap_pairs, strip_span
from flare.modeling.mt_fusion import flare_lora_source_grad
from flare.modeling.mt_source import load_mt_source
from flare.modeling.projection import FlareProjectionDense
from flare.tasks import get_task
from flare.testing import random_lora_
from flare.train.batching import collate, prepare
from flare.train.mt import MTFeaturizer, check_mt_config

TASK = get_task("toy")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("flare-mt")
    tokenizer = build_tokenizer()
    return save_tiny_llama(root / "llama", tokenizer), save_tiny_nllb(root / "nllb"), tokenizer


def mt_model(paths, *, seed: int = 0):
    """The tiny 4-bit Llama, FLARE adapters randomized (B != 0: the fusion must be visible), an MT source."""
    llama, nllb, _ = paths
    model = flare.get_flare_model(load_4bit(llama), flare.FlareConfig())
    random_lora_(model, scale=0.3, seed=seed)
    torch.manual_seed(seed)
    model.attach_mt_source(load_mt_source(str(nllb), 64))
    return model


def mt_batch_of(model, tokenizer, rows, *, with_answer=True):
    feat = MTFeaturizer(model.mt_source, TASK, tokenizer, "decoder", 64)
    examples = prepare(rows, TASK, tokenizer, "decoder", 64, with_source=False, with_answer=with_answer, mt=feat)
    return collate(examples, "decoder", TASK, tokenizer.pad_token_id, with_answer=with_answer), examples


def inputs_of(batch):
    keys = ("input_ids", "attention_mask", "mt_input_ids", "mt_attention_mask", "mt_alignment")
    return {k: batch[k] for k in keys}


@pytest.fixture(scope="module")
def rows():
    test = load_sample("test")
    # rows of both languages and different lengths (left padding differs per row)
    return sorted(test[:6], key=lambda r: len(r["text"]))[::2] + [r for r in test if r["lang"] == "qab"][:1]


# ------------------------------------------------------------------------------------- alignment
def test_overlap_pairs_multi_token_words_on_either_side():
    text = "abc defgh ij"
    # LLM: "abc" one token, "defgh" two; NLLB (SentencePiece, "▁" spans include the space): "abc" two, "defgh" one
    llm = [strip_span(s, text) for s in [(0, 3), (3, 6), (6, 9), (9, 12)]]
    nllb = [None] + [strip_span(s, text) for s in [(0, 1), (1, 3), (3, 9), (9, 12)]] + [None]  # code, ..., </s>
    assert llm[1] == (4, 6) and nllb[3] == (4, 9)  # leading whitespace is not part of a token's span
    assert overlap_pairs(llm, nllb) == [(0, 1), (0, 2), (1, 3), (2, 3), (3, 4)]
    assert overlap_pairs([None, (0, 3)], nllb) == [(1, 1), (1, 2)]  # a span-less token (BOS) reads nothing


def test_decoder_alignment_reads_the_words_template_and_answer_read_zero(paths, rows):
    _, _, tokenizer = paths
    model = mt_model(paths)
    batch, examples = mt_batch_of(model, tokenizer, rows)
    align, ids, mask = batch["mt_alignment"], batch["input_ids"], batch["attention_mask"]
    nllb = model.mt_source.tokenizer
    assert len({int(m.sum()) for m in mask}) > 1  # rows padded by different amounts
    width = batch["mt_input_ids"].shape[-1]
    head = len(tokenizer("Text:", add_special_tokens=False)["input_ids"])
    for b, (row, ex) in enumerate(zip(rows, examples)):
        start = int(mask[b].argmax())
        words = row["text"].split()
        field = list(range(start + 1 + head, start + 1 + head + len(words)))
        # [pad] <s> Text: w1 .. wn \n Sentiment: [answer]: only the n word positions read NLLB states
        reads = [i for i in range(ids.shape[1]) if align[b, i].sum() > 0]
        assert reads == field, (reads, field)
        assert torch.allclose(align[b, field].sum(-1), torch.ones(len(field)))  # a mean
        for i, word in zip(field, words):  # each LLM word averages exactly the NLLB pieces of that word
            cols = (align[b, i] > 0).nonzero().flatten().tolist()
            assert {c // width for c in cols} == {0}  # field "text"
            pieces = nllb.convert_ids_to_tokens(batch["mt_input_ids"][b, 0, [c % width for c in cols]].tolist())
            assert "".join(pieces).lstrip("▁") == word
        # the alignment follows the row's own left padding: alone (no padding), the same columns shifted
        alone, _ = mt_batch_of(model, tokenizer, [row])
        alone_reads = [i for i in range(alone["input_ids"].shape[1]) if alone["mt_alignment"][0, i].sum() > 0]
        assert [i - start for i in reads] == alone_reads


def test_the_nllb_code_is_the_target_languages_never_english(paths, rows):
    _, _, tokenizer = paths
    model = mt_model(paths)
    batch, examples = mt_batch_of(model, tokenizer, rows)
    nllb = model.mt_source.tokenizer
    eng = nllb.convert_tokens_to_ids("eng_Latn")
    for b, (row, ex) in enumerate(zip(rows, examples)):
        code = {"qaa": "qaa_Latn", "qab": "qab_Latn"}[row["lang"]]
        assert ex.mt.language_code == code
        assert batch["mt_input_ids"][b, 0, 0] == nllb.convert_tokens_to_ids(code) != eng
    feat = MTFeaturizer(model.mt_source, TASK, tokenizer, "decoder", 64)
    assert feat.language_code("sw") == "swh_Latn"  # a real language: NLLB-200's code
    with pytest.raises(ValueError, match="no NLLB-200 code known for language 'xx'"):
        feat.row({**rows[0], "lang": "xx"})


def test_encoder_alignment_is_right_padded_and_skips_special_tokens(paths, rows):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for r in rows for w in r["text"].split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    encoder_tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]",
                                          sep_token="[SEP]", unk_token="[UNK]")  # fmt: skip
    model = mt_model(paths)
    feat = MTFeaturizer(model.mt_source, TASK, encoder_tok, "encoder", 64)
    examples = prepare(rows, TASK, encoder_tok, "encoder", 64, with_source=False, with_answer=False, mt=feat)
    batch = collate(examples, "encoder", TASK, encoder_tok.pad_token_id, with_answer=False)
    for b, row in enumerate(rows):
        n = len(row["text"].split())
        reads = [i for i in range(batch["input_ids"].shape[1]) if batch["mt_alignment"][b, i].sum() > 0]
        assert reads == list(range(1, n + 1))  # [CLS] w1 .. wn [SEP] [PAD]...: the words, from column 1


# ------------------------------------------------------------------------------------- the forward
def _q_proj_io(model, inputs):
    """(input, output) of the first block's q_proj in one forward."""
    seen = {}
    q = model.fusion_projections()["model.layers.0.self_attn.q_proj"]
    handle = q.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return q, seen["x"], seen["y"]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad-kernels", "grad-autograd"])
def test_a_fused_projection_equals_the_explicit_formula(paths, rows, grad):
    _, _, tokenizer = paths
    model = mt_model(paths)
    batch, _ = mt_batch_of(model, tokenizer, rows)
    inputs = inputs_of(batch)
    with torch.set_grad_enabled(grad):
        q, x_t, y = _q_proj_io(model, inputs)
    with torch.no_grad():
        x_s = model.mt_source(batch["mt_input_ids"], batch["mt_attention_mask"], batch["mt_alignment"])
        a, b = q.lora_A.weight, q.lora_B.weight
        expected = q.base_forward(x_t) + q.scaling * (F.relu(x_s @ a.T) + F.relu(x_t @ a.T)) @ b.T
        plain = q.base_forward(x_t) + q.scaling * (x_t @ a.T) @ b.T
    torch.testing.assert_close(y.detach(), expected, rtol=1e-4, atol=1e-5)
    reads = batch["mt_alignment"].sum(-1) > 0
    assert (x_s[~reads] == 0).all() and (x_s[reads].abs().sum(-1) > 0).all()
    assert not torch.allclose(y.detach()[reads], plain[reads], atol=1e-3)  # the source changes the output


def test_the_english_source_pass_never_runs(paths, rows):
    _, _, tokenizer = paths
    model = mt_model(paths)
    batch, _ = mt_batch_of(model, tokenizer, rows)
    embed = model.base_model.model.embed_tokens
    calls = []
    handle = embed.register_forward_hook(lambda m, a, out: calls.append(tuple(a[0].shape)))
    try:
        model.train()
        model(**inputs_of(batch), labels=batch["labels"]).loss.backward()
        model.eval()
        with torch.no_grad():
            model(**inputs_of(batch))
    finally:
        handle.remove()
    assert calls == [tuple(batch["input_ids"].shape)] * 2  # one LLM pass over the target rows only, each time
    with pytest.raises(ValueError, match="reads no English source stream"):
        model(**inputs_of(batch), source_input_ids=batch["input_ids"])


# ------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("fusion,heads", [("add_relu", 1), ("mul", 1), ("cross_attention", 2)])
def test_source_gradient_matches_float64_finite_differences_and_the_formula(fusion, heads):
    torch.manual_seed(0)
    linear = nn.Linear(8, 6, dtype=torch.float64)
    layer = FlareProjectionDense(linear, r=4, fusion=fusion, cross_attention_heads=heads, adapter_dtype=torch.float64)
    with torch.no_grad():  # B != 0, or the fusion (and A's gradient) would be invisible
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.7)
    mapping = nn.Linear(5, 8, dtype=torch.float64)
    e = torch.randn(2, 3, 5, dtype=torch.float64)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)

    def through_map(weight, bias, x):
        return flare_lora_source_grad(layer, x, F.linear(e, weight, bias))

    w = mapping.weight.detach().clone().requires_grad_(True)
    c = mapping.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(through_map, (w, c, x))
    # and the same gradients as autograd of the formula written out (add_relu), A and B included
    if fusion == "add_relu":
        y = through_map(w, c, x)
        g = torch.randn_like(y)
        grads = torch.autograd.grad((y * g).sum(), (w, layer.lora_A.weight, layer.lora_B.weight))
        a, b = layer.lora_A.weight, layer.lora_B.weight
        x_s = F.linear(e, w, c)
        y_ref = linear(x) + layer.scaling * (F.relu(x_s @ a.T) + F.relu(x @ a.T)) @ b.T
        ref = torch.autograd.grad((y_ref * g).sum(), (w, a, b))
        for got, want in zip(grads, ref):
            torch.testing.assert_close(got, want)


def test_training_gradient_reaches_the_map_and_lora_A(paths, rows):
    _, _, tokenizer = paths
    model = mt_model(paths)
    batch, _ = mt_batch_of(model, tokenizer, rows)
    model.train()
    model(**inputs_of(batch), labels=batch["labels"]).loss.backward()
    q = model.fusion_projections()["model.layers.1.self_attn.v_proj"]
    assert model.mt_source.map.weight.grad.abs().sum() > 0 and model.mt_source.map.bias.grad.abs().sum() > 0
    assert q.lora_A.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.mt_source.encoder.parameters())  # the NLLB encoder stays frozen
    names = {n for n, _ in model.named_trainable_parameters()}
    assert {"mt_source.map.weight", "mt_source.map.bias"} <= names
    assert not any(n.startswith("mt_source.encoder") for n in names)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(paths, rows):
    # The authors' defect 1: their checkpointed path dropped the source. Here the recomputed blocks
    # re-enter the MT source's context, so the map and the adapters get the same gradients.
    _, _, tokenizer = paths
    grads = []
    for checkpointing in (False, True):
        model = mt_model(paths)
        if checkpointing:
            model.gradient_checkpointing_enable()
        batch, _ = mt_batch_of(model, tokenizer, rows)
        model.train()
        loss = model(**inputs_of(batch), labels=batch["labels"]).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_trainable_parameters()}))
    (loss_a, a), (loss_b, b) = grads
    torch.testing.assert_close(loss_a, loss_b)
    assert a.keys() == b.keys() and "mt_source.map.weight" in a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------- decoding, save/load
def test_generated_positions_read_a_zero_source(paths, rows):
    _, _, tokenizer = paths
    model = mt_model(paths).eval()
    batch, _ = mt_batch_of(model, tokenizer, rows, with_answer=False)
    inputs = inputs_of(batch)
    cached = model.generate(**inputs, max_new_tokens=4, eos_token_id=[])
    recomputed = model.generate(**inputs, max_new_tokens=4, eos_token_id=[], use_cache=False)
    assert torch.equal(cached, recomputed)
    # the definition: one forward over prompt + generated tokens, the generated columns aligned to nothing
    n = cached.shape[1] - batch["input_ids"].shape[1]
    full = dict(inputs, input_ids=cached, attention_mask=F.pad(batch["attention_mask"], (0, n), value=1),
                mt_alignment=F.pad(batch["mt_alignment"], (0, 0, 0, n)))  # fmt: skip
    with torch.no_grad():
        logits = model(**full).logits
    assert torch.equal(logits[:, -n - 1 : -1].argmax(-1), cached[:, -n:])


def test_save_and_load_give_identical_outputs(paths, rows, tmp_path):
    llama, nllb, tokenizer = paths
    model = mt_model(paths, seed=3).eval()
    with torch.no_grad():
        model.mt_source.map.weight.mul_(2.0)  # not the fresh init a reload would draw
    batch, _ = mt_batch_of(model, tokenizer, rows)
    with torch.no_grad():
        before = model(**inputs_of(batch)).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "flare_config.json").read_text())["mt"]
    assert saved["model_path"] == str(nllb) and saved["language_codes"] == {"qaa": "qaa_Latn", "qab": "qab_Latn"}
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / "adapter" / "flare_mt.safetensors"))) == [
        "flare_mt.map.bias", "flare_mt.map.weight"]  # fmt: skip  (the NLLB encoder is referenced, not saved)
    loaded = flare.load_flare_model(load_4bit(llama), tmp_path / "adapter")
    with torch.no_grad():
        after = loaded(**inputs_of(batch)).logits
    assert torch.equal(before, after)


# ------------------------------------------------------------------------------------- flare train
def test_flare_train_method_flare_mt_end_to_end(tmp_path):
    from flare.train import train
    from flare.train.config import TrainConfig
    from flare.train.restore import load_run_model

    cfg = TrainConfig.builtin(method="flare-mt", output_dir=str(tmp_path / "run"), max_train_examples=32,
                              stage1_epochs=1, epochs=1, batch_size=8, max_eval_examples=8, progress=False)  # fmt: skip
    result = train(cfg)
    assert set(result.test.per_language) == {"qaa", "qab"}
    assert (tmp_path / "run" / "mt-base" / "config.json").is_file()  # the built-in tiny NLLB
    assert (result.adapter / "flare_mt.safetensors").is_file()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "flare-mt" and results["test"]["average"] == result.test.average
    # flare eval --run-dir rebuilds the MT source from the adapter and scores the same
    model, tokenizer, family, _, task = load_run_model(tmp_path / "run", device="cpu")
    assert model.mt_source is not None
    from flare.evaluate import evaluate
    from flare.train.inputs import load_stage_data

    data = load_stage_data(cfg, task)
    again = evaluate(model, task, tokenizer, family, data.test, split="test", max_length=cfg.max_length,
                     batch_size=cfg.eval_batch_size, use_source=False, device=torch.device("cpu"))  # fmt: skip
    assert again.average == result.test.average


def test_flare_mt_without_mt_model_outside_the_toy_task_is_one_line(tmp_path):
    from flare.train import train
    from flare.train.config import TrainConfig

    out = tmp_path / "run"
    cfg = TrainConfig(task="xnli", model=str(tmp_path / "llama"), method="flare-mt", output_dir=str(out))
    with pytest.raises(ValueError, match=r"^--method flare-mt needs --mt-model .* for task 'xnli'[^\n]*$"):
        train(cfg)
    assert not out.exists()  # refused before anything was written
    check_mt_config(TrainConfig(task="xnli", model="some/llama", method="flare-mt", mt_model="nllb"))  # fine
