"""Cached lockstep decoding equals recomputing the full two-stream forward at every step.

Reference: at step t, the full two-stream forward (FlareModel.forward, no cache) over the target
and source sequences so far; its last-position logits must equal the cached step's (fp32, see
test_model_two_stream for the tolerance), the target token must be their argmax, and the source
token the argmax of the frozen base model over the source sequence so far. Every new target
position therefore fused with its own aligned source position (the authors broadcast one vector).
"""

from __future__ import annotations

import pytest
import torch

import flare
from flare.testing import assert_close_scaled, make_flare, random_streams
from greedy_check import assert_greedy_agree

FP32 = dict(rtol=1e-5, atol=1e-6)


def _near_argmax(logits, tokens, name):
    """Each row's token scores within twice the FP32 agreement bound of that row's best logit."""
    bound = 2 * (FP32["rtol"] * logits.double().abs().max().item() + FP32["atol"])
    gap = (logits.max(-1).values - logits.gather(-1, tokens[:, None]).squeeze(-1)).max().item()
    assert gap <= bound, f"{name}: token {gap:.3e} below the recomputed argmax (bound {bound:.3e})"


def _check_lockstep(fm, ids, mask, sids, smask, steps):
    out = fm.generate(ids, mask, sids, smask, max_new_tokens=steps, eos_token_id=[], return_dict_in_generate=True,
                      output_logits=True)  # fmt: skip
    assert out.sequences.shape == (ids.shape[0], max(ids.shape[1], sids.shape[1]) + steps)
    length = out.sequences.shape[1] - steps
    # The prompts, left-padded to a common length.
    pad_t, pad_s = length - ids.shape[1], length - sids.shape[1]
    assert torch.equal(out.sequences[:, pad_t:length], ids)
    assert torch.equal(out.source_sequences[:, pad_s:length], sids)
    mask_t = torch.cat([torch.zeros(ids.shape[0], pad_t, dtype=mask.dtype), mask], 1)
    mask_s = torch.cat([torch.zeros(sids.shape[0], pad_s, dtype=smask.dtype), smask], 1)
    ones = torch.ones(ids.shape[0], 1, dtype=mask.dtype)
    with torch.no_grad():
        for t in range(steps):
            n = length + t
            full = fm(out.sequences[:, :n], mask_t, out.source_sequences[:, :n], mask_s).logits[:, -1]
            assert_close_scaled(out.logits[t], full, **FP32, name=f"target logits, step {t}")
            # The token is the argmax of the cached logits it came from (bitwise: the same tensor); the
            # recompute runs other GEMM shapes, so its argmax may differ only at a near-tie.
            assert torch.equal(out.sequences[:, n], out.logits[t].argmax(-1)), f"target token, step {t}"
            _near_argmax(full, out.sequences[:, n], f"target token, step {t}")
            with fm.disable_adapters():
                src = fm(out.source_sequences[:, :n], mask_s).logits[:, -1]
            assert_close_scaled(out.source_logits[t], src, **FP32, name=f"source logits, step {t}")
            assert torch.equal(out.source_sequences[:, n], out.source_logits[t].argmax(-1)), f"source token, step {t}"
            _near_argmax(src, out.source_sequences[:, n], f"source token, step {t}")
            mask_t = torch.cat([mask_t, ones], 1)
            mask_s = torch.cat([mask_s, ones], 1)
    return out


@pytest.mark.parametrize(
    "arch,fusion,site",
    [
        ("llama", "add_relu", "projection_input"),
        ("llama", "mul", "residual"),
        ("gemma2", "add_relu", "projection_input"),  # sliding-window layers (window 8 < 14 positions)
        ("qwen2", "add", "residual"),
        ("mistral", "add_relu", "projection_input"),
    ],
)
def test_cached_lockstep_decoding_equals_full_recompute(arch, fusion, site):
    fm = make_flare(arch, config=flare.FlareConfig(fusion=fusion, source_site=site, modules_to_save=("lm_head",)))
    fm.eval()
    ids, mask, sids, smask = random_streams(arch, length=6, source_length=8, seed=1)
    out = _check_lockstep(fm, ids, mask, sids, smask, steps=6)
    # The source stream matters: plain-LoRA decoding of the same prompts gives other logits.
    plain = fm.generate(out.sequences[:, :8], torch.cat([torch.zeros(3, 2, dtype=mask.dtype), mask], 1),
                        max_new_tokens=1, eos_token_id=[], return_dict_in_generate=True, output_logits=True)  # fmt: skip
    assert (plain.logits[0] - out.logits[0]).abs().max() > 1e-2


