"""``--distributed fsdp`` on two CPU processes (gloo): the frozen 4-bit weights sharded with FSDP2, the adapters
replicated. One launch runs every two-process case (a spawn costs ~8 s of imports); the tests read its dumps.

The reference is one process taking the same global batches of 8 as two micro-batches of 4 (gradient
accumulation): each rank computes one of those micro-batches, the loss scale of 2 / units and DDP's
division by 2 are exact in binary, and the all-reduce adds the two gradients (a + b == b + a in IEEE), so
losses and adapters must be equal bit for bit, with no tolerance. (Against one unsplit batch of 8 they agree
only to float rounding, which test_ddp.py checks.)"""

import json
import os
from pathlib import Path

import pytest
import torch
from ranks import free_port
from ranks import spawn as _spawn_ranks
from safetensors.torch import load_file, save_file

WORLD = 2
COMMON = dict(epochs=1, batch_size=8, max_eval_examples=8, progress=False, checkpoint_steps=2)


def _full_cfg(out: str, **kw):
    from flare.train import TrainConfig

    # 32 rows / global batch 8: 4 steps of plain LoRA (stage 1), then 4 of FLARE add_relu (stage 2)
    return TrainConfig.builtin(output_dir=out, max_train_examples=32, stage1_epochs=1, **COMMON, **kw)


def _gc_cfg(out: str, **kw):
    from flare.train import TrainConfig

    # gradient checkpointing: 16 rows, 2 epochs of each stage = 4 steps each
    return TrainConfig.builtin(
        output_dir=out, max_train_examples=16, stage1_epochs=2, gradient_checkpointing=True,
        **{**COMMON, "epochs": 2}, **kw,
    )  # fmt: skip


def _curves(result) -> dict:
    return {s: result.loss_curve(s) for s in ("stage1", "stage2")}


