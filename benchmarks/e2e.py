"""End to end: a Llama-3.1-8B-shaped decoder (a few layers, random weights, NF4 through bitsandbytes).

Three arms, each on its own freshly loaded 4-bit model with LoRA on every linear projection:

* ``ours_flare``: ``flare.get_flare_model`` (flare_kernels' fused projections; FLARE fusion in
  q_proj / v_proj, plain LoRA elsewhere), both streams in one batch.
* ``ours_qlora``: the same model called without a source: plain QLoRA on our kernels.
* ``authors_style``: PEFT ``get_peft_model`` on the bitsandbytes model; FLARE as the authors'
  code runs it: a separate no-grad pass of the frozen base decoder (adapters disabled) over the
  English input, whose q/v projection inputs are captured by hooks, then the target pass through
  the PEFT model with phi(A x_s, A x_t) done in torch inside q_proj / v_proj.

Measured: training steps (forward, backward, AdamW step on the adapters) as target tokens/s and
peak memory; greedy decoding tokens/s at batch 1 and 8 (ours: ``FlareModel.generate``, the source
stream decoding in lockstep; authors' style: two cached passes per token). The model is a
Llama 3.1 8B layer stack (hidden 4096, 32 heads / 8 KV heads, intermediate 14336) with fewer
layers and a smaller vocabulary, so the projections dominate as they do in the full model; on a
CPU every dimension is reduced (``SIZES``).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .results import Row
from .timing import Timing, summarize


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
    "cpu": E2ESize("llama3.1-8b-shaped/8", 512, 1792, 8, 2, 2, 1024, 4, 64, 16, 8),
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


# ------------------------------------------------------------------------------------------ arms
class OursArm:
    """flare.get_flare_model: one batch [source; target] through the fused projections."""

    def __init__(self, model, size: E2ESize, two_stream: bool) -> None:
        import flare

        self.two_stream = two_stream
        self.model = flare.get_flare_model(model, flare.FlareConfig(r=size.r, lora_alpha=2 * size.r, fusion="add_relu"))

    def parameters(self):
        return self.model.trainable_parameters()

    def train_forward(self, ids, mask, src_ids, src_mask, labels):
        if not self.two_stream:
            src_ids = src_mask = None
        return self.model(ids, mask, source_input_ids=src_ids, source_attention_mask=src_mask, labels=labels).loss

    def generate(self, ids, mask, src_ids, src_mask, new_tokens: int):
        if not self.two_stream:
            src_ids = src_mask = None
        return self.model.generate(ids, mask, source_input_ids=src_ids, source_attention_mask=src_mask,
                                   max_new_tokens=new_tokens, eos_token_id=[])  # fmt: skip


class AuthorsArm:
    """PEFT + bitsandbytes with FLARE as two separate passes and the fusion in torch."""

    FUSED = ("q_proj", "v_proj")

    def __init__(self, model, size: E2ESize) -> None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=size.r, lora_alpha=2 * size.r, lora_dropout=0.0, target_modules="all-linear",
                            task_type="CAUSAL_LM")  # fmt: skip
        self.model = get_peft_model(model, config)
        self.state: str | None = None  # "capture" (source pass) | "fuse" (target pass) | None
        self.captured: dict[str, torch.Tensor] = {}
        fused = 0
        for name, module in self.model.named_modules():
            if name.endswith(self.FUSED) and hasattr(module, "lora_A") and hasattr(module, "base_layer"):
                module.register_forward_pre_hook(self._capture_hook(name))
                module.forward = self._fused_forward(name, module, module.forward)
                fused += 1
        if fused == 0:
            raise RuntimeError("no q_proj / v_proj LoRA layers found to fuse")

    def parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def _capture_hook(self, name: str):
        def hook(module, args):
            if self.state == "capture":
                self.captured[name] = args[0].detach()

        return hook

    def _fused_forward(self, name: str, module, original: Callable):
        from flare_kernels.reference.fusion import fuse

        def forward(x, *args, **kwargs):
            if self.state != "fuse":
                return original(x, *args, **kwargs)
            src = self.captured[name]
            result = module.base_layer(x).clone()  # PEFT clones the 4-bit base output
            lora_a, lora_b = module.lora_A["default"], module.lora_B["default"]
            dtype = lora_a.weight.dtype
            z = fuse(lora_a(src.to(dtype)), lora_a(x.to(dtype)), "add_relu")
            return result + (lora_b(z) * module.scaling["default"]).to(result.dtype)

        return forward

    @contextlib.contextmanager
    def _stage(self, state: str):
        self.state = state
        try:
            yield
        finally:
            self.state = None

    def _source_pass(self, src_ids, src_mask, *, decoder_only: bool, **kwargs):
        """The frozen base model over the English input (adapters off, no grad), capturing q/v inputs."""
        with torch.no_grad(), self.model.disable_adapter(), self._stage("capture"):
            target = self.model.get_base_model()
            if decoder_only:  # training needs only the hidden states, not the source logits
                return target.model(input_ids=src_ids, attention_mask=src_mask, **kwargs)
            return target(input_ids=src_ids, attention_mask=src_mask, **kwargs)

    def train_forward(self, ids, mask, src_ids, src_mask, labels):
        self._source_pass(src_ids, src_mask, decoder_only=True, use_cache=False)
        with self._stage("fuse"):
            return self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss

    @torch.no_grad()
    def generate(self, ids, mask, src_ids, src_mask, new_tokens: int):
        """Greedy lockstep decoding: per token, a cached source pass, then a cached fused target pass."""
        cache_s = cache_t = None
        step_s, step_t = src_ids, ids
        for _ in range(new_tokens):
            out_s = self._source_pass(step_s, src_mask, decoder_only=False, past_key_values=cache_s,
                                      use_cache=True, logits_to_keep=1)  # fmt: skip
            with self._stage("fuse"):
                out_t = self.model(input_ids=step_t, attention_mask=mask, past_key_values=cache_t, use_cache=True,
                                   logits_to_keep=1)  # fmt: skip
            cache_s, cache_t = out_s.past_key_values, out_t.past_key_values
            step_s = out_s.logits[:, -1].argmax(-1, keepdim=True)
            step_t = out_t.logits[:, -1].argmax(-1, keepdim=True)
            src_mask = torch.cat([src_mask, src_mask.new_ones(src_mask.shape[0], 1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            ids = torch.cat([ids, step_t], dim=1)
        return ids


# ------------------------------------------------------------------------------------------ timing
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time_steps(fn: Callable[[], object], dev: torch.device, warmup: int, steps: int) -> Timing:
    for _ in range(warmup):
        fn()
    _sync(dev)
    samples = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples, "wall clock per step")


def _peak_mib(fn: Callable[[], object], dev: torch.device, resident_bytes: int) -> float | None:
    """CUDA: peak allocated during one step (everything: weights, activations, optimizer state).
    CPU: bytes of the model and optimizer state + peak resident-set growth during one step."""
    from .timing import _cpu_peak_reset, _cpu_peak_since

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) / 2**20
    before = _cpu_peak_reset()
    fn()
    grown = _cpu_peak_since(before)
    return None if grown is None else (grown + resident_bytes) / 2**20


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def _batch(size: E2ESize, batch: int, length: int, dev: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, size.vocab, (batch, length), generator=g).to(dev)
    return ids, torch.ones_like(ids)


# ------------------------------------------------------------------------------------------ suite
def run_e2e(size: E2ESize, dev: torch.device, *, arms=ARMS,
            log: Callable[[str], None] = print) -> tuple[list[Row], dict]:  # fmt: skip
    """Train and decode with every arm; returns the CSV rows and notes for the environment JSON."""
    from tqdm.auto import tqdm

    notes: dict = {"size": size.label, "skipped": {}}
    why = flare_missing()
    if why:
        for arm in arms:
            if arm.startswith("ours"):
                notes["skipped"][arm] = why
                log(f"e2e: skipping {arm}: {why}")
        arms = [a for a in arms if not a.startswith("ours")]
    rows: list[Row] = []
    train: dict[str, Timing] = {}
    decode: dict[tuple[str, int], Timing] = {}
    tokens = size.train_batch * size.train_len
    with tempfile.TemporaryDirectory() as ckpt:
        save_random_model(size, ckpt)
        bar = tqdm(total=len(arms) * (1 + len(size.decode_batches)), desc="e2e", unit="meas", file=sys.stderr,
                   dynamic_ncols=True)  # fmt: skip
        for arm in arms:
            try:
                model = load_4bit(ckpt, dev)  # fresh per arm: wrappers change it in place
                if arm == "authors_style":
                    runner = AuthorsArm(model, size)
                else:
                    runner = OursArm(model, size, two_stream=arm == "ours_flare")
                net = runner.model
                ids, mask = _batch(size, size.train_batch, size.train_len, dev, seed=1)
                src_ids, src_mask = _batch(size, size.train_batch, size.train_len, dev, seed=2)
                optimizer = torch.optim.AdamW(runner.parameters(), lr=1e-4)

                def step():
                    optimizer.zero_grad(set_to_none=True)
                    loss = runner.train_forward(ids, mask, src_ids, src_mask, labels=ids)
                    loss.backward()
                    optimizer.step()

                net.train()
                bar.set_postfix_str(f"{arm} train", refresh=False)
                t = _time_steps(step, dev, size.warmup, size.steps)
                mem = _peak_mib(step, dev, _state_bytes(net, optimizer))
                train[arm] = t
                head = ("e2e_train", arm, "train", size.label, size.r, tokens)
                rows += [
                    Row(*head, "step_ms", t.p50, t.p20, t.p80),
                    Row(*head, "tokens_per_s", tokens / t.p50 * 1e3, tokens / t.p80 * 1e3, tokens / t.p20 * 1e3),
                ]
                if mem is not None:
                    rows.append(Row(*head, "peak_mem_mib", mem))
                bar.update()
                optimizer.state.clear()  # free the moments before decoding
                net.eval()
                for b in size.decode_batches:
                    bar.set_postfix_str(f"{arm} decode B={b}", refresh=False)
                    p_ids, p_mask = _batch(size, b, size.prompt_len, dev, seed=3)
                    s_ids, s_mask = _batch(size, b, size.prompt_len, dev, seed=4)
                    n = size.new_tokens
                    with torch.no_grad():
                        t = _time_steps(lambda: runner.generate(p_ids, p_mask, s_ids, s_mask, n), dev,
                                        max(1, size.warmup // 2), max(2, size.steps // 2))  # fmt: skip
                    decode[(arm, b)] = t
                    new = b * n
                    head = ("e2e_decode", arm, "decode", size.label, size.r, b)
                    rows += [
                        Row(*head, "ms_per_token", t.p50 / n, t.p20 / n, t.p80 / n),
                        Row(*head, "tokens_per_s", new / t.p50 * 1e3, new / t.p80 * 1e3, new / t.p20 * 1e3),
                    ]
                    bar.update()
            except Exception as exc:  # an arm failing must not lose the others
                notes.setdefault("failures", []).append(f"{arm}: {type(exc).__name__}: {exc}")
                log(f"e2e: {arm} FAILED: {type(exc).__name__}: {exc}")
            finally:
                model = runner = net = None
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        bar.close()
    ref = train.get("ours_flare")
    if ref is not None:
        for arm, t in train.items():
            if arm != "ours_flare":
                rows.append(Row("e2e_train", arm, "train", size.label, size.r, tokens, "ratio_to_ours",
                                t.p50 / ref.p50, t.p20 / ref.p80, t.p80 / ref.p20))  # fmt: skip
    for (arm, b), t in decode.items():
        ref = decode.get(("ours_flare", b))
        if ref is not None and arm != "ours_flare":
            rows.append(Row("e2e_decode", arm, "decode", size.label, size.r, b, "ratio_to_ours",
                            t.p50 / ref.p50, t.p20 / ref.p80, t.p80 / ref.p20))  # fmt: skip
    notes["train_tokens_per_step"] = tokens
    notes["decode"] = f"prompt {size.prompt_len} tokens, {size.new_tokens} new tokens, greedy, no EOS stop"
    notes["median_train_ms"] = {a: round(t.p50, 3) for a, t in train.items()}
    notes["median_decode_ms"] = {f"{a}@B={b}": round(t.p50, 3) for (a, b), t in decode.items()}
    return rows, notes


__all__ = ["ARMS", "SIZES", "E2ESize", "flare_missing", "run_e2e"]
