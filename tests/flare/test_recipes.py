"""--recipe paper: resolution per model family and task, given options winning, --dry-run, and the loading
switches the recipe needs (double quantization, compute dtypes, fp32 parts, an added pad token, tied
embeddings trained as one tensor), each with an effect seen on a tiny local model."""

from __future__ import annotations

import json

import pytest
import torch

from flare.cli import EXIT_BAD_INPUT, main
from flare.recipes import resolve
from flare.tasks import get_task
from flare.testing import tiny_config, tiny_model
from flare.train import TrainConfig
from flare.train.loop import autocast_dtype
from flare.train.modeling import LoadSettings, flare_api, load_base_model, load_tokenizer


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """config.json of a tiny model of each family (resolution reads the config only, no weights)."""
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for arch in ("llama", "gemma2", "xlm-roberta", "qwen2"):
        tiny_config(arch).save_pretrained(root / arch)
        out[arch] = str(root / arch)
    return out


# ------------------------------------------------------------------------------------- resolution
@pytest.mark.parametrize(
    "arch, task, expected",
    [
        ("llama", "tydiqa", dict(lora_modules="all-linear", modules_to_save=("lm_head", "embed_tokens"),
                                 add_pad_token=True, double_quant=False, quantize=True, stage1_compute_dtype="fp16",
                                 compute_dtype="bf16", fp32_unquantized=False, tydiqa_stage1="goldp-english",
                                 model_selection=False)),
        ("gemma2", "nusax", dict(lora_modules="all-linear", modules_to_save=("lm_head", "embed_tokens"),
                                 add_pad_token=False, fp32_unquantized=True, double_quant=False,
                                 stage1_compute_dtype="fp16", compute_dtype="bf16", model_selection=True)),
        ("xlm-roberta", "xnli", dict(lora_modules=("query", "value"), fusion_modules=("query", "value"),
                                     modules_to_save=None, quantize=False, xnli_train="translated",
                                     attention_dropout=0.1, double_quant=True, compute_dtype=None)),
    ],
    ids=["llama-tydiqa", "gemma2-nusax", "xlmr-xnli"],
)  # fmt: skip
def test_paper_recipe_per_family_and_task(model_dirs, arch, task, expected):
    cfg = TrainConfig(task=task, model=model_dirs[arch], recipe="paper", train_file="translated.jsonl",
                      learning_rate=2e-5, epochs=3)  # fmt: skip
    res = resolve(cfg, explicit={"task", "model", "recipe", "train_file"})
    for field, value in expected.items():
        assert getattr(res.config, field) == value, field
    # the values common to every model (flare-method.md), equal to ours: still marked as the recipe's
    assert (res.config.r, res.config.lora_alpha, res.config.max_length, res.config.batch_size) == (8, 16, 128, 32)
    assert res.origin["learning_rate"] == "recipe" and res.origin["task"] == "given"
    assert res.model_type == arch and not res.notes


def test_ours_changes_nothing_and_unknown_families_get_the_common_values_with_a_note(model_dirs):
    cfg = TrainConfig(task="nusax", model=model_dirs["llama"])
    assert resolve(cfg).config == cfg
    res = resolve(TrainConfig(task="nusax", model=model_dirs["qwen2"], recipe="paper", double_quant=True))
    assert res.config.learning_rate == 2e-5 and res.config.add_pad_token is False
    assert len(res.notes) == 1 and "no entry for model type 'qwen2'" in res.notes[0]


def test_given_options_win_over_the_recipe(model_dirs):
    cfg = TrainConfig(task="nusax", model=model_dirs["llama"], recipe="paper", double_quant=True, learning_rate=1e-4)
    # the command line says which were given, default values included (--double-quant is the default)
    res = resolve(cfg, explicit={"task", "model", "recipe", "double_quant"})
    assert res.config.double_quant is True and res.origin["double_quant"] == "given"
    assert res.config.learning_rate == 2e-5  # not given there: the recipe's
    # from Python without `explicit`: a value other than the default counts as given, a default one does not
    res = resolve(cfg)
    assert res.config.learning_rate == 1e-4 and res.config.double_quant is False
    assert any("learning_rate" in n for n in res.notes)
    # built-in run: BUILTIN's learning rate is not the user's; the recipe replaces it
    assert resolve(TrainConfig.builtin(recipe="paper")).config.learning_rate == 2e-5
    # --bf16 chooses stage 2's compute dtype itself: the recipe's is left out (no contradiction)
    res = resolve(dataclasses_replace(cfg, bf16=False), explicit={"task", "model", "recipe", "bf16"})
    assert res.config.compute_dtype is None and res.config.stage1_compute_dtype == "fp16"
    assert any("--bf16 given" in n for n in res.notes)


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_conflicts_and_missing_inputs_are_one_line_errors(model_dirs):
    with pytest.raises(ValueError, match="--bf16 contradicts --compute-dtype fp16"):
        TrainConfig(bf16=True, compute_dtype="fp16")
    with pytest.raises(ValueError, match="--recipe paper: --xnli-train translated needs --train-file"):
        resolve(TrainConfig(task="xnli", model=model_dirs["llama"], recipe="paper"))


