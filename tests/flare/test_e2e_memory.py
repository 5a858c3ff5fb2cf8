"""The end-to-end benchmark's memory split counts live tensor storages exactly."""

from __future__ import annotations

import torch

from benchmarks.e2e_memory import LiveBytes, memory_split


def test_live_bytes_counts_storages_once_and_frees_them():
    weight = torch.ones(256)  # made before the mode: its views are not new memory
    with LiveBytes() as mem:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[10:]  # same storage
        a.add_(1)  # in place: same storage
        w = weight.detach()  # a view of a tensor the mode did not see made
        b = a * 2  # 4000 more
        assert mem.live == 8000 and mem.peak == 8000
        del a  # the view keeps the storage alive
        assert mem.live == 8000
        del view, b
        assert mem.live == 0 and mem.peak == 8000
    del w


def test_memory_split_of_a_linear_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    model[0].weight.requires_grad_(False)
    x = torch.randn(16, 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(x).sum().backward()
    opt.step()
    split = memory_split(model, opt, lambda: model(x).sum())
    trainable = (32 + 32 + 1) * 4  # bias 1, weight 2, bias 2 (float32)
    state = 2 * trainable + 3 * 4  # AdamW: exp_avg, exp_avg_sq, and a float32 step per parameter
    assert split["weights_mib"] * 2**20 == 64 * 32 * 4
    assert split["adapters_optimizer_mib"] * 2**20 == trainable + state
    # Saved for the backward: ReLU's output (16 x 32 floats, which the second linear reads too) and
    # the loss; x and the frozen weight existed before the step, the pre-ReLU output is freed.
    assert split["saved_activations_mib"] * 2**20 == 16 * 32 * 4 + 4
    static = (64 * 32 * 4 + trainable + state) / 2**20
    assert split["step_peak_mib"] == static + max(
        split["forward_peak_mib"], split["saved_activations_mib"] + split["recompute_peak_mib"]
    )