def _worker(rank: int, port: int, root: str, dump: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
        FLARE_DISTRIBUTED="fsdp",
    )  # fmt: skip
    torch.set_num_threads(1)
    import shutil

    import torch.distributed as dist

    from flare.train import TrainingStopped, train
    from flare.train.checkpoint import checkpoint_dirs, trainable_state
    from flare.train.fsdp import gathered, resident_bytes
    from flare_kernels.format.nf4 import NF4Weight

    books: dict = {}
    full = train(_full_cfg(f"{root}/full"))
    books["full"] = _curves(full)
    books["bytes"] = resident_bytes(full.model)
    save_file(trainable_state(full.model), f"{dump}/full-rank{rank}.safetensors")
    full.model.save_pretrained(f"{dump}/adapter-rank{rank}")  # from any rank: the adapters are replicated
    weight = next(m for m in full.model.modules() if isinstance(m, NF4Weight))
    try:
        weight.dequantize()
        books["sharded_read"] = None
    except RuntimeError as e:
        books["sharded_read"] = str(e)
    with gathered(full.model):  # every rank gathers the whole model
        save_file({"w": weight.dequantize()}, f"{dump}/gathered-rank{rank}.safetensors")
    books["bytes_after_gather"] = resident_bytes(full.model)  # freed again on leaving the block

    gc = train(_gc_cfg(f"{root}/gc"))
    books["gc"] = _curves(gc)
    save_file(trainable_state(gc.model), f"{dump}/gc-rank{rank}.safetensors")

    # killed in stage 1 after step 3 before its checkpoint was written: resume replays from step 2
    split = _full_cfg(f"{root}/split")
    try:
        train(split, stop_after_steps=3)
    except TrainingStopped as e:
        books["stopped_at"] = [e.stage, e.step]
    if rank == 0:
        shutil.rmtree(checkpoint_dirs(Path(root) / "split" / "stage1" / "checkpoints")[-1])
    dist.barrier()
    resumed = train(split, resume=True)
    books["resumed"] = _curves(resumed)
    save_file(trainable_state(resumed.model), f"{dump}/resumed-rank{rank}.safetensors")
    with open(f"{dump}/rank{rank}.json", "w") as f:
        json.dump(books, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-process runs (dumps per rank) and the same configurations trained by one process."""
    from flare.train import train
    from flare.train.checkpoint import trainable_state
    from flare.train.fsdp import resident_bytes

    root = tmp_path_factory.mktemp("fsdp")
    dump = root / "dump"
    dump.mkdir()
    _spawn_ranks(_worker, (free_port(), str(root / "ranks"), str(dump)), world=WORLD, timeout=300)
    # one process, each global batch of 8 as the two ranks' micro-batches of 4 (see the module docstring)
    full = train(_full_cfg(str(root / "one-full"), micro_batch_size=4))
    gc = train(_gc_cfg(str(root / "one-gc"), micro_batch_size=4))
    single = {
        "full": (trainable_state(full.model), _curves(full)),
        "gc": (trainable_state(gc.model), _curves(gc)),
        "bytes": resident_bytes(full.model),
        "weight": next(p for p in full.model.projections().values()).weight.dequantize(),
    }
    books = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return dump, books, single


def _ranks(dump, name: str) -> list[dict]:
    return [load_file(str(dump / f"{name}-rank{r}.safetensors")) for r in range(WORLD)]


@pytest.mark.parametrize("case", ["full", "gc"], ids=["no-checkpointing", "gradient-checkpointing"])
def test_fsdp_matches_one_process_for_lora_and_flare(runs, case):
    """Stage 1 trains plain LoRA, stage 2 FLARE (add_relu on q/v, two streams as one batch): losses and adapters
    of two sharded processes equal one process's, bit for bit."""
    dump, books, single = runs
    ranks = _ranks(dump, case)
    assert ranks[0].keys() == ranks[1].keys() == single[case][0].keys() and len(ranks[0]) > 0
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # the replicated adapters stay bitwise identical
    moved = 0
    for k, v in single[case][0].items():
        assert torch.equal(ranks[0][k], v), k
        moved += int(k.endswith("lora_B.weight") and v.abs().max() > 0)
    assert moved > 0  # the adapters did train (B starts at zero)
    for stage, curve in single[case][1].items():
        assert len(curve) > 0 and books[0][case][stage] == curve, stage


def test_each_rank_holds_half_of_the_4bit_weights(runs):
    dump, books, single = runs
    whole = single["bytes"]["nf4"]
    # every NF4 tensor of the tiny Llama has an even byte count: FSDP2's dim-0 shards need no padding
    assert books[0]["bytes"]["nf4"] == books[1]["bytes"]["nf4"] == whole // 2 and whole % 2 == 0
    assert books[0]["bytes_after_gather"] == books[0]["bytes"]  # the gathered weights were freed again
    assert books[0]["bytes"]["adapters"] == single["bytes"]["adapters"]  # replicated, by design
    # outside its block a sharded weight refuses to be read; gathered, it is the one-process weight
    assert "sharded by FSDP" in books[0]["sharded_read"]
    for gathered in _ranks(dump, "gathered"):
        assert torch.equal(gathered["w"], single["weight"])


def test_resume_after_a_kill_under_fsdp_matches_the_uninterrupted_run(runs):
    dump, books, _ = runs
    assert books[0]["stopped_at"] == books[1]["stopped_at"] == ["stage1", 3]
    assert books[0]["resumed"] == books[0]["full"]  # loss curves, bit for bit
    full, resumed = _ranks(dump, "full")[0], _ranks(dump, "resumed")[0]
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_adapter_saved_from_either_rank_reloads(runs, tmp_path):
    """save_pretrained writes the whole adapter (PEFT layout) on any rank, with nothing to gather; it loads back."""
    import flare
    from flare.train.modeling import load_base_model
    from flare.tasks import get_task

    dump, _, _ = runs
    files = [load_file(str(dump / f"adapter-rank{r}" / "adapter_model.safetensors")) for r in range(WORLD)]
    assert files[0].keys() == files[1].keys() and all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    base_dir = next(dump.parent.glob("ranks/full/base"))
    base = load_base_model(str(base_dir), get_task("toy"), "decoder", quantize=True, device=torch.device("cpu"))
    model = flare.load_flare_model(base, str(dump / "adapter-rank1"))
    live = model.adapter_state_dict()
    assert live.keys() == files[0].keys()
    for k, v in files[0].items():
        assert torch.equal(live[k], v), k


def test_bf16_quant_storage_is_wrapped_without_copying_the_bytes(tmp_path):
    """``from_pretrained(..., bnb_4bit_quant_storage=torch.bfloat16)`` (the FSDP + QLoRA loading recipe): the
    projections read bitsandbytes' own storage, as uint8 parameters FSDP can shard, and hold the same weights
    as a uint8-storage load."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import flare
    from flare.testing import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)

    def load(storage):
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=storage,
        )  # fmt: skip
        return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)

    base = load(torch.bfloat16)
    q = base.model.layers[0].self_attn.q_proj.weight
    assert q.dtype == torch.bfloat16
    ptrs = {name: m.weight.data_ptr() for name, m in base.named_modules() if type(m).__name__ == "Linear4bit"}
    model = flare.get_flare_model(base, flare.FlareConfig())
    reference = flare.get_flare_model(load(torch.uint8), flare.FlareConfig()).projections()
    assert set(model.projections()) == set(ptrs) and len(ptrs) > 0
    for path, proj in model.projections().items():
        proj.weight.make_shardable()
        assert proj.weight.packed.dtype == torch.uint8 and proj.weight.packed.data_ptr() == ptrs[path], path
        assert torch.equal(proj.weight.dequantize(), reference[path].weight.dequantize()), path


def test_strategy_comes_from_the_option_or_the_launcher(monkeypatch):
    """``flare train --distributed`` sets FLARE_DISTRIBUTED for init_distributed; accelerate launch with an FSDP
    config (ACCELERATE_USE_FSDP=true) selects FSDP unless the option says otherwise; DDP stays the default."""
    from flare.cli import build_parser
    from flare.train.distributed import strategy_from_env

    monkeypatch.delenv("FLARE_DISTRIBUTED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert strategy_from_env() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert strategy_from_env() == "fsdp"
    monkeypatch.setenv("FLARE_DISTRIBUTED", "ddp")
    assert strategy_from_env() == "ddp"
    monkeypatch.setenv("FLARE_DISTRIBUTED", "zero3")
    with pytest.raises(ValueError, match="FLARE_DISTRIBUTED='zero3': expected one of ddp, fsdp"):
        strategy_from_env()
    assert build_parser().parse_args(["train", "--distributed", "fsdp"]).distributed == "fsdp"
    assert build_parser().parse_args(["train"]).distributed is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--distributed", "zero3"])
