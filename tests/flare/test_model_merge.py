"""Stage-1 merge: W <- dequant(W0) + s B A, re-quantized to NF4 exactly as bitsandbytes would quantize W."""

from __future__ import annotations

import pytest
import torch

import flare
from flare.modeling.merge import merge_report, merged_dense_weight
from flare.testing import assert_close_scaled, make_flare, random_streams
from flare_kernels import NF4Weight

FP32 = dict(rtol=1e-5, atol=1e-7)
# Half the widest gap between adjacent NF4 levels (-1.0 and -0.6961928): the worst rounding error.
NF4_HALF_GAP = (1.0 - 0.6961928) / 2


def _stage1(lora_scale=0.05, **config):
    return make_flare("llama", config=flare.FlareConfig(fusion="none", **config), lora_scale=lora_scale).train()


def test_requantized_bytes_are_bitsandbytes_quantization_of_the_merge():
    import bitsandbytes.functional as bnbf

    fm = _stage1()
    expected = {path: merged_dense_weight(m) for path, m in fm.projections().items()}
    merged = fm.merge_and_requantize()
    modules = dict(merged.named_modules())
    for path, w in expected.items():
        layer = modules[path]
        assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_state.blocksize == 64
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(layer.weight.data.view(torch.uint8).reshape(-1), packed.view(torch.uint8).reshape(-1)), path
        assert torch.equal(layer.weight.quant_state.absmax, state.absmax), path
        assert torch.equal(layer.weight.quant_state.state2.absmax, state.state2.absmax), path
        ours = NF4Weight.from_bnb(layer).dequantize(torch.float32)
        assert torch.equal(ours, bnbf.dequantize_4bit(packed, state).float()), path
        # The per-value bound of NF4 rounding with the stored (double-quantized) block absmax.
        nf4 = NF4Weight.from_bnb(layer)
        stored = nf4.absmax_fp32().repeat_interleave(64).view_as(w)
        true = w.reshape(-1, 64).abs().amax(1).repeat_interleave(64).view_as(w)
        bound = NF4_HALF_GAP * stored + (true - stored).abs() + 1e-7 * true
        assert bool(((ours - w).abs() <= bound).all()), path


def test_merged_model_against_the_unquantized_merge():
    """Logits of the re-quantized model vs the adapter model (= the unquantized merge, in fp32)."""
    fm = _stage1(modules_to_save=("lm_head",))
    ids, mask, _, _ = random_streams("llama", seed=1)
    with torch.no_grad():
        adapter = fm(ids, mask).logits
        with fm.disable_adapters():
            base = fm(ids, mask).logits
    reports = [merge_report(m) for m in fm.projections().values()]
    trained_head = fm.saved_modules()["lm_head"].trained_module.weight.detach().clone()
    dense = fm.merge_and_requantize()
    dense.train()  # bitsandbytes' dequantize path (its eval-mode CPU path repacks to bf16)
    assert torch.equal(dense.lm_head.weight, trained_head)
    with torch.no_grad():
        merged = dense(input_ids=ids, attention_mask=mask).logits
    err = (merged - adapter).norm() / (adapter - base).norm()
    # The update is ~0.7 of ||W0|| here and ~0.84 of it survives re-quantization (merge_report):
    # the merged model must sit much closer to the adapter model than the unmerged base does.
    assert err < 0.5, f"merged model error {err:.3f} of the update's effect"
    assert min(r["update_kept"] for r in reports) > 0.6
    assert max(r["requant_error"] for r in reports) < 0.12


def test_small_updates_are_reported_as_lost():
    """The documented catch: an update far below the NF4 grid spacing rounds back to W0."""
    fm = _stage1(lora_scale=0.01)
    kept = [merge_report(m)["update_kept"] for m in fm.projections().values()]
    assert max(kept) < 0.5


def test_dense_merge_and_requantize_false_are_exact():
    cfg = flare.FlareConfig(fusion="none")
    fm = make_flare("xlm-roberta", config=cfg, load_in_4bit=False, lora_scale=0.05).eval()
    ids, mask, _, _ = random_streams("xlm-roberta", seed=2)
    with torch.no_grad():
        adapter = fm(ids, mask).logits
    merged = fm.merge_and_requantize()
    assert type(merged.roberta.encoder.layer[0].attention.self.query) is torch.nn.Linear
    with torch.no_grad():
        assert_close_scaled(merged(input_ids=ids, attention_mask=mask).logits, adapter, **FP32)

    fm4 = _stage1().eval()
    ids, mask, _, _ = random_streams("llama", seed=3)
    with torch.no_grad():
        adapter = fm4(ids, mask).logits
        dense = fm4.merge_and_requantize(requantize=False)
        assert_close_scaled(dense(input_ids=ids, attention_mask=mask).logits, adapter, **FP32)


def test_stage_two_on_the_merged_model():
    fm = _stage1()
    merged = fm.merge_and_requantize()
    with pytest.raises(RuntimeError, match="merged"):
        fm(torch.ones(1, 3, dtype=torch.long))
    stage2 = flare.get_flare_model(merged, flare.FlareConfig(fusion="add_relu")).train()
    ids, mask, sids, smask = random_streams("llama", seed=4)
    with torch.no_grad():
        fresh = stage2(ids, mask, sids, smask).logits  # zero B: the adapter is a no-op
        with stage2.disable_adapters():
            base = stage2(ids, mask).logits
    assert_close_scaled(fresh, base, **FP32)
    labels = torch.where(mask.bool(), ids, -100)
    stage2(ids, mask, sids, smask, labels=labels).loss.backward()
    assert all(p.grad is not None for p in stage2.trainable_parameters())


def test_fusing_adapter_cannot_be_merged():
    fm = make_flare("llama", config=flare.FlareConfig(fusion="add_relu"))
    with pytest.raises(ValueError, match="only a plain LoRA adapter can be merged"):
        fm.merge_and_requantize()
