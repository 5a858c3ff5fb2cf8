"""What ``--distributed fsdp`` saves: per-rank bytes of the 4-bit weights and the adapters, one process
against two (FSDP2 over gloo on a CPU), on a Llama-shaped 4-bit model training FLARE (two streams).

Per rank, counted from the tensors themselves (not the allocator, so the figure is the same on any device):

* ``nf4_rest_mib``: the NF4 bytes held between steps (local shards of the sharded parameters);
* ``nf4_peak_mib``: the most NF4 bytes held at any op of a training step (forward and backward): the
  shards plus the decoder blocks FSDP2 has gathered at that moment (its all-gather staging buffer,
  live for one copy, is not counted);
* ``adapters_mib``: the trainable parameters with their gradients and AdamW's two moments (4 x fp32,
  replicated on every rank by design, see ``flare.train.fsdp``).

    python -m benchmarks.fsdp_memory --out benchmarks/results/cpu-epyc-2c/fsdp_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MIB = 2**20
# Llama-3.1-8B proportions (intermediate 3.5 x hidden, 4:1 grouped KV heads), shrunk to fit 2 CPU cores
SHAPE = dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=128)  # fmt: skip
BATCH, LENGTH, STEPS = 2, 64, 2


class _Peak(TorchDispatchMode):
    """The most NF4 bytes held at any op run under the mode."""

    def __init__(self, model) -> None:
        from flare.train.fsdp import NF4Meter

        super().__init__()
        self.meter, self.peak = NF4Meter(model), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.meter.held())
        return out


def build():
    """The FlareModel, the same on every rank. Before the process group starts: transformers' save/load
    round trip that quantizes it writes nothing on a rank other than 0 once a group is up."""
    import flare
    from flare.testing import tiny_model

    torch.manual_seed(0)
    base = tiny_model("llama", load_in_4bit=True, cache=False, **SHAPE)
    return flare.get_flare_model(base, flare.FlareConfig(r=16))


def measure(model, rank: int, world: int) -> dict:
    """One rank's figures for ``world`` processes (the process group is already up when world > 1)."""
    from flare.train.fsdp import resident_bytes, shard

    model.train()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ignore = shard(model, torch.device("cpu"), world)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        module = DistributedDataParallel(model, forward_sync_buffers=False)
    else:
        module = model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, SHAPE["vocab_size"], (BATCH, LENGTH), generator=gen)
    src = torch.randint(3, SHAPE["vocab_size"], (BATCH, LENGTH), generator=gen)
    ones = torch.ones_like(ids)
    peak = _Peak(model)
    for _ in range(STEPS):
        with peak:
            loss = module(ids, ones, source_input_ids=src, source_attention_mask=ones, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the gradients' bytes count, as they do during the step
    rest = resident_bytes(model)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    return {
        "world": world,
        "rank": rank,
        "nf4_rest_mib": rest["nf4"] / MIB,
        "nf4_peak_mib": peak.peak / MIB,
        "adapters_mib": (rest["adapters"] + grads + state) / MIB,
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = build()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    row = measure(model, rank, world)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()


def _two_processes() -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, port, d), nprocs=2, join=True)
        return [json.loads(open(os.path.join(d, f"rank{r}.json")).read()) for r in range(2)]


def table(rows: list[dict]) -> str:
    lines = [
        "| processes | rank | 4-bit weights at rest, MiB | 4-bit weights peak in a step, MiB | adapters + grads + AdamW, MiB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['world']} | {r['rank']} | {r['nf4_rest_mib']:.2f} | {r['nf4_peak_mib']:.2f} | "
                     f"{r['adapters_mib']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the rows here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(build(), 0, 1), *_two_processes()]
    shape = "L{num_hidden_layers}-h{hidden_size}-i{intermediate_size}-v{vocab_size}".format(**SHAPE)
    print(f"llama {shape}, NF4 double-quant, FLARE add_relu r=16, batch {BATCH} x {LENGTH} tokens, two streams")
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": shape, "batch": BATCH, "length": LENGTH, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