def test_dry_run_prints_the_resolved_settings_and_writes_nothing(tmp_path, capsys, model_dirs):
    out = tmp_path / "out"
    argv = ["train", "--recipe", "paper", "--dry-run", "--output-dir", str(out), "--double-quant",
            "--task", "nusax", "--model", model_dirs["gemma2"]]  # fmt: skip
    assert main(argv) == 0
    lines = _rows(capsys.readouterr().out)
    assert lines["double_quant"] == ["yes", "given"]
    assert lines["fp32_unquantized"] == ["yes", "recipe"] and lines["learning_rate"] == ["2e-05", "recipe"]
    assert lines["decoder_eval"] == ["ours", "default"] and lines["task"] == ["nusax", "given"]
    assert main(["train", "--dry-run", "--output-dir", str(out)]) == 0  # --dry-run alone: the built-in default
    assert _rows(capsys.readouterr().out)["learning_rate"] == ["0.005", "built-in"]
    assert not out.exists()
    argv = ["train", "--recipe", "paper", "--dry-run", "--task", "xnli", "--model", model_dirs["xlm-roberta"]]
    assert main(argv) == EXIT_BAD_INPUT
    assert "--xnli-train translated needs --train-file" in capsys.readouterr().err


def _rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")}


# ------------------------------------------------------------------------------------- loading switches
@pytest.fixture(scope="module")
def no_pad_llama(tmp_path_factory):
    """The built-in tiny Llama with a tokenizer that has no pad token (as Llama 3.1's has none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from flare.default.build import build_tokenizer, save_tiny_llama

    full = build_tokenizer()
    words = [t for t, _ in sorted(full.get_vocab().items(), key=lambda kv: kv[1]) if t != "<pad>"]
    vocab = {t: i for i, t in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    path = tmp_path_factory.mktemp("nopad") / "llama"
    save_tiny_llama(path, tok)
    return path, len(vocab)


def _nested(model) -> set[bool]:
    return {m.weight.quant_state.nested for m in model.modules() if type(m).__name__ == "Linear4bit"}


def test_double_quant_switch_reaches_bitsandbytes(no_pad_llama):
    path, _ = no_pad_llama
    task, cpu = get_task("toy"), torch.device("cpu")
    for double in (True, False):
        model = load_base_model(str(path), task, "decoder", quantize=None, device=cpu,
                                settings=LoadSettings(double_quant=double))  # fmt: skip
        assert _nested(model) == {double}


def test_compute_dtypes_per_stage_and_fp32_parts():
    cfg = TrainConfig(stage1_compute_dtype="fp16", compute_dtype="bf16", fp32_unquantized=True)
    s1, s2 = LoadSettings.of(cfg, "stage1"), LoadSettings.of(cfg, "stage2")
    assert s1.dtypes("cuda") == (torch.float32, torch.float16)  # non-4-bit weights fp32, bnb computes fp16
    assert s2.dtypes("cuda") == (torch.float32, torch.bfloat16)
    assert LoadSettings.of(TrainConfig(compute_dtype="bf16"), "stage1").dtypes("cuda") == (torch.bfloat16,) * 2
    # fp16 trains under a GradScaler, which needs fp32 weights for what trains in full
    assert LoadSettings.of(TrainConfig(compute_dtype="fp16"), "stage1").dtypes("cuda") == (torch.float32, torch.float16)
    assert LoadSettings().dtypes("cuda") == (torch.bfloat16,) * 2  # unset: as before these options
    assert s1.dtypes("cpu") == (torch.float32,) * 2  # CPUs compute in fp32 (flare.train.modeling)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype(cfg, cuda, "stage1") == torch.float16
    assert autocast_dtype(TrainConfig(compute_dtype="fp32"), cuda, "stage2") is None
    assert autocast_dtype(cfg, cpu, "stage1") is None and autocast_dtype(TrainConfig(), cpu) is None
    with pytest.raises(ValueError, match="--bf16 autocast is for CUDA"):
        autocast_dtype(TrainConfig(bf16=True, compute_dtype="bf16"), cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="dtypes of a GPU load")
def test_fp32_unquantized_keeps_norms_and_embeddings_fp32_on_gpu(no_pad_llama):
    path, _ = no_pad_llama
    task, gpu = get_task("toy"), torch.device("cuda")
    for fp32, want in ((True, torch.float32), (False, torch.bfloat16)):
        model = load_base_model(str(path), task, "decoder", quantize=None, device=gpu,
                                settings=LoadSettings(compute_dtype="bf16", fp32_unquantized=fp32))  # fmt: skip
        assert model.model.norm.weight.dtype == want and model.model.embed_tokens.weight.dtype == want
        assert {m.compute_dtype for m in model.modules() if type(m).__name__ == "Linear4bit"} == {torch.bfloat16}


def test_added_pad_token_trains_its_embeddings_and_round_trips(no_pad_llama, tmp_path):
    """A run with add_pad_token: the tokenizer gets a new pad id, the embeddings a row (the mean of the others), the
    trained embed_tokens copy moves while the frozen original does not, and flare eval's reload gives back exactly
    the saved adapter, pad row included."""
    from safetensors.torch import load_file

    from flare.train import train
    from flare.train.restore import load_run_model

    path, vocab = no_pad_llama
    tok = load_tokenizer(str(path), "decoder", add_pad_token=True)
    assert tok.pad_token_id == vocab != tok.eos_token_id and len(tok) == vocab + 1
    cfg = TrainConfig(task="toy", model=str(path), stages=("stage2",), add_pad_token=True, learning_rate=1e-2,
                      modules_to_save=("lm_head", "embed_tokens"), output_dir=str(tmp_path / "run"), batch_size=8,
                      max_train_examples=8, max_eval_examples=4, epochs=1, progress=False, seed=1)  # fmt: skip
    result = train(cfg)
    copy = result.model.saved_modules()["model.embed_tokens"]
    trained, original = copy.trained_module.weight, copy.original_module.weight
    assert trained.shape[0] == vocab + 1
    assert torch.equal(original[vocab], original[:vocab].mean(0))  # the new row: the mean of the others
    assert not torch.equal(trained, original)
    saved = load_file(str(tmp_path / "run" / "stage2" / "adapter" / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.weight"
    assert saved[key].shape[0] == vocab + 1
    model, tokenizer, *_ = load_run_model(tmp_path / "run", device="cpu")
    assert tokenizer.pad_token_id == vocab and model.base_model.config.pad_token_id == vocab
    assert torch.equal(model.adapter_state_dict()[key], saved[key])


def test_tied_embeddings_train_as_one_tensor(tmp_path):
    """Gemma 2 ties lm_head to embed_tokens: with both trained in full they stay one tensor through a step and
    a save/load, and the optimizer sees it once."""
    from flare import FlareConfig

    _, get_flare_model, load_flare_model = flare_api()
    base = tiny_model("gemma2", tie_word_embeddings=True, load_in_4bit=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    config = FlareConfig(fusion="none", modules_to_save=("lm_head", "embed_tokens"))
    model = get_flare_model(base, config)
    head, emb = model.saved_modules()["lm_head"], model.saved_modules()["model.embed_tokens"]
    assert head.trained_module.weight is emb.trained_module.weight
    params = model.trainable_parameters()
    assert sum(p is emb.trained_module.weight for p in params) == 1
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(3, 100, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(emb.trained_module.weight, emb.original_module.weight)
    assert head.trained_module.weight is emb.trained_module.weight
    model.save_pretrained(tmp_path / "adapter")
    again = load_flare_model(tiny_model("gemma2", tie_word_embeddings=True, load_in_4bit=True), tmp_path / "adapter")
    head2, emb2 = again.saved_modules()["lm_head"], again.saved_modules()["model.embed_tokens"]
    assert head2.trained_module.weight is emb2.trained_module.weight
    assert torch.equal(emb2.trained_module.weight, emb.trained_module.weight.detach())


def test_resolved_settings_are_what_the_run_stores(tmp_path):
    """run_config.json holds the resolved config, so --resume compares resolved settings."""
    from flare.train.runner import _prepare_output
    from flare.train.distributed import init_distributed

    cfg = resolve(TrainConfig.builtin(recipe="paper", output_dir=str(tmp_path / "run"))).config
    _prepare_output(cfg, init_distributed("cpu"))
    stored = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert stored["recipe"] == "paper" and stored["double_quant"] is False and stored["learning_rate"] == 2e-5
    assert TrainConfig.from_dict(stored).differences(cfg) == {}
