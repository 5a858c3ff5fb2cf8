"""Adapters saved in PEFT's layout: round trip, plain-PEFT interop (fusion dropped), no unpickling."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import flare
from flare.testing import assert_close_scaled, make_flare, random_lora_, random_streams, tiny_model

FP32 = dict(rtol=1e-5, atol=1e-7)


def _forbid_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("fusion,site", [("cross_attention", "residual"), ("add_relu", "projection_input")])
def test_round_trip(tmp_path, monkeypatch, fusion, site):
    cfg = flare.FlareConfig(fusion=fusion, source_site=site, r=4, lora_alpha=8, modules_to_save=("lm_head",))
    fm = make_flare("llama", config=cfg).eval()
    ids, mask, sids, smask = random_streams("llama", seed=1)
    with torch.no_grad():
        expected = fm(ids, mask, sids, smask).logits
    fm.save_pretrained(tmp_path)

    files = sorted(p.name for p in tmp_path.iterdir())
    extra = ["flare_fusion.safetensors"] if fusion == "cross_attention" else []
    assert files == sorted(["adapter_config.json", "adapter_model.safetensors", "flare_config.json", *extra])
    peft_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 4 and peft_cfg["lora_alpha"] == 8
    assert peft_cfg["task_type"] == "CAUSAL_LM" and peft_cfg["modules_to_save"] == ["lm_head"]
    assert len(peft_cfg["target_modules"]) == 14 and "model.layers.1.mlp.down_proj" in peft_cfg["target_modules"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.weight" in keys
    assert not any("fusion_module" in k for k in keys), "fusion parameters would confuse plain PEFT"

    _forbid_unpickling(monkeypatch)
    loaded = flare.load_flare_model(tiny_model("llama", load_in_4bit=True), tmp_path)
    assert loaded.config.fusion == fusion and loaded.config.source_site == site
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    with torch.no_grad():
        got = loaded(ids, mask, sids, smask).logits
    assert torch.equal(got, expected)
    again = flare.FlareModel.from_pretrained(tiny_model("llama", load_in_4bit=True), tmp_path, is_trainable=True)
    assert {n for n, _ in again.named_trainable_parameters()} == {n for n, _ in fm.named_trainable_parameters()}


def test_plain_peft_loads_a_flare_adapter_as_lora(tmp_path):
    from peft import PeftModel

    fm = make_flare("llama", config=flare.FlareConfig(modules_to_save=("lm_head", "embed_tokens"))).eval()
    fm.save_pretrained(tmp_path)
    ids, mask, sids, smask = random_streams("llama", seed=2)
    peft_model = PeftModel.from_pretrained(tiny_model("llama", load_in_4bit=True), str(tmp_path))
    peft_model.train()  # bitsandbytes dequantizes in train mode (its eval-mode CPU path repacks and computes in bf16)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        ours_plain = fm(ids, mask).logits
        ours_fused = fm(ids, mask, sids, smask).logits
    assert_close_scaled(theirs, ours_plain, **FP32)
    assert (theirs - ours_fused).abs().max() > 1e-2  # PEFT has no source stream: the fusion is dropped


def test_plain_peft_loads_an_encoder_adapter(tmp_path):
    from peft import PeftModel

    cfg = flare.FlareConfig(fusion="mul", modules_to_save=("classifier",))
    fm = make_flare("xlm-roberta", config=cfg, load_in_4bit=False).eval()
    fm.save_pretrained(tmp_path)
    ids, mask, _, _ = random_streams("xlm-roberta", seed=3)
    peft_model = PeftModel.from_pretrained(tiny_model("xlm-roberta"), str(tmp_path)).eval()
    with torch.no_grad():
        assert_close_scaled(peft_model(input_ids=ids, attention_mask=mask).logits, fm(ids, mask).logits, **FP32)


def test_flare_loads_a_plain_peft_adapter(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        tiny_model("llama", load_in_4bit=True),
        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"]),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(str(tmp_path))
    ids, mask, sids, smask = random_streams("llama", seed=4)
    peft_model.train()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    _forbid_unpickling(monkeypatch)
    fm = flare.load_flare_model(tiny_model("llama", load_in_4bit=True), tmp_path)
    assert fm.config.fusion == "none" and len(fm.targets.adapted) == 6
    # k/o/gate/up stay bitsandbytes layers here: train mode keeps them on bitsandbytes' dequantize +
    # matmul path (in eval mode its CPU path repacks the weights and computes in bf16).
    fm.train()
    with torch.no_grad():
        assert_close_scaled(fm(ids, mask).logits, theirs, **FP32)
        assert_close_scaled(fm(ids, mask, sids, smask).logits, theirs, **FP32)  # no fusion: the source is ignored


def test_flare_loads_a_peft_sequence_classification_adapter(tmp_path):
    """PEFT's SEQ_CLS adapters list both head names it knows ("classifier", "score"); a model has one."""
    from peft import LoraConfig, TaskType, get_peft_model

    # Names for two architectures, as shared configs list them: PEFT adapts those the model has.
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value", "query_key_value"])
    peft_model = get_peft_model(tiny_model("xlm-roberta"), cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:  # the trained head differs from the fresh model's
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    ids, mask, _, _ = random_streams("xlm-roberta", seed=5)
    fm = flare.load_flare_model(tiny_model("xlm-roberta"), tmp_path)
    assert fm.targets.modules_to_save == ["classifier"]
    assert {p.rsplit(".", 1)[-1] for p in fm.targets.adapted} == {"query", "value"}
    peft_model.eval()
    with torch.no_grad():
        assert_close_scaled(fm(ids, mask).logits, peft_model(input_ids=ids, attention_mask=mask).logits, **FP32)


def test_load_refuses_pickles_and_mismatches(tmp_path):
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"not read")
    (tmp_path / "pickled" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="never unpickles"):
        flare.load_flare_model(tiny_model("llama"), tmp_path / "pickled")
    with pytest.raises(FileNotFoundError):
        flare.load_flare_model(tiny_model("llama"), tmp_path / "missing")
    fm = make_flare("llama", config=flare.FlareConfig(r=4))
    fm.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="does not fit this model"):
        flare.load_flare_model(tiny_model("llama", intermediate_size=96), tmp_path / "a")


