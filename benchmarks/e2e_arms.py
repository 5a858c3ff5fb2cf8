"""The end-to-end benchmark's arms: how each implementation trains, checkpoints, runs its source
pass alone and decodes (``e2e.py`` measures them).

* ``OursArm``: ``flare.get_flare_model``; with ``two_stream`` FLARE (fusion in q_proj / v_proj),
  without it plain QLoRA on the same kernels.
* ``AuthorsArm``: PEFT + bitsandbytes with FLARE as the authors' code runs it (see its doc).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch


class OursArm:
    """flare.get_flare_model. Training: the source pass (no grad, records the q/v inputs), then the
    target pass; decoding: one batch [source; target] through the fused projections."""

    def __init__(self, model, size, two_stream: bool) -> None:
        import flare

        self.two_stream = two_stream
        self.model = flare.get_flare_model(model, flare.FlareConfig(r=size.r, lora_alpha=2 * size.r, fusion="add_relu"))

    def parameters(self):
        return self.model.trainable_parameters()

    def set_checkpointing(self, on: bool) -> None:
        if on:
            self.model.gradient_checkpointing_enable()  # non-reentrant, as transformers recommends
        else:
            self.model.gradient_checkpointing_disable()

    @torch.no_grad()
    def source_pass(self, ids, mask, src_ids, src_mask):
        """The training step's source pass alone (what FLARE adds to a plain QLoRA step)."""
        _, _, streams, extra = self.model._two_stream_call(ids, mask, src_ids, src_mask, {})
        return self.model.capture_source(streams, extra)

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

    def __init__(self, model, size) -> None:
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

    def set_checkpointing(self, on: bool) -> None:
        base = self.model.get_base_model()
        if on and hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5's name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif on:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()

    def source_pass(self, ids, mask, src_ids, src_mask):
        return self._source_pass(src_ids, src_mask, decoder_only=True, use_cache=False)

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
        # Stays "fuse" through the backward: a checkpointed block recomputes the fused q/v (the
        # authors' code lost the fusion there; this arm measures the cost of FLARE done right).
        self.state = "fuse"
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
