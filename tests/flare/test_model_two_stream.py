"""FlareModel's two-stream forward equals the two-pass definition: losses, outputs and gradients.

FlareModel's two paths (with grad, training: a no-grad source pass recording the fusion inputs,
then the target pass alone, ``flare.modeling.source_pass``; without grad: [source; target] rows
through the stock layers as one batch, the fused op per projection, backbone hooks) and the
two-pass definition (flare.modeling.two_pass: a no-grad source pass with adapters off recording the
fusion inputs through hooks, then a target pass whose projections are recomputed by flare_kernels'
reference) share no code. Adapters are randomized (nonzero B), and each case also checks the
fusion changes the output, so a path that dropped the fusion would fail.

Two checks per case:
(A) The formulations, in float64 end to end (a ``.double()`` copy, the op on the reference backend
    with a float64 compute dtype): max error <= 1e-10 x the tensor's scale, plus 1e-10 x the largest
    gradient for gradients that are zero in exact arithmetic (cross_attention's key bias: softmax
    ignores a per-query constant). Observed ~1e-14. The no-grad (one-batch) loss and output too.
(B) The default backend's fp32 kernels (native CPU kernels when built, Triton on CUDA, else the
    reference) against the float64 two-pass value, by the flash-attention rule: relative error
    (Frobenius norm; for gradients all of them together) <= 2 x the error of the same computation
    in PyTorch fp32 (the two-pass with every projection by the reference) + 1e-6. Norms, not max
    errors: the max of a small tensor with cancellation is too noisy a statistic at model level.
    Adapters are drawn at scale 0.1 (LORA_SCALE): at 0.3 the cubic matmul fusions turn the model
    ill-conditioned and two correct fp32 implementations differ by up to 9.6x on one instance
    (native AVX2 kernels, matmul gradients); at 0.1 the measured ratio is <= 1.53 for every case
    and every native ISA (amx, avx2, scalar), while the fusion still moves the output by > 1e-2.
Dense encoders cast to float64 run check (A) only (no kernels there). Decoders run SDPA attention:
transformers' eager attention turns the fully masked rows of left padding into NaN in float64 (its
softmax runs in float32, where float64's min mask value is -inf).
"""

from __future__ import annotations

import copy

import pytest
import torch

import flare
from flare.modeling.two_pass import two_pass_forward
from flare.testing import (
    assert_close_scaled,
    assert_grads_close,
    make_flare,
    random_streams,
    take_grads,
)
from flare_kernels import FUSIONS, use_backend

FP32 = dict(rtol=1e-5, atol=1e-7)
FP64 = dict(rtol=1e-10, atol=1e-14)
SITES = ("projection_input", "residual")
LORA_SCALE = 0.1  # random adapters this large keep the model well conditioned (see (B) above)


def _flare(*args, **kwargs):
    kwargs.setdefault("lora_scale", LORA_SCALE)
    return make_flare(*args, **kwargs)


def _labels(ids, mask):
    return torch.where(mask.bool(), ids, torch.full_like(ids, -100))


def _run(model, call):
    out = call(model)
    out.loss.backward()
    return out, take_grads(model)


def _relative(value, exact) -> float:
    exact = exact.double()
    return ((value.double() - exact).norm() / exact.norm()).item()


def _flat(grads, names):
    return torch.cat([grads[n].double().reshape(-1) for n in names])


