"""Multi-head cross-attention fusion and its attention dropout through the model layer: config
checks, the two-pass definition, adapter save/load keeping the head count, exact resumption."""

import pytest
import torch

import flare
from flare.modeling.two_pass import two_pass_forward
from flare.testing import assert_close_scaled, make_flare, random_streams, tiny_model
from flare.train import TrainConfig, TrainingStopped, train
from flare_kernels import use_backend
from flare_kernels.modules import FlareLinear4bit


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fusion="cross_attention", r=8, cross_attention_heads=3), "must divide the LoRA rank r=8"),
        (dict(cross_attention_heads=0), "must be a positive integer"),
        (dict(attention_dropout=1.0), r"attention_dropout must be in \[0, 1\)"),
    ],
)
def test_config_refuses_bad_heads_and_dropout_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        flare.FlareConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_module_refuses_heads_not_dividing_r_and_eval_mode_drops_nothing():
    with pytest.raises(ValueError, match="must divide the LoRA rank r=8"):
        FlareLinear4bit.from_linear(torch.nn.Linear(64, 16), fusion="cross_attention", cross_attention_heads=3)
    layer = FlareLinear4bit.from_linear(torch.nn.Linear(64, 16), fusion="cross_attention", cross_attention_heads=2,
                                        attention_dropout=0.5)  # fmt: skip
    torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    x, src = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    layer.eval()
    assert torch.equal(layer(x, src), layer(x, src))
    layer.train()
    torch.manual_seed(0)
    a = layer(x, src)
    torch.manual_seed(1)
    assert not torch.equal(a, layer(x, src))  # training draws a fresh mask from torch's RNG


def test_two_heads_match_the_two_pass_definition_in_float64():
    cfg = flare.FlareConfig(fusion="cross_attention", cross_attention_heads=2, modules_to_save=("classifier",))
    fm = make_flare("xlm-roberta", config=cfg, load_in_4bit=False, lora_scale=0.1).double()
    ids, mask, sids, smask = random_streams("xlm-roberta", length=10, source_length=12, seed=5)
    fm.train()
    with use_backend("torch"):
        one = fm(ids, mask, sids, smask).logits
    exact = two_pass_forward(fm, ids, mask, sids, smask, compute_dtype=torch.float64).logits
    assert_close_scaled(one, exact, rtol=1e-10, atol=1e-14, name="logits")
    for module in fm.projections().values():  # the setting reached the layers that fuse
        if module.fusion == "cross_attention":
            module.cross_attention_heads = 1
    with use_backend("torch"):
        assert (fm(ids, mask, sids, smask).logits - one).abs().max() > 1e-6


def test_adapter_keeps_heads_and_attention_dropout(tmp_path):
    cfg = flare.FlareConfig(fusion="cross_attention", cross_attention_heads=4, attention_dropout=0.1)
    fm = make_flare("llama", config=cfg)
    fm.save_pretrained(tmp_path / "a")
    loaded = flare.load_flare_model(tiny_model("llama", load_in_4bit=True), tmp_path / "a")
    assert loaded.config.cross_attention_heads == 4 and loaded.config.attention_dropout == 0.1
    fused = [m for m in loaded.projections().values() if m.fusion == "cross_attention"]
    assert fused and all(m.cross_attention_heads == 4 and m.attention_dropout == 0.1 for m in fused)


def test_resume_with_attention_dropout_is_exact(tmp_path):
    def cfg(name, attention_dropout=0.3):
        return TrainConfig.builtin(
            output_dir=str(tmp_path / name), stages=("stage2",), epochs=1, max_train_examples=96,
            max_eval_examples=4, progress=False, fusion="cross_attention", cross_attention_heads=2,
            attention_dropout=attention_dropout, checkpoint_steps=1,
        )  # fmt: skip

    full = train(cfg("full"))
    with pytest.raises(TrainingStopped):
        train(cfg("split"), stop_after_steps=1)
    resumed = train(cfg("split"), resume=True)
    assert full.loss_curve("stage2") == resumed.loss_curve("stage2")
    assert len(full.loss_curve("stage2")) >= 2
    # the dropout was in effect (so the RNG state mattered)
    assert train(cfg("nodrop", attention_dropout=0.0)).loss_curve("stage2") != full.loss_curve("stage2")