def test_uncached_generate_agrees():
    fm = make_flare("llama").eval()
    ids, mask, sids, smask = random_streams("llama", length=5, seed=2)
    a = fm.generate(
        ids, mask, sids, smask, max_new_tokens=5, eos_token_id=[], return_dict_in_generate=True, output_logits=True
    )
    b = fm.generate(ids, mask, sids, smask, max_new_tokens=5, eos_token_id=[], return_dict_in_generate=True,
                    output_logits=True, use_cache=False)  # fmt: skip
    # Cached and uncached steps run other GEMM shapes: logits to fp32 rounding, tokens up to a near-tie.
    # The target reads the source stream: a row whose source tokens split at a tie is not compared on.
    start = a.sequences.shape[1] - 5
    live = assert_greedy_agree(a.source_sequences, b.source_sequences, a.source_logits, b.source_logits, start,
                               **FP32, name="source")  # fmt: skip
    live = assert_greedy_agree(a.sequences, b.sequences, a.logits, b.logits, start, **FP32, name="target", live=live)
    assert live.any(), "every row tied: nothing compared"


def test_eos_stops_rows_and_pads():
    fm = make_flare("llama").eval()
    ids, mask, sids, smask = random_streams("llama", length=5, seed=3)
    free = fm.generate(ids, mask, sids, smask, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, 5 + 1])  # row 0's second new token becomes the EOS
    out = fm.generate(ids, mask, sids, smask, max_new_tokens=6, eos_token_id=eos, pad_token_id=99)
    for row in range(3):
        new = out[row, 5:].tolist()
        if eos in new:
            k = new.index(eos)
            assert all(tok == 99 for tok in new[k + 1 :]), new
            assert new[: k + 1] == free[row, 5 : 5 + k + 1].tolist()
        else:
            assert new == free[row, 5 : 5 + len(new)].tolist()
    assert out.shape[1] <= free.shape[1]


def test_plain_generate_matches_transformers_generate():
    fm = make_flare("llama").eval()
    ids, mask, _, _ = random_streams("llama", length=6, seed=4)
    ours = fm.generate(ids, mask, max_new_tokens=5, eos_token_id=[], return_dict_in_generate=True, output_logits=True)
    theirs = fm.base_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                                    do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                                    output_logits=True)  # fmt: skip
    # Two decoding loops (their own cache and mask handling): equal up to fp32 rounding and near-ties.
    live = assert_greedy_agree(ours.sequences, theirs.sequences, ours.logits, [x.float() for x in theirs.logits],
                               ids.shape[1], **FP32, name="plain")  # fmt: skip
    assert live.any(), "every row tied: nothing compared"


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    fm = make_flare("llama").eval()
    ids, mask, sids, smask = random_streams("llama", length=5, seed=5)
    kw = dict(max_new_tokens=5, eos_token_id=[], do_sample=True, temperature=0.9, top_p=0.9)
    a = fm.generate(ids, mask, sids, smask, generator=torch.Generator().manual_seed(1), **kw)
    b = fm.generate(ids, mask, sids, smask, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)
    greedy = fm.generate(ids, mask, sids, smask, max_new_tokens=5, eos_token_id=[])
    top1 = fm.generate(ids, mask, sids, smask, max_new_tokens=5, eos_token_id=[], do_sample=True, top_k=1,
                       generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert torch.equal(greedy, top1)


def test_generate_refuses_what_it_cannot_do():
    ids, mask, sids, smask = random_streams("llama", length=5, seed=6)
    seq = make_flare("llama", config=flare.FlareConfig(fusion="matmul")).eval()
    with pytest.raises(ValueError, match="cannot be decoded token by token"):
        seq.generate(ids, mask, sids, smask, max_new_tokens=2)
    fm = make_flare("llama").eval()
    with pytest.raises(ValueError, match="exceeds the model's limit of 64"):
        fm.generate(ids, mask, sids, smask, max_new_tokens=60)
    with pytest.raises(ValueError, match="without source_attention_mask"):
        fm.generate(ids, mask, sids, None, max_new_tokens=2)
    enc = make_flare("xlm-roberta", load_in_4bit=False).eval()
    e_ids, e_mask, e_sids, e_smask = random_streams("xlm-roberta", length=5, seed=6)
    with pytest.raises(TypeError, match="not a generative"):
        enc.generate(e_ids, e_mask, e_sids, e_smask, max_new_tokens=2)


def test_generate_in_train_mode_with_checkpointing_is_refused():
    fm = make_flare("llama").train()
    fm.gradient_checkpointing_enable()
    ids, mask, sids, smask = random_streams("llama", length=5, seed=7)
    with pytest.raises(ValueError, match="call .eval"):
        fm.generate(ids, mask, sids, smask, max_new_tokens=2)
    fm.eval()
    assert fm.generate(ids, mask, sids, smask, max_new_tokens=2, eos_token_id=[]).shape == (3, 7)


def test_two_stream_forward_returns_no_cache_of_both_streams():
    """An eval-mode two-stream forward would otherwise return a 2B-row cache with B rows of logits."""
    fm = make_flare("llama").eval()
    ids, mask, sids, smask = random_streams("llama", length=5, seed=8)
    with torch.no_grad():
        out = fm(ids, mask, sids, smask)
        assert out.logits.shape[0] == ids.shape[0] and out.past_key_values is None
        assert fm(ids, mask).past_key_values is not None  # a plain call keeps transformers' default
        with pytest.raises(ValueError, match="decode with FlareModel.generate"):
            fm(ids, mask, sids, smask, use_cache=True)