def _check_against_two_pass(fm, inputs, *, output_key="logits", **kwargs):
    """Checks (A) and (B) of the module doc; returns (one-batch output, plain-LoRA output) for ``fm``."""
    ids, mask, sids, smask = inputs
    fm.train()
    dense64 = next(fm.parameters()).dtype == torch.float64

    # (A) float64 end to end
    fm64 = fm if dense64 else copy.deepcopy(fm).double()
    for module in fm64.projections().values():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = torch.float64
    exact, g_exact = _run(fm64, lambda m: two_pass_forward(m, *inputs, compute_dtype=torch.float64, **kwargs))
    with use_backend("torch"):
        one64, g_one64 = _run(fm64, lambda m: m(ids, mask, sids, smask, **kwargs))
    assert_close_scaled(one64.loss, exact.loss, **FP64, name="loss")
    assert_close_scaled(one64[output_key], exact[output_key], **FP64, name=output_key)
    largest = max(g.abs().max().item() for g in g_exact.values())
    assert_grads_close(g_exact, g_one64, rtol=FP64["rtol"], atol=1e-10 * largest)
    with use_backend("torch"), torch.no_grad():  # no grad: the one-batch path (evaluation, decoding)
        batch64 = fm64(ids, mask, sids, smask, **kwargs)
    assert_close_scaled(batch64.loss, exact.loss, **FP64, name="loss (one batch)")
    assert_close_scaled(batch64[output_key], exact[output_key], **FP64, name=f"{output_key} (one batch)")
    if dense64:
        one = one64
    else:
        # (B) the default backend's fp32 kernels
        two, g_two = _run(fm, lambda m: two_pass_forward(m, *inputs, compute_dtype=torch.float32, **kwargs))
        one, g_one = _run(fm, lambda m: m(ids, mask, sids, smask, **kwargs))
        names = sorted(g_exact)
        for what, got, yard, ex in [
            ("loss", one.loss, two.loss, exact.loss),
            (output_key, one[output_key], two[output_key], exact[output_key]),
            ("gradients", _flat(g_one, names), _flat(g_two, names), _flat(g_exact, names)),
        ]:
            err, yardstick = _relative(got, ex), _relative(yard, ex)
            assert err <= 2 * yardstick + 1e-6, f"{what}: relative error {err:.2e}, PyTorch fp32 {yardstick:.2e}"
    with torch.no_grad():
        plain = fm(ids, mask, **kwargs)
    return one, plain


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_llama_4bit_matches_two_pass(fusion, site):
    fm = _flare("llama", config=flare.FlareConfig(fusion=fusion, source_site=site), attn_implementation="sdpa")
    inputs = random_streams("llama", length=9, source_length=7)  # the source is left-padded to 9
    out, plain = _check_against_two_pass(fm, inputs, labels=_labels(*inputs[:2]))
    gap = (out.logits - plain.logits).abs().max().item()
    if fusion == "none":
        assert gap < 1e-5, "fusion 'none' must be plain LoRA whatever the source"
    else:
        assert gap > 1e-2, f"the source stream did not change the output (max |diff| {gap:g})"


@pytest.mark.parametrize(
    "arch,fusion,site",
    [
        ("gemma2", "add_relu", "projection_input"),
        ("gemma2", "cross_attention", "residual"),
        ("qwen2", "add_relu", "residual"),  # q/k/v carry a bias
        ("qwen2", "matmul", "projection_input"),
        ("mistral", "mul", "projection_input"),
    ],
)
def test_other_decoders_match_two_pass(arch, fusion, site):
    cfg = flare.FlareConfig(fusion=fusion, source_site=site, modules_to_save=("lm_head",))
    # transformers has no SDPA for Gemma 2 and its eager attention is NaN on padded rows in float64:
    # Gemma 2 runs unpadded rows of equal length (the others cover padding and alignment).
    gemma = arch == "gemma2"
    fm = _flare(arch, config=cfg, attn_implementation="eager" if gemma else "sdpa")
    inputs = random_streams(arch, length=8, seed=3, padded=not gemma)
    out, plain = _check_against_two_pass(fm, inputs, labels=_labels(*inputs[:2]))
    assert (out.logits - plain.logits).abs().max() > 1e-2


@pytest.mark.parametrize("fusion", [f for f in FUSIONS if f != "none"])
def test_xlmr_classifier_float64_matches_two_pass(fusion):
    cfg = flare.FlareConfig(fusion=fusion, modules_to_save=("classifier",))
    fm = _flare("xlm-roberta", config=cfg, load_in_4bit=False).double()
    inputs = random_streams("xlm-roberta", length=10, source_length=12, seed=5)  # target right-padded to 12
    labels = torch.tensor([0, 2, 1])
    out, plain = _check_against_two_pass(fm, inputs, labels=labels)
    assert (out.logits - plain.logits).abs().max() > 1e-3


