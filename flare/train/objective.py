"""One forward pass and its summed loss, for each model family and task kind.

Losses are *sums* over loss units (answer tokens for decoders, examples for encoders); the training
loop divides by the global batch's unit count (see batching.py). Decoders ask the model for the
logits of the last ``answer_len + 1`` positions only (``logits_to_keep``, where the model supports
it): the prompt's logits are never needed, and at Llama 3's 128k vocabulary they would be 2 GB for
a 32 x 128 batch in fp32.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .batching import IGNORE

# mt_*: FLARE MT's NLLB inputs and alignment (flare.modeling.mt_align), present only for that method
_MODEL_KEYS = ("input_ids", "attention_mask", "source_input_ids", "source_attention_mask",
               "mt_input_ids", "mt_attention_mask", "mt_alignment")  # fmt: skip


def supports_logits_to_keep(model) -> bool:
    base = model
    for attr in ("module", "base_model"):  # DDP wrapper, FlareModel
        base = getattr(base, attr, base)
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def model_inputs(batch: dict, device: torch.device, use_source: bool) -> dict:
    out = {}
    for key in _MODEL_KEYS:
        if key in batch and (use_source or not key.startswith("source_")):
            out[key] = batch[key].to(device, non_blocking=True)
    return out


def loss_sum(
    model, batch: dict, family: str, kind: str, device: torch.device, *, use_source: bool, logits_to_keep: bool
) -> torch.Tensor:
    """Summed loss of one micro-batch (fp32 scalar)."""
    inputs = model_inputs(batch, device, use_source)
    if family == "decoder":
        answer_len = batch["answer_len"]
        keep = answer_len + 1
        if logits_to_keep:
            inputs["logits_to_keep"] = keep
        logits = model(**inputs).logits[:, -keep:]
        targets = batch["labels"][:, -answer_len:].to(device)
        pred = logits[:, :-1].float()
        return F.cross_entropy(
            pred.reshape(-1, pred.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
    out = model(**inputs)
    if kind == "classification":
        return F.cross_entropy(out.logits.float(), batch["class_labels"].to(device), reduction="sum")
    start = F.cross_entropy(out.start_logits.float(), batch["start_positions"].to(device), reduction="sum")
    end = F.cross_entropy(out.end_logits.float(), batch["end_positions"].to(device), reduction="sum")
    return (start + end) / 2
