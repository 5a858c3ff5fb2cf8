"""Gradient checkpointing gives the same loss and gradients as without it, fusion included.

The authors' code lost the source states when PEFT's prepare_model_for_kbit_training turned
checkpointing on, so it trained plain LoRA. Here the recomputed blocks re-enter the two-stream
context; with lora_dropout > 0 the recomputation must also redraw the same dropout masks (torch's
checkpoint restores the RNG state). Same computation, same order: results must be bit-identical
up to fp32 reassociation, so the tolerance is the fp32 one of test_model_two_stream.
"""

from __future__ import annotations

import pytest
import torch

import flare
import flare.model as flare_model_module
from flare.testing import assert_close_scaled, assert_grads_close, make_flare, random_streams, take_grads, tiny_model

FP32 = dict(rtol=1e-5, atol=1e-7)


def _step(fm, inputs, seed=123):
    ids, mask, sids, smask = inputs
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    torch.manual_seed(seed)  # the dropout masks
    loss = fm(ids, mask, sids, smask, labels=labels).loss
    loss.backward()
    return loss.detach(), take_grads(fm)


@pytest.mark.parametrize(
    "fusion,site,reentrant",
    [
        ("add_relu", "projection_input", False),
        ("add_relu", "residual", True),
        ("cross_attention", "projection_input", True),
        ("matmul_relu", "residual", False),
    ],
)
def test_checkpointing_keeps_fusion_and_dropout(fusion, site, reentrant):
    fm = make_flare("llama", config=flare.FlareConfig(fusion=fusion, source_site=site, lora_dropout=0.1)).train()
    inputs = random_streams("llama", seed=1)
    loss0, g0 = _step(fm, inputs)
    fm.gradient_checkpointing_enable({"use_reentrant": reentrant})
    assert fm.is_gradient_checkpointing
    loss1, g1 = _step(fm, inputs)
    assert_close_scaled(loss1, loss0, **FP32, name="loss")
    assert_grads_close(g0, g1, **FP32)
    # The comparison sees the masks: another seed gives other gradients.
    _, g_other = _step(fm, inputs, seed=7)
    name = next(n for n in g0 if "q_proj.lora_A" in n)
    assert (g_other[name] - g0[name]).abs().max() > 1e-3 * g0[name].abs().max()


def test_prepare_model_for_kbit_training_then_wrap():
    """The authors' setup: PEFT's preparation (freezes, enables reentrant checkpointing) before wrapping."""
    from peft import prepare_model_for_kbit_training

    inputs = random_streams("llama", seed=2)
    config = flare.FlareConfig(lora_dropout=0.05, modules_to_save=("lm_head", "embed_tokens"))
    reference = make_flare("llama", config=config).train()
    loss0, g0 = _step(reference, inputs)

    # Reentrant checkpointing, as PEFT 0.13 / transformers 4.46 (the authors' stack) defaulted to.
    prepared = prepare_model_for_kbit_training(
        tiny_model("llama", load_in_4bit=True), gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    assert any(getattr(m, "gradient_checkpointing", False) for m in prepared.modules()), (
        "PEFT did not enable checkpointing"
    )
    fm = flare.get_flare_model(prepared, config)
    fm.load_adapter_state_dict(reference.adapter_state_dict())
    fm.train()
    loss1, g1 = _step(fm, inputs)
    assert_close_scaled(loss1, loss0, **FP32, name="loss")
    assert_grads_close(g0, g1, **FP32)


def test_checkpointing_enabled_on_the_wrapped_model_directly():
    """Checkpointing switched on behind FlareModel's back (e.g. a Trainer flag) is covered too."""
    inputs = random_streams("llama", seed=3)
    fm = make_flare("llama", config=flare.FlareConfig(fusion="add")).train()
    loss0, g0 = _step(fm, inputs)
    fm.base_model.activation_checkpointing_enable({"use_reentrant": False})
    loss1, g1 = _step(fm, inputs)
    assert_close_scaled(loss1, loss0, **FP32, name="loss")
    assert_grads_close(g0, g1, **FP32)


def test_recompute_without_context_fails_loudly(monkeypatch):
    """If a checkpoint function escaped the wrapper, recomputation must raise, never drop the fusion."""
    fm = make_flare("llama").train()
    fm.gradient_checkpointing_enable()
    for module in fm._checkpointable:  # undo the wrapping, and keep it undone
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None:
            module._gradient_checkpointing_func = func.inner
    monkeypatch.setattr(flare_model_module, "install_checkpoint_wrappers", lambda modules: None)
    ids, mask, sids, smask = random_streams("llama", seed=4)
    loss = fm(ids, mask, sids, smask, labels=ids).loss
    with pytest.raises(RuntimeError, match="silently drop the fusion"):
        loss.backward()


def test_plain_lora_under_checkpointing():
    inputs = random_streams("llama", seed=5)
    fm = make_flare("llama", config=flare.FlareConfig(lora_dropout=0.1)).train()
    ids, mask = inputs[:2]
    torch.manual_seed(0)
    fm(ids, mask, labels=ids).loss.backward()
    g0 = take_grads(fm)
    fm.gradient_checkpointing_enable()
    torch.manual_seed(0)
    fm(ids, mask, labels=ids).loss.backward()
    g1 = take_grads(fm)
    assert_grads_close(g0, g1, **FP32)


@pytest.mark.parametrize("reentrant", [False, True])
def test_plain_and_fused_graphs_pending_together(reentrant):
    """A plain forward's graph awaiting backward while a FLARE forward runs (a combined loss, or a
    no-grad FLARE evaluation in between): its recomputation is legitimately plain LoRA."""
    inputs = random_streams("llama", seed=6)
    ids, mask, sids, smask = inputs
    fm = make_flare("llama").train()

    def combined():
        plain = fm(ids, mask, labels=ids).loss
        with torch.no_grad():
            fm(ids, mask, sids, smask)
        (plain + fm(ids, mask, sids, smask, labels=ids).loss).backward()
        return take_grads(fm)

    g0 = combined()
    fm.gradient_checkpointing_enable({"use_reentrant": reentrant})
    assert_grads_close(g0, combined(), **FP32)