def test_xlmr_qa_4bit_matches_two_pass():
    cfg = flare.FlareConfig(fusion="add_relu", modules_to_save=("qa_outputs",))
    fm = _flare("xlm-roberta", config=cfg, head="question_answering")
    inputs = random_streams("xlm-roberta", length=10, seed=6)
    kwargs = dict(start_positions=torch.tensor([1, 3, 0]), end_positions=torch.tensor([2, 5, 0]))
    out, plain = _check_against_two_pass(fm, inputs, output_key="start_logits", **kwargs)
    assert_close_scaled(out.end_logits, two_pass_forward(fm, *inputs, **kwargs).end_logits, **FP32)
    assert (out.start_logits - plain.start_logits).abs().max() > 1e-2


def test_llama_sequence_classification_matches_two_pass():
    cfg = flare.FlareConfig(modules_to_save=("score",))
    fm = _flare("llama", config=cfg, head="sequence_classification", attn_implementation="sdpa")
    inputs = random_streams("llama", length=8, seed=7)
    _check_against_two_pass(fm, inputs, labels=torch.tensor([2, 0, 1]))


def test_encoder_residual_site_is_the_projection_input():
    """XLM-R has no pre-norm: its block input IS the query/value input, so both sites must agree."""
    inputs = random_streams("xlm-roberta", length=8, seed=8)
    outs = []
    for site in SITES:
        fm = _flare("xlm-roberta", config=flare.FlareConfig(source_site=site), load_in_4bit=False).double().eval()
        with torch.no_grad():
            outs.append(fm(*inputs).logits)
    assert_close_scaled(outs[0], outs[1], **FP64)


def test_decoder_sites_differ():
    """Llama's q/v read the post-norm input: the residual site must give a different model."""
    inputs = random_streams("llama", length=8, seed=9)
    outs = []
    for site in SITES:
        fm = _flare("llama", config=flare.FlareConfig(source_site=site)).eval()
        with torch.no_grad():
            outs.append(fm(*inputs).logits)
    assert (outs[0] - outs[1]).abs().max() > 1e-2


def test_without_source_is_plain_lora_and_disable_adapters_is_the_base_model():
    fm = _flare("llama", config=flare.FlareConfig(fusion="add_relu"))
    twin = _flare("llama", config=flare.FlareConfig(fusion="none"), lora_scale=0)
    twin.load_adapter_state_dict(fm.adapter_state_dict())
    pristine = flare.testing.tiny_model("llama", load_in_4bit=True)
    pristine.train()  # train mode: bitsandbytes dequantizes (no in-place CPU repacking)
    ids, mask, sids, smask = random_streams("llama", seed=10)
    fm.eval()
    twin.eval()
    with torch.no_grad():
        assert_close_scaled(fm(ids, mask).logits, twin(ids, mask).logits, **FP32)
        with fm.disable_adapters():
            base_fm = fm(ids, mask).logits
            base_fm_two = fm(ids, mask, sids, smask).logits
        base = pristine(input_ids=ids, attention_mask=mask).logits
    assert_close_scaled(base_fm, base, **FP32)
    assert_close_scaled(base_fm_two, base, **FP32)
    assert (fm(ids, mask).logits - base).abs().max() > 1e-2


def test_source_rows_run_the_frozen_base_model():
    """In a two-stream call the source rows (here: their logits, kept by generate's layout) are the
    frozen base model's, even with a trained lm_head copy."""
    from flare.modeling.context import TwoStreams, activate

    fm = _flare("llama", config=flare.FlareConfig(modules_to_save=("lm_head",))).eval()
    with torch.no_grad():
        fm.saved_modules()["lm_head"].trained_module.weight.mul_(3.0)
    ids, mask, sids, smask = random_streams("llama", seed=11)
    streams = TwoStreams(n_source=3, source_input_ids=sids, source_attention_mask=smask, keep_source_rows=True)
    with torch.no_grad():
        with activate(fm._owner, streams=streams):
            both = fm.base_model(input_ids=ids, attention_mask=mask).logits
        with fm.disable_adapters():
            source_alone = fm(sids, smask).logits
        target = fm(ids, mask, sids, smask).logits
    real = smask.bool()  # padded source positions fuse as zeros and compute base(0) there (read by nothing)
    assert_close_scaled(both[:3][real], source_alone[real], **FP32)
    assert_close_scaled(both[3:], target, **FP32)


