"""Config validation, module selection on every supported architecture, and bad input rejected before any work."""

from __future__ import annotations

import copy

import pytest
import torch

import flare
from flare.modeling.projection import FlareProjection4bit, FlareProjectionDense
from flare.modeling.trainable_copy import TrainableCopy
from flare.testing import make_flare, random_streams, tiny_model
from flare_kernels import FlareLinear4bit


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fusion="concat"), "unknown fusion 'concat'"),
        (dict(r=0), "r must be a positive integer"),
        (dict(r=2.5), "r must be a positive integer"),
        (dict(lora_alpha=0), "lora_alpha must be a positive"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (dict(source_site="embedding"), "source_site must be one of"),
        (dict(lora_modules=()), "lora_modules must name at least one"),
        (dict(fusion_modules=("q_proj", "")), "non-empty module names"),
        (dict(modules_to_save=5), "sequence of module names"),
    ],
)
def test_config_rejects(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        flare.FlareConfig(**kwargs)


def test_config_round_trip_and_single_names():
    cfg = flare.FlareConfig(fusion_modules="q_proj", lora_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    assert cfg.fusion_modules == ("q_proj",) and cfg.lora_modules == ("q_proj", "v_proj")
    assert flare.FlareConfig.from_dict(cfg.to_dict()) == cfg
    assert flare.FlareConfig().lora_modules == "all-linear" and flare.FlareConfig().scaling == 2.0
    with pytest.raises(ValueError, match="unknown FlareConfig fields"):
        flare.FlareConfig.from_dict({"rank": 8})


# ------------------------------------------------------------------------------------------ wrapping
@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2", "mistral"])
def test_decoders_all_linear_4bit(arch):
    fm = make_flare(arch, config=flare.FlareConfig(modules_to_save=("lm_head", "embed_tokens")), lora_scale=0)
    projections = fm.projections()
    assert len(projections) == 2 * 7
    assert all(isinstance(m, FlareProjection4bit) and isinstance(m, FlareLinear4bit) for m in projections.values())
    fusion = {p.split(".")[-1] for p in fm.targets.fusion}
    assert fusion == {"q_proj", "v_proj"} and len(fm.targets.fusion) == 4
    assert {m.fusion for p, m in projections.items() if p not in fm.targets.fusion} == {"none"}
    assert isinstance(fm.base_model.lm_head, TrainableCopy)
    assert isinstance(fm.base_model.model.embed_tokens, TrainableCopy)
    names = {n for n, _ in fm.named_trainable_parameters()}
    assert all(("lora_" in n) or ("trained_module" in n) for n in names)
    assert sum("trained_module" in n for n in names) == 2
    frozen = [n for n, p in fm.named_parameters() if not p.requires_grad]
    assert any("original_module" in n for n in frozen) and any("norm" in n for n in frozen)
    # PEFT's init: B = 0, so a fresh adapter is a no-op.
    assert all(torch.count_nonzero(m.lora_B.weight) == 0 for m in projections.values())
    trainable, total = fm.print_trainable_parameters()
    assert 0 < trainable < total


def test_encoder_aliases_and_heads_excluded():
    fm = make_flare("xlm-roberta", config=flare.FlareConfig(modules_to_save=("classifier",)), load_in_4bit=False)
    projections = fm.projections()
    assert len(projections) == 2 * 6 and all(isinstance(m, FlareProjectionDense) for m in projections.values())
    assert sorted(p.split(".")[-1] for p in fm.targets.fusion) == ["query", "query", "value", "value"]
    assert not any(p.startswith("classifier") or "pooler" in p for p in projections)
    assert fm.padding_side == "right" and fm.max_length == 64 - 2
    qa = make_flare("xlm-roberta", head="question_answering", lora_scale=0)
    assert all(isinstance(m, FlareProjection4bit) for m in qa.projections().values())


def test_selected_modules_and_fusion_union():
    cfg = flare.FlareConfig(lora_modules=("o_proj",), fusion_modules=("model.layers.1.self_attn.q_proj",))
    fm = make_flare("llama", config=cfg, lora_scale=0)
    assert list(fm.targets.adapted) == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    assert fm.targets.fusion == ["model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lora_modules=("c_attn",)), "'c_attn' matches no linear projection"),
        (dict(fusion_modules=("Wqkv",)), "'Wqkv' matches no linear projection"),
        (dict(modules_to_save=("classifier",)), "'classifier' matches no module"),
        (dict(modules_to_save=("q_proj",)), "is \\(or contains\\) a LoRA-adapted projection"),
        (dict(modules_to_save=("layers",)), "contains"),
        (dict(fusion_modules=("down_proj",), source_site="residual"), "reads 128 features"),
    ],
)
def test_bad_selection_fails_before_changing_the_model(kwargs, match):
    model = tiny_model("llama", load_in_4bit=True)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        flare.get_flare_model(model, flare.FlareConfig(**kwargs))
    assert [type(m) for m in model.modules()] == before
    assert all(not isinstance(m, (FlareProjection4bit, TrainableCopy)) for m in model.modules())


def test_unsupported_models_and_weights():
    with pytest.raises(ValueError, match="already carries FLARE adapters"):
        flare.get_flare_model(make_flare("llama").base_model)
    with pytest.raises(TypeError, match="must be a FlareConfig"):
        flare.get_flare_model(tiny_model("llama"), {"r": 8})
    with pytest.raises(ValueError, match="no transformer blocks"):
        flare.get_flare_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    import bitsandbytes as bnb

    model = tiny_model("llama")
    fp4 = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="fp4")
    fp4.load_state_dict(model.model.layers[0].self_attn.q_proj.state_dict())
    model.model.layers[0].self_attn.q_proj = fp4.to("cpu")
    with pytest.raises(ValueError, match="only nf4"):
        flare.get_flare_model(model)


