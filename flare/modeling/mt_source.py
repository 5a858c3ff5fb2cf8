"""FLARE MT's source stream: the frozen NLLB encoder over the TARGET text, a trainable linear map.

    E = NLLB_encoder(target text, target language code)      [B*F, Ln, d]   frozen, no grad
    x_s = M (alignment @ E) + c   (zero where no NLLB token aligns)   [B, L, hidden]  trainable M, c

``x_s`` is the source every fusion projection reads (the same tensor at every layer), in place of
the English stream's projection input; there is no English text and no source pass of the LLM.
The map is trained, so unlike the English stream this source carries gradient: the projections
take ``mt_fusion.flare_lora_source_grad`` for it (the fused kernels treat the source as constant).
Alignment: ``mt_align``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from .source_pass import key_padding_mask


class MTSource(nn.Module):
    """The frozen NLLB encoder and the trainable map into the LLM's hidden width.

    Args:
        encoder: an NLLB (M2M100) encoder module; frozen here and kept in eval mode (no dropout:
            it stands for a fixed feature extractor, as the English stream's frozen base model does).
        out_features: the LLM's fusion projections' input width (hidden size).
        model_path: where the NLLB checkpoint was loaded from (saved with the adapter; the encoder's
            weights are not).
        language_codes: dataset language -> NLLB code overrides (the built-in toy languages'
            invented codes); other languages use ``flare.translate.nllb_code``.
        tokenizer: the NLLB tokenizer (not a module; used to encode rows).
    """

    def __init__(self, encoder: nn.Module, out_features: int, *, model_path: str,
                 language_codes: dict[str, str] | None = None, tokenizer=None, dtype=torch.float32) -> None:  # fmt: skip
        super().__init__()
        d_model = int(getattr(encoder.config, "d_model", 0) or encoder.config.hidden_size)
        device = next(encoder.parameters()).device
        self.encoder = encoder.requires_grad_(False).eval()
        self.map = nn.Linear(d_model, out_features, device=device, dtype=dtype)
        self.model_path = str(model_path)
        self.language_codes = dict(language_codes or {})
        self.tokenizer = tokenizer

    def train(self, mode: bool = True) -> MTSource:
        super().train(mode)
        self.encoder.eval()  # frozen feature extractor: never dropout
        return self

    def forward(self, mt_input_ids: torch.Tensor, mt_attention_mask: torch.Tensor,
                mt_alignment: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """[B, F, Ln] ids and mask, [B, L, F*Ln] alignment -> the source x_s [B, L, out_features]."""
        if mt_input_ids.dim() != 3 or mt_attention_mask.shape != mt_input_ids.shape:
            raise ValueError(
                f"mt_input_ids and mt_attention_mask must be [batch, fields, length], got "
                f"{tuple(mt_input_ids.shape)} and {tuple(mt_attention_mask.shape)}"
            )
        b, f, ln = mt_input_ids.shape
        if mt_alignment.dim() != 3 or mt_alignment.shape[0] != b or mt_alignment.shape[2] != f * ln:
            raise ValueError(f"mt_alignment must be [{b}, L, {f * ln}], got {tuple(mt_alignment.shape)}")
        mask = mt_attention_mask.reshape(b * f, ln)
        with torch.no_grad():
            states = self.encoder(input_ids=mt_input_ids.reshape(b * f, ln), attention_mask=mask).last_hidden_state
            # An absent field (a single-sentence row of a pair task) is an all-padding sequence whose
            # states may be NaN under some attention implementations: zero them (0 * NaN would leak).
            states = torch.where(mask.bool()[..., None], states, torch.zeros((), dtype=states.dtype, device=states.device))
            pooled = mt_alignment.to(states.dtype) @ states.reshape(b, f * ln, -1)  # [B, L, d]
        mapped = self.map(pooled.to(self.map.weight.dtype))
        has_source = mt_alignment.sum(-1, keepdim=True) > 0
        return torch.where(has_source, mapped, torch.zeros((), dtype=mapped.dtype, device=mapped.device))

    def map_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"map.{k}": v for k, v in self.map.state_dict(keep_vars=True).items()}

    def extra_repr(self) -> str:
        return f"model_path={self.model_path!r}, language_codes={self.language_codes}"


@dataclasses.dataclass
class MTCapture:
    """The FLARE MT source as the fusion projections read it (``projection._fuse_captured``).

    Quacks like ``source_pass.CapturedSource`` in its target pass: ``recording`` is False and
    ``source_for`` returns the one mapped tensor for every fusion projection.

    Attributes:
        source: [B, Ls, hidden] the mapped source of the first Ls positions (the prompt).
        target_attention_mask: [B, T] the target's mask so far (sequence fusions' key mask).
        offset: position of the call's first column (KV-cached decoding: the tokens already
            cached); columns at or past Ls (generated tokens) read a zero source.
    """

    source: torch.Tensor
    target_attention_mask: torch.Tensor | None = None
    offset: int = 0
    recording: bool = False

    def source_for(self, path: str, block_index: int | None, x_t: torch.Tensor) -> torch.Tensor:
        length = x_t.shape[-2]
        s = self.source[:, self.offset : self.offset + length]
        if s.shape[1] < length:  # generated positions: no NLLB token aligns with them
            pad = s.new_zeros((s.shape[0], length - s.shape[1], s.shape[2]))
            s = torch.cat([s, pad], dim=1)
        if s.shape != x_t.shape:
            raise ValueError(
                f"{path}: the FLARE MT source has shape {tuple(s.shape)}, the projection input {tuple(x_t.shape)}; "
                "the map gives the model's hidden width, so only projections reading the hidden state can fuse it"
            )
        return s if s.dtype == x_t.dtype else s.to(x_t.dtype)

    def fusion_mask(self, x_t: torch.Tensor) -> torch.Tensor | None:
        return key_padding_mask(self.target_attention_mask, x_t)


LANGUAGES_FILE = "flare_mt_languages.json"  # beside a checkpoint: language -> NLLB code of invented languages


def load_mt_source(model_path: str, out_features: int, *, language_codes: dict[str, str] | None = None,
                   device: torch.device | str = "cpu") -> MTSource:  # fmt: skip
    """An ``MTSource`` over the NLLB checkpoint at ``model_path`` (local folder or hub name): its
    encoder (frozen; the decoder is dropped after loading) and tokenizer, a freshly initialized map.

    ``language_codes`` default to the checkpoint's ``flare_mt_languages.json`` when it has one (the
    built-in tiny NLLB defines codes for the toy task's invented languages), else none.
    """
    import json
    from pathlib import Path

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"--mt-model {model_path}: FLARE MT aligns by character offsets and needs a fast tokenizer")
    seq2seq = AutoModelForSeq2SeqLM.from_pretrained(str(model_path))
    encoder = seq2seq.get_encoder()
    encoder.config = seq2seq.config
    del seq2seq
    codes_file = Path(str(model_path)) / LANGUAGES_FILE
    if language_codes is None and codes_file.is_file():
        language_codes = json.loads(codes_file.read_text(encoding="utf-8"))
    # The map is initialized on the CPU (the CPU generator, whatever the device), then moved.
    source = MTSource(encoder, out_features, model_path=str(model_path), language_codes=language_codes,
                      tokenizer=tokenizer)  # fmt: skip
    return source.to(device)