def test_two_models_do_not_share_context():
    a = _flare("llama", seed=0).eval()
    b = _flare("llama", seed=1).eval()
    ids, mask, _, _ = random_streams("llama", seed=12)
    with torch.no_grad():
        expected = b(ids, mask).logits
        with a.disable_adapters():
            got = b(ids, mask).logits
    assert torch.equal(got, expected)


def test_padded_source_positions_fuse_as_zero_whatever_the_attention_backend():
    """The target is longer than the source, so real target tokens sit over source padding. Eager
    attention and SDPA compute different garbage at fully masked (padded) rows; the fusion reads zeros
    there, so both backends give the same model."""
    inputs = random_streams("llama", length=9, source_length=5, seed=13)
    outs = []
    for impl in ("eager", "sdpa"):
        fm = _flare("llama", attn_implementation=impl).eval()
        with torch.no_grad():
            outs.append(fm(*inputs).logits)
    real = inputs[1].bool()
    assert_close_scaled(outs[1][real], outs[0][real], **FP32)


def test_source_rows_cost_no_backward_in_the_projections(monkeypatch):
    """The fused op's backward sees target rows only: y_s carries no gradient, x_s gets none."""
    import flare_kernels.ops.custom_ops as ops

    rows = []
    inner = ops.flare_lora_bwd

    def spy(dy, x, source, *args):
        rows.append((dy.shape[0], x.shape[0], None if source is None else source.shape[0]))
        return inner(dy, x, source, *args)

    monkeypatch.setattr(ops, "flare_lora_bwd", spy)
    fm = _flare("llama").train()
    ids, mask, sids, smask = random_streams("llama", batch=3, length=8, seed=14)
    fm(ids, mask, sids, smask, labels=ids).loss.backward()
    assert len(rows) == len(fm.projections())
    # B * L target rows everywhere; the source rides along for dA only where the fusion reads it.
    n_fusion = len(fm.fusion_projections())
    assert sorted(rows, key=str) == sorted([(24, 24, 24)] * n_fusion + [(24, 24, None)] * (len(rows) - n_fusion), key=str)


def test_hidden_states_and_attentions_are_the_target_rows():
    fm = _flare("llama").eval()
    ids, mask, sids, smask = random_streams("llama", batch=3, length=8, seed=15)
    with torch.no_grad():
        out = fm(ids, mask, sids, smask, output_hidden_states=True, output_attentions=True)
        plain = fm(ids, mask, output_hidden_states=True)
    assert out.logits.shape[0] == 3
    assert len(out.hidden_states) == 3 and all(h.shape == (3, 8, 64) for h in out.hidden_states)
    assert all(a.shape[0] == 3 for a in out.attentions)
    assert_close_scaled(out.hidden_states[0], plain.hidden_states[0], rtol=0, atol=0)  # embeddings: no fusion yet


@pytest.mark.parametrize("fusion", ["matmul", "matmul_relu", "cross_attention"])
def test_sequence_fusions_do_not_depend_on_batch_padding(fusion):
    """The target's attention mask is the sequence fusions' key-padding mask: a sentence gives the
    same logits alone and right-padded in a batch with a longer one."""
    fm = _flare("xlm-roberta", config=flare.FlareConfig(fusion=fusion)).eval()
    ids, _, sids, _ = random_streams("xlm-roberta", batch=1, length=6, seed=31, padded=False)
    long_ids, _, long_sids, _ = random_streams("xlm-roberta", batch=1, length=9, seed=32, padded=False)
    pad = torch.ones(1, 3, dtype=ids.dtype)  # XLM-R's pad id
    batch_ids = torch.cat([torch.cat([ids, pad], 1), long_ids])
    batch_sids = torch.cat([torch.cat([sids, pad], 1), long_sids])
    mask = torch.cat([torch.tensor([[1] * 6 + [0] * 3]), torch.ones(1, 9, dtype=torch.long)])
    with torch.no_grad():
        alone = fm(ids, torch.ones_like(ids), sids, torch.ones_like(sids)).logits
        batched = fm(batch_ids, mask, batch_sids, mask.clone()).logits
    assert_close_scaled(batched[:1], alone, rtol=1e-5, atol=1e-5)