def test_sequence_fusion_on_a_decoder_warns():
    with pytest.warns(UserWarning, match="future ones included"):
        flare.get_flare_model(tiny_model("llama"), flare.FlareConfig(fusion="cross_attention"))


def test_deepcopy_gives_an_independent_model():
    fm = make_flare("llama").eval()
    twin = copy.deepcopy(fm)
    assert twin._owner is not fm._owner
    ids, mask, sids, smask = random_streams("llama", seed=1)
    with torch.no_grad():
        expected = fm(ids, mask, sids, smask).logits
        assert torch.equal(twin(ids, mask, sids, smask).logits, expected)
        with twin.disable_adapters():
            assert torch.equal(fm(ids, mask, sids, smask).logits, expected)


# ------------------------------------------------------------------------------------------ bad input
class _Counter:
    def __init__(self, fm):
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._hit) for m in fm.projections().values()]

    def _hit(self, *args):
        self.calls += 1


def test_bad_inputs_fail_before_any_work():
    fm = make_flare("llama", lora_scale=0)
    ids, mask, sids, smask = random_streams("llama", seed=2)
    counter = _Counter(fm)
    cases = [
        (dict(source_input_ids=sids[:2], source_attention_mask=smask[:2]), "batch sizes differ"),
        (dict(source_input_ids=sids), "without source_attention_mask"),
        (dict(source_attention_mask=smask), "source_attention_mask given without source_input_ids"),
        (dict(source_input_ids=sids, source_attention_mask=smask[:, :4]), "must have the shape of source_input_ids"),
        (dict(source_input_ids=sids.float(), source_attention_mask=smask), "integer token ids"),
        (dict(source_input_ids=sids[0], source_attention_mask=smask), "2-D"),
    ]
    for kwargs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            fm(ids, mask, **kwargs)
    long_ids = torch.randint(3, 100, (3, 65))
    with pytest.raises(ValueError, match="length 65 exceeds the model's limit of 64"):
        fm(long_ids, torch.ones_like(long_ids), sids, smask)
    with pytest.raises(ValueError, match="length 65 exceeds"):
        fm(long_ids)
    with pytest.raises(ValueError, match="must have the shape of input_ids"):
        fm(ids, mask[:, :3], sids, smask)
    assert counter.calls == 0


def test_encoder_length_limit_counts_the_position_offset():
    fm = make_flare("xlm-roberta", load_in_4bit=False, lora_scale=0)
    ok = torch.randint(3, 100, (2, 62))
    fm(ok, torch.ones_like(ok), ok, torch.ones_like(ok))
    too_long = torch.randint(3, 100, (2, 63))
    with pytest.raises(ValueError, match="limit of 62"):
        fm(too_long, torch.ones_like(too_long), too_long, torch.ones_like(too_long))


def test_streams_of_different_lengths_are_aligned():
    """A shorter stream is padded on the model's side; labels / token types / answer positions follow."""
    fm = make_flare("llama").eval()
    ids, mask, sids, smask = random_streams("llama", length=6, source_length=9, seed=3)
    labels = torch.where(mask.bool(), ids, -100)
    pad = lambda t, v: torch.cat([torch.full((3, 3), v, dtype=t.dtype), t], 1)
    with torch.no_grad():
        short = fm(ids, mask, sids, smask, labels=labels)
        padded = fm(pad(ids, 0), pad(mask, 0), sids, smask, labels=pad(labels, -100))
    # Bit-equal by construction: the model pads the short target to the source length with the
    # config's pad id (0 here) and mask 0, so both calls run identical [3, 9] inputs through the same
    # shapes (no GEMM sees another row count).
    assert torch.equal(short.logits, padded.logits) and torch.equal(short.loss, padded.loss)
    enc = make_flare("xlm-roberta", head="question_answering").eval()
    ids, mask, sids, smask = random_streams("xlm-roberta", length=6, source_length=9, seed=4)
    kw = dict(start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([2, 2, 4]))
    right = lambda t, v: torch.cat([t, torch.full((3, 3), v, dtype=t.dtype)], 1)
    with torch.no_grad():
        short = enc(ids, mask, sids, smask, **kw)
        padded = enc(right(ids, 1), right(mask, 0), sids, smask, **kw)
    assert torch.equal(short.start_logits, padded.start_logits) and torch.equal(short.loss, padded.loss)
    with pytest.raises(ValueError, match="cannot pad 'weird'"):
        fm(ids, mask, sids, smask, weird=torch.zeros_like(ids))


def test_tiny_models_are_deterministic_by_seed():
    a = tiny_model("qwen2", seed=3, cache=False).state_dict()
    b = tiny_model("qwen2", seed=3, cache=False).state_dict()
    c = tiny_model("qwen2", seed=4, cache=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    state = torch.random.get_rng_state()
    tiny_model("gemma2", seed=5, cache=False)
    assert torch.equal(state, torch.random.get_rng_state()), "the global RNG must be left alone"
