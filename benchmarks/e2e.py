"""End to end: a Llama-3.1-8B-shaped decoder (a few layers, random weights, NF4 through bitsandbytes).

Three arms, each on its own freshly loaded 4-bit model with LoRA on every linear projection:

* ``ours_flare``: ``flare.get_flare_model`` (flare_kernels' fused projections; FLARE fusion in
  q_proj / v_proj, plain LoRA elsewhere); training runs the source stream as its own no-grad pass
  that keeps only the q/v inputs, decoding runs both streams in one batch.
* ``ours_qlora``: the same model called without a source: plain QLoRA on our kernels.
* ``authors_style``: PEFT ``get_peft_model`` on the bitsandbytes model; FLARE as the authors'
  code runs it: a separate no-grad pass of the frozen base decoder (adapters disabled) over the
  English input, whose q/v projection inputs are captured by hooks, then the target pass through
  the PEFT model with phi(A x_s, A x_t) done in torch inside q_proj / v_proj.

Measured: training steps (forward, backward, AdamW step on the adapters) as target tokens/s and
peak memory, with gradient checkpointing off (op ``e2e_train``) and on (``e2e_train_gc``); the
memory split of one step (``e2e_memory``, see ``e2e_memory.py``); the FLARE arms' source pass alone
(``e2e_source_pass``: what FLARE adds to a plain QLoRA step); greedy decoding tokens/s at batch 1 and 8 (ours: ``FlareModel.generate``, the source
stream decoding in lockstep; authors' style: two cached passes per token). The model is a
Llama 3.1 8B layer stack (hidden 4096, 32 heads / 8 KV heads, intermediate 14336) with fewer
layers and a smaller vocabulary, so the projections dominate as they do in the full model; on a
CPU every dimension is reduced (``SIZES``).
"""

from __future__ import annotations

import gc
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch

from .e2e_arms import AuthorsArm, OursArm
from .e2e_train import TRAIN_OPS, round_robin, measure_training
from .results import Row
from .timing import Timing


@dataclass(frozen=True)
class E2ESize:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    train_batch: int
    train_len: int
    prompt_len: int
    new_tokens: int
    decode_batches: tuple[int, ...] = (1, 8)
    r: int = 16
    warmup: int = 1
    steps: int = 3

    @property
    def label(self) -> str:
        return f"{self.name}:L{self.layers}-h{self.hidden}-i{self.intermediate}-v{self.vocab}"


SIZES = {
    # Llama 3.1 8B's layer shapes; 4 of its 32 layers, a 32k vocabulary (its 128k-row lm_head
    # would be a third of this model's FLOPs); batch 16 x 128 tokens per stream (the paper's
    # max length).
    "gpu": E2ESize("llama3.1-8b-shaped", 4096, 14336, 32, 8, 4, 32000, 16, 128, 64, 64, warmup=3, steps=10),
    # This CPU: every dimension divided by 8 (hidden 512, intermediate 1792, 8 / 2 heads of 64).
    # 5 interleaved rounds: on the shared 2-core machine 3 samples let one load spike set a median.
    "cpu": E2ESize("llama3.1-8b-shaped/8", 512, 1792, 8, 2, 2, 1024, 4, 64, 16, 8, steps=5),
    # Seconds, for the harness tests.
    "tiny": E2ESize("tiny-llama", 64, 128, 4, 2, 2, 100, 2, 16, 8, 4, r=8, warmup=1, steps=2),
}
ARMS = ("ours_flare", "ours_qlora", "authors_style")


def flare_missing() -> str | None:
    """Why the ``flare`` package cannot run the ours arms here, or None."""
    try:
        import flare
    except Exception as exc:
        return f"the flare package cannot be imported ({type(exc).__name__}: {exc})"
    if not callable(getattr(flare, "get_flare_model", None)) or not hasattr(flare, "FlareConfig"):
        return "flare.get_flare_model / flare.FlareConfig are not there yet (the FLARE fine-tuning issue)"
    return None


# ------------------------------------------------------------------------------------------ model
def save_random_model(size: E2ESize, directory: str) -> None:
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, num_hidden_layers=size.layers,
        max_position_embeddings=max(256, size.train_len, size.prompt_len + size.new_tokens),
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(directory)


def load_4bit(directory: str, dev: torch.device):
    """The checkpoint loaded as users load it: transformers + BitsAndBytesConfig (nf4, double quant, bf16)."""
    import transformers as tf
    from transformers.utils import logging as hf_logging

    quant = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    kwargs = {"device_map": {"": dev.index or 0}} if dev.type == "cuda" else {}
    hf_logging.disable_progress_bar()
    try:
        return tf.LlamaForCausalLM.from_pretrained(directory, quantization_config=quant, dtype=torch.bfloat16,
                                                   attn_implementation="sdpa", **kwargs)  # fmt: skip
    finally:
        hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------ suite
def _batch(size: E2ESize, batch: int, length: int, dev: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, size.vocab, (batch, length), generator=g).to(dev)
    return ids, torch.ones_like(ids)


