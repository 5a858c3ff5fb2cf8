"""More than one process: DDP over gloo on two CPU processes, set up through the environment variables
torchrun / accelerate launch set. After training, the adapter is identical on both ranks and equal (float
tolerance: all-reduce sums in another order) to one process taking the same global batches."""

import os

import torch
import torch.multiprocessing as mp
from ranks import free_port
from ranks import spawn as _spawn_ranks
from safetensors.torch import load_file, save_file

WORLD = 2


def _config(out_dir: str):
    from flare.train import TrainConfig

    # 48 rows / global batch 8 = 6 steps per stage; each process runs micro-batches of 8 / WORLD rows.
    return TrainConfig.builtin(
        output_dir=out_dir,
        epochs=1,
        batch_size=8,
        max_train_examples=48,
        max_eval_examples=8,
        progress=False,
        checkpoint_steps=3,
    )


def _worker(rank: int, port: int, out_dir: str, dump_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from flare.train import train
    from flare.train.checkpoint import trainable_state

    result = train(_config(out_dir))
    save_file(trainable_state(result.model), os.path.join(dump_dir, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


def test_two_process_ddp_matches_one_process(tmp_path):
    from flare.train import train
    from flare.train.checkpoint import trainable_state

    dump = tmp_path / "dump"
    dump.mkdir()
    mp.spawn(_worker, args=(free_port(), str(tmp_path / "ddp"), str(dump)), nprocs=WORLD, join=True)
    ranks = [load_file(str(dump / f"rank{r}.safetensors")) for r in range(WORLD)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # DDP keeps the replicas bitwise identical

    single = trainable_state(train(_config(str(tmp_path / "single"))).model)
    moved = 0
    for k, v in single.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-6)
        moved += int(k.endswith("lora_B.weight") and v.abs().max() > 0)
    assert moved > 0  # the adapters did train (B starts at zero)
    # rank 0 wrote the run's files; the checkpoints record the world size they need for resumption
    import json

    state = json.loads((tmp_path / "ddp" / "stage2" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["world_size"] == WORLD
    assert (tmp_path / "ddp" / "stage2" / "checkpoints" / "step-00000006" / "rng-rank1.safetensors").is_file()


def _init_env(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)


def _stop_worker(rank: int, port: int, out_dir: str, dump_dir: str) -> None:
    import json
    import signal

    _init_env(rank, port)
    import torch.distributed as dist

    import flare.train.loop as loop
    from flare.train import TrainingStopped, train

    if rank == 1:  # only rank 1 gets SIGINT, at its second step boundary
        real, calls = loop.StepBudget.spend, {"n": 0}

        def spend(self):
            calls["n"] += 1
            if calls["n"] == 2:
                signal.raise_signal(signal.SIGINT)
            return real(self)

        loop.StepBudget.spend = spend
    try:
        train(_config(out_dir))
        outcome = {"stopped": False}
    except TrainingStopped as e:
        outcome = {"stopped": True, "stage": e.stage, "step": e.step, "checkpoint": str(e.checkpoint)}
    with open(os.path.join(dump_dir, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    dist.destroy_process_group()


def _run_ranks(worker, tmp_path, timeout: float) -> list:
    """Spawn ``worker(rank, port, out_dir, dump_dir)`` on every rank; each rank's JSON dump."""
    import json

    dump = tmp_path / "dump"
    dump.mkdir()
    _spawn_ranks(worker, (free_port(), str(tmp_path / "ddp"), str(dump)), world=WORLD, timeout=timeout)
    return [json.loads((dump / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    outcomes = _run_ranks(_stop_worker, tmp_path, timeout=60)
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0]["stopped"] and outcomes[0]["stage"] == "stage1" and outcomes[0]["step"] == 2
    ckpt = tmp_path / "ddp" / "stage1" / "checkpoints" / "step-00000002"
    assert outcomes[0]["checkpoint"] == str(ckpt)
    assert all((ckpt / f"rng-rank{r}.safetensors").is_file() for r in range(WORLD))


def _bookkeeping_worker(rank: int, port: int, out_dir: str, dump_dir: str) -> None:
    import dataclasses
    import json

    _init_env(rank, port)
    import torch.distributed as dist

    from flare.train import train
    from flare.train.checkpoint import trainable_state

    cfg = dataclasses.replace(_config(out_dir), stages=("stage2",), eval_steps=2)
    result = train(cfg)
    s = result.stages["stage2"]
    with open(os.path.join(dump_dir, f"rank{rank}.json"), "w") as f:
        books = {"best_step": s.best_step, "best_score": s.best_score, "evals": s.evals, "adapter": str(result.adapter)}
        json.dump(books, f)
    save_file(trainable_state(result.model), os.path.join(dump_dir, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


def test_every_rank_holds_the_evaluations_and_restores_the_best_adapter(tmp_path):
    books = _run_ranks(_bookkeeping_worker, tmp_path, timeout=90)
    assert books[0] == books[1], books  # evaluations, best step and adapter path alike on every rank
    assert [e["step"] for e in books[0]["evals"]] == [2, 4, 6] and books[0]["best_step"] is not None
    best = tmp_path / "ddp" / "stage2" / "best"
    assert books[0]["adapter"] == str(best)
    saved = load_file(str(best / "trainable.safetensors"))
    for r in range(WORLD):  # every rank's returned model holds the selected adapter, not the last step's
        model = load_file(str(tmp_path / "dump" / f"rank{r}.safetensors"))
        assert model.keys() == saved.keys() and all(torch.equal(model[k], saved[k]) for k in saved)


def test_collectives_use_the_training_device(monkeypatch):
    """NCCL all-reduces CUDA tensors only: Dist.sum must hand the collective a tensor on the training device,
    whatever device the caller built it on. (No GPU needed: the "meta" device stands in for CUDA.)"""
    import torch.distributed as tdist

    from flare.train.distributed import Dist

    seen = []
    monkeypatch.setattr(tdist, "all_reduce", lambda value, op=None: seen.append(value.device))
    dist = Dist(rank=0, world=WORLD, device=torch.device("meta"))
    dist.sum(torch.tensor(7))  # e.g. a token count built from a Python int
    assert seen == [torch.device("meta")]
