"""The training path (``flare.modeling.source_pass``): the source stream costs one early-stopped
no-grad forward and one saved tensor per fused block, nothing else.

Loss and gradient equality with the two-pass definition is test_model_two_stream's and
test_model_checkpointing's (they run this path: they differentiate). Here: the path agrees with the
one-batch path that no_grad calls take, the source pass runs once (never recomputed under
checkpointing) and stops after the last fusion input, and the autograd graph holds, beyond plain
LoRA's, exactly the records and the rank-r source intermediates.
"""

from __future__ import annotations

import pytest
import torch

import flare
import flare.modeling.source_pass as source_pass
from flare.testing import assert_close_scaled, make_flare, random_streams

FP32 = dict(rtol=1e-5, atol=1e-7)
SITES = ("projection_input", "residual")


def _labels(ids, mask):
    return torch.where(mask.bool(), ids, torch.full_like(ids, -100))


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("fusion", ["add_relu", "cross_attention"])
def test_training_path_equals_the_one_batch_path(fusion, site):
    fm = make_flare("llama", config=flare.FlareConfig(fusion=fusion, source_site=site), lora_scale=0.1).train()
    ids, mask, sids, smask = random_streams("llama", seed=21)
    with torch.no_grad():
        one_batch = fm(ids, mask, sids, smask).logits
        plain = fm(ids, mask).logits
    split = fm(ids, mask, sids, smask).logits
    assert split.requires_grad
    assert_close_scaled(split.detach(), one_batch, **FP32)
    assert (split.detach() - plain).abs().max() > 1e-2  # the fusion is on in both


def test_disable_adapters_with_grad_is_the_base_model():
    fm = make_flare("llama", config=flare.FlareConfig(modules_to_save=("lm_head",))).train()
    ids, mask, sids, smask = random_streams("llama", seed=24)
    with torch.no_grad(), fm.disable_adapters():
        base = fm(ids, mask).logits
    with fm.disable_adapters():
        got = fm(ids, mask, sids, smask).logits
    assert_close_scaled(got.detach(), base, **FP32)
    assert (fm(ids, mask, sids, smask).logits.detach() - base).abs().max() > 1e-2


def _count_calls(module, counter, key):
    return module.register_forward_pre_hook(lambda m, a: counter.__setitem__(key, counter.get(key, 0) + 1))


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_source_pass_runs_once_and_stops_after_the_last_fusion_input(site, checkpointing, monkeypatch):
    fm = make_flare("llama", config=flare.FlareConfig(source_site=site)).train()
    if checkpointing:
        fm.gradient_checkpointing_enable()
    passes = []
    inner = source_pass.run_source_pass
    monkeypatch.setattr(source_pass, "run_source_pass", lambda *a, **k: passes.append(1) or inner(*a, **k))
    monkeypatch.setattr(flare.model, "run_source_pass", source_pass.run_source_pass)
    calls: dict = {}
    layers = fm.base_model.model.layers
    handles = [
        _count_calls(layers[0].mlp.down_proj, calls, "first_mlp"),
        _count_calls(layers[-1].mlp.down_proj, calls, "last_mlp"),
        _count_calls(layers[-1].self_attn.q_proj, calls, "last_q"),
        _count_calls(fm.base_model.model.norm, calls, "final_norm"),
    ]
    ids, mask, sids, smask = random_streams("llama", seed=22)
    fm(ids, mask, sids, smask, labels=_labels(ids, mask)).loss.backward()
    for h in handles:
        h.remove()
    assert len(passes) == 1
    recompute = 2 if checkpointing else 1  # the target pass's blocks run again in the backward
    # The source pass runs the first block whole, stops in the last one: at its q/v input
    # (projection_input) or at its block input (residual); it never reaches the final norm.
    assert calls["first_mlp"] == 1 + recompute
    assert calls["last_mlp"] == recompute
    assert calls["last_q"] == recompute + (1 if site == "projection_input" else 0)
    assert calls["final_norm"] == 1


def _saved_bytes(fm, call) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes of the distinct storages the autograd graph of ``call`` saves (weights excluded), and their shapes."""
    frozen = {p.untyped_storage().data_ptr() for p in fm.parameters()}
    frozen |= {b.untyped_storage().data_ptr() for b in fm.buffers()}
    seen: dict[int, int] = {}
    shapes = []

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in frozen and st.data_ptr() not in seen:
            seen[st.data_ptr()] = st.nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    return sum(seen.values()), shapes, out


@pytest.mark.parametrize("site", SITES)
def test_graph_keeps_only_the_records_and_rank_r_intermediates(site):
    """Beyond plain LoRA's saved tensors, FLARE's graph holds one [B, L, H] record per fused block
    (q and v share it) and each fusion projection's s_s = A x_s [B*L, r]: no source-row activation."""
    fm = make_flare("llama", config=flare.FlareConfig(source_site=site)).train()
    ids, mask, sids, smask = random_streams("llama", batch=3, length=8, seed=23)
    labels = _labels(ids, mask)
    plain, _, _ = _saved_bytes(fm, lambda: fm(ids, mask, labels=labels).loss)
    fused, shapes, _ = _saved_bytes(fm, lambda: fm(ids, mask, sids, smask, labels=labels).loss)
    hidden, r = fm.base_model.config.hidden_size, fm.config.r
    blocks = len({m.block_index for m in fm.fusion_projections().values()})
    records = blocks * 3 * 8 * hidden * 4  # fp32 activations
    intermediates = len(fm.fusion_projections()) * 3 * 8 * r * 4  # fp32 s_s
    assert fused - plain == records + intermediates
    assert all(not s or s[0] != 6 for s in shapes)  # no [source; target] (2B = 6) rows anywhere
