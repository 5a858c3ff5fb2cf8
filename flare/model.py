"""``FlareModel``: a transformers model whose projections carry FLARE-LoRA adapters, run as two streams.

    model = get_flare_model(hf_model, FlareConfig(fusion="add_relu"))
    out = model(input_ids, attention_mask, source_input_ids=en_ids, source_attention_mask=en_mask, labels=labels)

At fusion projections the target stream fuses, position by position, with the aligned source
stream; elsewhere it gets plain LoRA; the source stream always gets the frozen base model
(adapters off, no grad). The model's head and loss see the target rows only. Without a source the
model is plain (Q)LoRA. Two paths compute this (``flare.modeling.two_pass`` holds the two-pass
definition both are tested against):

* with gradients enabled (training): a no-grad source pass that keeps only what the fusions read,
  then the target pass alone (``flare.modeling.source_pass``);
* without (evaluation, decoding): one batch ``[source rows; target rows]`` through the stock
  transformers layers, so every projection reads its (4-bit) weights once for both streams.

Conventions:
* Positions are fused one to one: both streams are padded to the same length, on the left for
  decoders and on the right for encoders (``padding_side``); streams of different lengths are
  padded here. Where the source is padding the fusion reads a zero vector (no English token there).
* Sequence-level fusions (matmul, matmul_relu, cross_attention) mix all positions of a sequence,
  future and padded ones included: in a decoder they are not causal (a warning says so) and
  ``generate`` refuses them; the per-token ones (add, mul, add_relu) are causal.
* Cost in training: the source stream does no backward work, stores one tensor per fused block
  and is not recomputed under gradient checkpointing (numbers in ``forward``).
* FLARE MT (``attach_mt_source``): no English stream; the source of every fusion projection is the
  frozen NLLB encoder's states of the TARGET text through a trainable map, aligned by character
  offsets (``flare.modeling.mt_source``, ``mt_align``); the call then takes ``mt_input_ids``,
  ``mt_attention_mask``, ``mt_alignment`` instead of ``source_input_ids``.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .config import FlareConfig
from .modeling.backbone import BackboneHooks
from .modeling.context import Owner, TwoStreams, activate, install_checkpoint_wrappers
from .modeling.inputs import align_streams, check_length, check_streams, is_decoder_model, model_max_length
from .modeling.mt_align import MT_KEYS
from .modeling.mt_source import MTCapture, MTSource
from .modeling.projection import PROJECTION_TYPES, FlareProjection4bit, FlareProjectionDense
from .modeling.source_pass import CapturedSource, run_source_pass
from .modeling.targets import Targets, resolve_targets
from .modeling.trainable_copy import TrainableCopy

PEFT_PREFIX = "base_model.model."
MT_PREFIX = "flare_mt."  # FLARE MT's map: flare_mt.map.weight [hidden, d_nllb], flare_mt.map.bias


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


class FlareModel(nn.Module):
    """A transformers model with FLARE-LoRA adapters. Build it with :func:`get_flare_model`.

    Attributes:
        base_model: the wrapped transformers model (its projections replaced in place).
        config: the :class:`FlareConfig`.
        targets: the resolved module selection (paths of adapted, fusion, saved modules).
        padding_side: "left" for decoders, "right" for encoders (how streams are aligned).
    """

    def __init__(self, model: nn.Module, config: FlareConfig, targets: Targets) -> None:
        super().__init__()
        self.base_model = model
        self.config = config
        self.targets = targets
        self._owner = Owner()
        self.padding_side = "left" if is_decoder_model(model) else "right"
        self.max_length = model_max_length(model)
        self._merged = False
        self.mt_source = None  # FLARE MT's NLLB encoder + trainable map (attach_mt_source)
        self._wrap()

    # ================================================================ construction
    def _wrap(self) -> None:
        model, cfg, t = self.base_model, self.config, self.targets
        for p in model.parameters():
            p.requires_grad_(False)
        modules = dict(model.named_modules())
        for path, block_index in t.adapted.items():
            old = modules[path]
            fusion = cfg.fusion if t.is_fusion(path) else "none"
            kwargs = dict(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, fusion=fusion,
                          cross_attention_heads=cfg.cross_attention_heads, attention_dropout=cfg.attention_dropout)
            if t.quantized[path]:
                new = FlareProjection4bit.from_bnb(old, **kwargs)
                new._flare_bnb = True  # restore a bitsandbytes Linear4bit on merge
            else:
                new = FlareProjectionDense(old, **kwargs)
            new.bind(self._owner, path, block_index, t.is_fusion(path))
            new.train(old.training)
            _set_submodule(model, path, new)
        for path in t.modules_to_save:
            wrapper = TrainableCopy(modules[path], self._owner, path)
            wrapper.train(modules[path].training)
            _set_submodule(model, path, wrapper)
        modules = dict(model.named_modules())
        self._hooks = BackboneHooks(
            modules[t.backbone] if t.backbone else model,
            self._owner,
            [modules[b] for b in t.blocks],
            capture_residuals=cfg.fuses and cfg.source_site == "residual",
        )
        self._fusion_paths = frozenset(t.fusion)
        self._fusion_blocks = frozenset(t.adapted[p] for p in t.fusion)
        # Modules transformers may give a checkpoint function (GradientCheckpointingLayer and models).
        self._checkpointable = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        forward_params = inspect.signature(model.forward).parameters
        self._accepts_use_cache = "use_cache" in forward_params

    # ================================================================ views
    def get_base_model(self) -> nn.Module:
        return self.base_model

    def attach_mt_source(self, mt_source: MTSource) -> None:
        """Make this a FLARE MT model: every fusion projection reads ``mt_source``'s mapped NLLB states
        of the target text (``forward(..., mt_input_ids=, mt_attention_mask=, mt_alignment=)``)."""
        if not isinstance(mt_source, MTSource):
            raise TypeError(f"mt_source must be an MTSource, got {type(mt_source).__name__}")
        if not self.config.fuses:
            raise ValueError("FLARE MT needs a fusing adapter config (fusion != 'none' and fusion_modules)")
        widths = {m.in_features for m in self.fusion_projections().values()}
        if widths != {mt_source.map.out_features}:
            raise ValueError(
                f"the MT map gives width {mt_source.map.out_features} but the fusion projections read {sorted(widths)}; "
                "FLARE MT fuses projections that read the hidden state (q_proj, v_proj)"
            )
        self.mt_source = mt_source

    def projections(self) -> dict[str, nn.Module]:
        """Adapted projection path -> module (``FlareProjection4bit`` / ``FlareProjectionDense``)."""
        modules = dict(self.base_model.named_modules())
        return {p: modules[p] for p in self.targets.adapted}

    def fusion_projections(self) -> dict[str, nn.Module]:
        modules = dict(self.base_model.named_modules())
        return {p: modules[p] for p in self.targets.fusion}

    def saved_modules(self) -> dict[str, TrainableCopy]:
        modules = dict(self.base_model.named_modules())
        return {p: modules[p] for p in self.targets.modules_to_save}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ================================================================ forward
    def _check_usable(self) -> None:
        if self._merged:
            raise RuntimeError("this FlareModel was merged (merge_and_requantize); wrap the returned model anew")

    def _two_stream_call(
        self, input_ids, attention_mask, source_input_ids, source_attention_mask, extra, *, keep_source_rows=False
    ):
        """Validate and align both streams; returns (input_ids, attention_mask, TwoStreams, extra)."""
        input_ids, attention_mask, source_input_ids, source_attention_mask = check_streams(
            input_ids, attention_mask, source_input_ids, source_attention_mask
        )
        pad = getattr(self.base_model.config, "pad_token_id", None)
        input_ids, attention_mask, source_input_ids, source_attention_mask, extra = align_streams(
            input_ids, attention_mask, source_input_ids, source_attention_mask,
            side=self.padding_side, pad_token_id=0 if pad is None else int(pad), extra=extra,
        )  # fmt: skip
        check_length(input_ids.shape[1], self.max_length)
        streams = TwoStreams(
            n_source=input_ids.shape[0],
            source_input_ids=source_input_ids,
            source_attention_mask=source_attention_mask,
            target_attention_mask=attention_mask,
            site=self.config.source_site,
            keep_source_rows=keep_source_rows,
        )
        return input_ids, attention_mask, streams, extra

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        source_input_ids: torch.Tensor | None = None,
        source_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ):
        """Two-stream forward; returns the wrapped model's usual output for the TARGET rows.

        Args:
            input_ids, attention_mask: [B, L] target-language tokens and mask (mask optional).
            source_input_ids, source_attention_mask: [B, L_s] English tokens of the same examples
                and their mask (required with a source). Streams of different lengths are padded
                to the longer one on ``self.padding_side``.
            labels: as the wrapped model takes them (loss over target rows only).
            **kwargs: passed to the wrapped model (``start_positions``, ``token_type_ids``, ...).
        """
        self._check_usable()
        mt_inputs = {k: v for k in MT_KEYS if (v := kwargs.pop(k, None)) is not None}
        if labels is not None:
            kwargs["labels"] = labels
        if self.training and self._accepts_use_cache:
            kwargs.setdefault("use_cache", False)  # no KV cache to build while training
        # Also for plain calls: a block recomputed under checkpointing must see disable_adapters().
        install_checkpoint_wrappers(self._checkpointable)
        if mt_inputs or self.mt_source is not None:
            return self._mt_forward(input_ids, attention_mask, source_input_ids, mt_inputs, kwargs)
        if source_input_ids is None:
            check_streams(input_ids, attention_mask, None, source_attention_mask)
            if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
                check_length(input_ids.shape[1], self.max_length)
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        input_ids, attention_mask, streams, kwargs = self._two_stream_call(
            input_ids, attention_mask, source_input_ids, source_attention_mask, kwargs
        )
        if not self.config.fuses:
            # Nothing reads the source (plain LoRA config): the same result without the source rows' cost.
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if self._accepts_use_cache:
            # The cache of a two-stream call holds the source rows too (2B rows against B of logits);
            # the output would not continue decoding. FlareModel.generate keeps both streams' caches.
            if kwargs.get("use_cache"):
                raise ValueError(
                    "use_cache=True with a source stream: the KV cache would hold both streams' rows; "
                    "decode with FlareModel.generate"
                )
            kwargs["use_cache"] = False
        if torch.is_grad_enabled():
            # A backward may follow: the source stream as its own no-grad pass (source_pass.py).
            # Measured (benchmarks/e2e.py, 8B-shaped/8, 2 layers, 4 x 64 tokens per stream, AVX2
            # EPYC, 1 thread, the two paths A/B in one session): step 1.24x plain QLoRA's against
            # 1.34x for the one batch (checkpointing on: 1.03x against 1.49x); memory by tensor
            # count 1.02x against 1.61x (on: 1.03x against 1.47x). Reading each 4-bit weight twice
            # costs nothing visible at 256 rows, nor at 1 x 16 (CPU time 101 ms against 106 for the
            # one batch; 157 against 167 with checkpointing).
            # Under no_grad the one batch stays: with no backward or saved activations to spare, it
            # wins where weight reads weigh (1 x 16 tokens: 38 against 40 ms), as in decoding. (At
            # 4 x 64 the split's early stop wins on this 2-layer model, 330 against 385 ms; it would
            # save under 1/32 of a 32-layer forward.)
            captured = self.capture_source(streams, kwargs)
            with activate(self._owner, captured=captured):
                return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        with activate(self._owner, streams=streams):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _mt_forward(self, input_ids, attention_mask, source_input_ids, mt_inputs: dict, kwargs: dict):
        """FLARE MT: one stream (the target), every fusion projection reading the mapped NLLB source.
        No English text and no source pass of the LLM: the source is computed from the target text."""
        if self.mt_source is None:
            raise ValueError("mt_input_ids given, but this FlareModel has no MT source (attach_mt_source)")
        if source_input_ids is not None:
            raise ValueError("a FLARE MT model reads no English source stream; pass mt_input_ids, not source_input_ids")
        missing = [k for k in MT_KEYS if k not in mt_inputs]
        if missing:
            raise ValueError(f"a FLARE MT model needs {', '.join(MT_KEYS)} with the input; missing {', '.join(missing)}")
        input_ids, attention_mask, _, _ = check_streams(input_ids, attention_mask, None, None)
        check_length(input_ids.shape[1], self.max_length)
        if mt_inputs["mt_alignment"].shape[1] != input_ids.shape[1]:
            raise ValueError(
                f"mt_alignment covers {mt_inputs['mt_alignment'].shape[1]} positions, input_ids {input_ids.shape[1]}"
            )
        if self._accepts_use_cache:
            kwargs["use_cache"] = False  # FlareModel.generate decodes with the cache
        captured = MTCapture(self.mt_source(**mt_inputs), target_attention_mask=attention_mask)
        with activate(self._owner, captured=captured):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def capture_source(self, streams: TwoStreams, extra: dict | None = None) -> CapturedSource:
        """The training path's source pass over ``streams``' (aligned) source batch: the frozen base
        backbone under no_grad, returning what the fusion projections read (see ``source_pass``)."""
        t = self.targets
        backbone = self.base_model.get_submodule(t.backbone) if t.backbone else self.base_model
        capture = CapturedSource(
            site=self.config.source_site,
            source_attention_mask=streams.source_attention_mask,
            target_attention_mask=streams.target_attention_mask,
            fusion_paths=self._fusion_paths,
            fusion_blocks=self._fusion_blocks,
        )
        return run_source_pass(
            self._owner, backbone, capture, streams.source_input_ids, streams.source_attention_mask, extra or {}
        )

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        source_input_ids: torch.Tensor | None = None,
        source_attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        do_sample: bool = False,
        **kwargs,
    ):
        """Decode the target stream with a KV cache, the source stream decoding greedily in lockstep.

        See :func:`flare.modeling.generation.generate` for the details and the extra options
        (``temperature``, ``top_k``, ``top_p``, ``generator``, ``use_cache``,
        ``return_dict_in_generate``, ``output_logits``).
        """
        from .modeling.generation import generate

        self._check_usable()
        mt_inputs = {k: v for k in MT_KEYS if (v := kwargs.pop(k, None)) is not None}
        if mt_inputs or self.mt_source is not None:
            from .modeling.mt_generate import mt_generate

            if source_input_ids is not None or do_sample or kwargs.get("return_dict_in_generate"):
                raise ValueError("a FLARE MT model decodes greedily from mt_input_ids alone (no source stream)")
            if self.mt_source is None or len(mt_inputs) != len(MT_KEYS):
                raise ValueError(f"FLARE MT decoding needs a model with an MT source and {', '.join(MT_KEYS)}")
            return mt_generate(self, input_ids, attention_mask, mt_inputs, max_new_tokens=max_new_tokens,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                               use_cache=kwargs.get("use_cache", True))  # fmt: skip
        return generate(
            self, input_ids, attention_mask, source_input_ids, source_attention_mask,
            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            do_sample=do_sample, **kwargs,
        )  # fmt: skip

    # ================================================================ adapters on / off
    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the frozen base model inside the block (projections without adapters, original modules_to_save)."""
        with activate(self._owner, adapters_off=True):
            yield

    # ================================================================ checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Turn on transformers' activation checkpointing (default ``use_reentrant=False``).

        FLARE's context is re-entered when a checkpointed block is recomputed, so loss and
        gradients equal those without checkpointing (dropout masks are redrawn identically from
        the restored RNG state). Checkpointing turned on by other means (e.g.
        ``peft.prepare_model_for_kbit_training``) is covered the same way.
        """
        gc_kwargs = (
            {"use_reentrant": False} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
        )
        model = self.base_model
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs, **kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs, **kwargs)
        if gc_kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
            # Reentrant checkpointing passes gradients only to blocks whose inputs require grad.
            model.enable_input_require_grads()
        self._checkpointable = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        install_checkpoint_wrappers(self._checkpointable)

    def gradient_checkpointing_disable(self) -> None:
        model = self.base_model
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        model = self.base_model
        if hasattr(type(model), "is_activation_checkpointing"):
            return bool(model.is_activation_checkpointing)
        return bool(getattr(model, "is_gradient_checkpointing", False))

    # ================================================================ parameters
    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should get: adapters, fusion parameters, modules_to_save copies."""
        return [p for _, p in self.named_trainable_parameters()]

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) numbers of values; a 4-bit weight counts its N*K values."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        for module in self.projections().values():
            if isinstance(module, FlareProjection4bit):
                total += module.out_features * module.in_features
        for p in self.base_model.parameters():
            if type(p).__name__ == "Params4bit":  # 4-bit layers left unwrapped: 2 values per byte
                total += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = self.parameter_counts()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
        )
        return trainable, total

    # ================================================================ adapter state
    def _adapter_tensors(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(kind, key in PEFT's file layout, live tensor) for every adapter tensor; kind in lora|fusion|saved."""
        for path, module in self.projections().items():
            yield "lora", f"{PEFT_PREFIX}{path}.lora_A.weight", module.lora_A.weight
            yield "lora", f"{PEFT_PREFIX}{path}.lora_B.weight", module.lora_B.weight
            if module.fusion_module is not None:
                for name, t in module.fusion_module.state_dict(keep_vars=True).items():
                    yield "fusion", f"{PEFT_PREFIX}{path}.fusion_module.{name}", t
        for path, wrapper in self.saved_modules().items():
            for name, t in wrapper.trained_module.state_dict(keep_vars=True).items():
                yield "saved", f"{PEFT_PREFIX}{path}.{name}", t
        if self.mt_source is not None:
            for name, t in self.mt_source.map_state_dict().items():
                yield "mt", f"{MT_PREFIX}{name}", t

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trained tensor (LoRA A/B, fusion parameters, modules_to_save), keyed as in the saved files.

        Keys follow PEFT's adapter layout: ``base_model.model.<module path>.lora_A.weight``,
        ``base_model.model.<path>.fusion_module.q.weight``, ``base_model.model.lm_head.weight``.
        Values are detached views of the live tensors (clone them to snapshot).
        """
        return {key: t.detach() for _, key, t in self._adapter_tensors()}

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy tensors from ``adapter_state_dict()``'s layout into the live adapters (shape-checked)."""
        live = {key: t for _, key, t in self._adapter_tensors()}
        unexpected = sorted(set(state_dict) - set(live))
        missing = sorted(set(live) - set(state_dict))
        if strict and (unexpected or missing):
            raise KeyError(f"adapter state mismatch: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                           f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")  # fmt: skip
        with torch.no_grad():
            for key, value in state_dict.items():
                if key not in live:
                    continue
                if tuple(value.shape) != tuple(live[key].shape):
                    raise ValueError(
                        f"{key}: shape {tuple(value.shape)} in the state dict, {tuple(live[key].shape)} in the model"
                    )
                live[key].copy_(value.to(device=live[key].device, dtype=live[key].dtype))

    # ================================================================ save / load / merge
    def save_pretrained(self, path, *, safe_serialization: bool = True) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's layout) and ``flare_config.json``.

        See :mod:`flare.adapter_io` for the layout and PEFT interop; safetensors only.
        """
        from .adapter_io import save_flare_adapter

        if not safe_serialization:
            raise ValueError("flare writes adapters as safetensors only (pickled files are never written or read)")
        save_flare_adapter(self, path)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path, *, is_trainable: bool = False) -> FlareModel:
        """Wrap ``model`` and load the adapter saved at ``path`` (see :func:`flare.load_flare_model`)."""
        from .adapter_io import load_flare_model

        return load_flare_model(model, path, is_trainable=is_trainable)

    def merge_and_requantize(self, *, requantize: bool = True) -> nn.Module:
        """Stage 1 of the recipe: merge this plain LoRA adapter into the base weights, re-quantized to NF4.

        W <- dequant(W0) + scaling * B A, re-quantized with W0's blocksize and double quantization
        (4-bit projections become bitsandbytes ``Linear4bit`` again; dense ones stay dense);
        modules_to_save copies replace their originals. Returns the plain transformers model, ready
        for ``get_flare_model`` with a stage-2 config; this FlareModel is unusable afterwards.
        The re-quantization error, and how much of a small update survives it, are documented in
        :mod:`flare.modeling.merge` (``merge_report`` measures it); ``requantize=False`` keeps the
        merged weights dense. Raises ValueError for an adapter that fuses a source stream.
        """
        from .modeling.merge import merge_and_requantize

        self._check_usable()
        model = merge_and_requantize(self, requantize=requantize)
        self._hooks.remove()
        self._merged = True
        return model

    def extra_repr(self) -> str:
        c = self.config
        return (f"fusion={c.fusion!r}, fusion projections={len(self.targets.fusion)}, "
                f"adapted projections={len(self.targets.adapted)}, r={c.r}, source_site={c.source_site!r}, "
                f"modules_to_save={self.targets.modules_to_save}")  # fmt: skip


def get_flare_model(model: nn.Module, config: FlareConfig | None = None) -> FlareModel:
    """Wrap a transformers model (bitsandbytes 4-bit nf4 or dense ``nn.Linear`` projections) with FLARE adapters.

    Every projection ``config`` selects is replaced in place by a ``flare_kernels`` module
    (``FlareProjection4bit``, sharing bitsandbytes' packed bytes) or, for dense layers, by
    ``FlareProjectionDense``; the base weights are frozen; adapters, fusion parameters and
    ``modules_to_save`` copies are trainable. Every selection error is raised before the model is
    changed. Call it before the model's first forward on a CPU (bitsandbytes repacks 4-bit weights
    in place on its first eval-mode CPU forward; they would then be converted back with bf16 scales).
    """
    if config is None:
        config = FlareConfig()
    if not isinstance(config, FlareConfig):
        raise TypeError(f"config must be a FlareConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module (a transformers model), got {type(model).__name__}")
    if isinstance(model, FlareModel):
        raise TypeError("model is already a FlareModel; pass the transformers model it wraps")
    targets = resolve_targets(model, config)
    flare_model = FlareModel(model, config, targets)
    if config.fuses and config.sequence_level and flare_model.padding_side == "left":
        warnings.warn(
            f"fusion {config.fusion!r} mixes all positions of a sequence, future ones included: in a causal "
            "model, position i's output then depends on the target tokens after i (a causal LM loss can read "
            "the tokens it predicts) and generate() cannot decode it token by token. The per-token fusions "
            "(add, mul, add_relu) are causal.",
            stacklevel=2,
        )
    return flare_model


__all__ = ["PROJECTION_TYPES", "FlareModel", "FlareProjection4bit", "FlareProjectionDense", "get_flare_model"]
