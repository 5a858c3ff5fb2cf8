"""FLARE training: stage 1 (plain LoRA on English, merged and re-quantized) and stage 2 (FLARE on
the target language with the English source), with exact resumption and DDP.

    from flare.train import TrainConfig, train
    result = train()                                   # the built-in default
    result = train(TrainConfig(task="xnli", model="meta-llama/Llama-3.1-8B", languages=("sw",)))
"""

from .config import TrainConfig


def __getattr__(name):  # the runner imports flare.evaluate, which imports this package's batching
    if name in ("train", "TrainResult"):
        from . import runner

        return getattr(runner, name)
    if name == "TrainingStopped":
        from .loop import TrainingStopped

        return TrainingStopped
    raise AttributeError(f"module 'flare.train' has no attribute {name!r}")


__all__ = ["TrainConfig", "TrainResult", "TrainingStopped", "train"]