def test_adapter_state_dict_round_trip():
    cfg = flare.FlareConfig(fusion="cross_attention", modules_to_save=("lm_head",))
    a = make_flare("llama", config=cfg, seed=0)
    b = make_flare("llama", config=cfg, seed=1)
    state = {k: v.clone() for k, v in a.adapter_state_dict().items()}
    assert any(".fusion_module.q.weight" in k for k in state)
    b.load_adapter_state_dict(state)
    for key, value in b.adapter_state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(KeyError, match="missing"):
        b.load_adapter_state_dict({k: v for k, v in state.items() if "lm_head" not in k})
    bad = dict(state)
    key = next(k for k in bad if k.endswith("lora_A.weight"))
    bad[key] = bad[key][:2]
    with pytest.raises(ValueError, match="shape"):
        b.load_adapter_state_dict(bad)


def test_save_is_atomic_and_overwrites(tmp_path, monkeypatch):
    fm = make_flare("llama", config=flare.FlareConfig(fusion="cross_attention"))
    fm.save_pretrained(tmp_path)
    plain = make_flare("llama", config=flare.FlareConfig(fusion="add"))
    plain.save_pretrained(tmp_path)  # a stale cross-attention file must not survive
    assert not (tmp_path / "flare_fusion.safetensors").exists()
    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("disk full")

    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    random_lora_(plain, seed=5)
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        plain.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "flare_config.json",
    ]


@pytest.mark.parametrize("option", [dict(layers_to_transform=[0]), dict(exclude_modules=["k_proj"])])
def test_peft_options_we_do_not_apply_are_refused_by_name(tmp_path, option):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], **option)
    get_peft_model(tiny_model("llama"), cfg).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=f"{next(iter(option))}=.* is not supported"):
        flare.load_flare_model(tiny_model("llama"), tmp_path)