def _make_runner(arm: str, model, size: E2ESize):
    if arm == "authors_style":
        return AuthorsArm(model, size)
    return OursArm(model, size, two_stream=arm == "ours_flare")


def _ratio_rows(timings: dict[str, Timing], op: str, mode: str, size: E2ESize, m) -> list[Row]:
    """ratio_to_ours: arm time / ours_flare time in the same cell (> 1: ours_flare is faster)."""
    ref = timings.get("ours_flare")
    if ref is None:
        return []
    return [Row(op, arm, mode, size.label, size.r, m, "ratio_to_ours", t.p50 / ref.p50, t.p20 / ref.p80,
                t.p80 / ref.p20) for arm, t in timings.items() if arm != "ours_flare"]  # fmt: skip


def _decode_rows(runners: dict, size: E2ESize, dev: torch.device, b: int) -> tuple[list[Row], dict[str, Timing]]:
    p_ids, p_mask = _batch(size, b, size.prompt_len, dev, seed=3)
    s_ids, s_mask = _batch(size, b, size.prompt_len, dev, seed=4)
    n = size.new_tokens
    calls = {arm: (lambda r=r: r.generate(p_ids, p_mask, s_ids, s_mask, n)) for arm, r in runners.items()}
    with torch.no_grad():
        timings = round_robin(calls, dev, max(1, size.warmup // 2), max(2, size.steps // 2))
    rows: list[Row] = []
    for arm, t in timings.items():
        head = ("e2e_decode", arm, "decode", size.label, size.r, b)
        rows += [
            Row(*head, "ms_per_token", t.p50 / n, t.p20 / n, t.p80 / n),
            Row(*head, "tokens_per_s", b * n / t.p50 * 1e3, b * n / t.p80 * 1e3, b * n / t.p20 * 1e3),
        ]
    return rows, timings


def run_e2e(size: E2ESize, dev: torch.device, *, arms=ARMS,
            log: Callable[[str], None] = print) -> tuple[list[Row], dict]:  # fmt: skip
    """Train (checkpointing off, then on) and decode with every arm, the arms' steps interleaved
    (``e2e_train.py``); returns the CSV rows and notes for the environment JSON."""
    from tqdm.auto import tqdm

    notes: dict = {"size": size.label, "skipped": {}, "timing": "arms interleaved round robin (e2e_train.py)"}
    why = flare_missing()
    if why:
        for arm in arms:
            if arm.startswith("ours"):
                notes["skipped"][arm] = why
                log(f"e2e: skipping {arm}: {why}")
        arms = [a for a in arms if not a.startswith("ours")]
    rows: list[Row] = []
    tokens = size.train_batch * size.train_len
    runners: dict = {}
    with tempfile.TemporaryDirectory() as ckpt:
        save_random_model(size, ckpt)
        for arm in arms:
            try:
                runners[arm] = _make_runner(arm, load_4bit(ckpt, dev), size)  # fresh per arm: wrapped in place
            except Exception as exc:  # an arm failing must not lose the others
                notes.setdefault("failures", []).append(f"{arm}: {type(exc).__name__}: {exc}")
                log(f"e2e: {arm} FAILED: {type(exc).__name__}: {exc}")
    ids, mask = _batch(size, size.train_batch, size.train_len, dev, seed=1)
    src_ids, src_mask = _batch(size, size.train_batch, size.train_len, dev, seed=2)
    steps = [(TRAIN_OPS[gc_on], gc_on) for gc_on in (False, True)] + [("e2e_decode", b) for b in size.decode_batches]
    bar = tqdm(steps, desc="e2e", unit="meas", file=sys.stderr, dynamic_ncols=True)
    try:
        for op, what in bar:
            bar.set_postfix_str(f"{op} {what}", refresh=False)
            try:
                if op == "e2e_decode":
                    for r in runners.values():
                        r.model.eval()
                    new, timings = _decode_rows(runners, size, dev, what)
                    rows += new + _ratio_rows(timings, op, "decode", size, what)
                    notes.setdefault("median_decode_ms", {}).update(
                        {f"{a}@B={what}": round(t.p50, 3) for a, t in timings.items()})  # fmt: skip
                else:
                    new, timings = measure_training(runners, (ids, mask, src_ids, src_mask), size, dev, what)
                    mode = "train_gc" if what else "train"
                    rows += new + _ratio_rows(timings, op, mode, size, tokens)
                    notes[f"median_{mode}_ms"] = {a: round(t.p50, 3) for a, t in timings.items()}
            except Exception as exc:
                notes.setdefault("failures", []).append(f"{op} {what}: {type(exc).__name__}: {exc}")
                log(f"e2e: {op} {what} FAILED: {type(exc).__name__}: {exc}")
    finally:
        runners.clear()
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    notes["train_tokens_per_step"] = tokens
    notes["decode"] = f"prompt {size.prompt_len} tokens, {size.new_tokens} new tokens, greedy, no EOS stop"
    return rows, notes


__all__ = ["ARMS", "SIZES", "E2ESize", "flare_missing", "run_e2e"]
