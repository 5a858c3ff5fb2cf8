"""FLARE MT for a run (``flare train --method flare-mt``): the NLLB checkpoint, rows -> MT inputs.

* ``check_mt_config``: ``--mt-model`` is required outside the toy task (before any work).
* ``mt_model_path``: the NLLB checkpoint of a run; on the toy task without ``--mt-model``, the
  built-in tiny NLLB, built under ``<output_dir>/mt-base`` (like the tiny Llama under ``base/``).
* ``attach_mt``: the stage-2 FlareModel gets the frozen encoder + a fresh trainable map.
* ``MTFeaturizer``: one row -> its NLLB ids per text field (encoded with the ROW's language code,
  never English) and the character-offset alignment of the LLM prompt (``flare.modeling.mt_align``).
  ``prepare`` attaches it to each example; ``collate`` turns it into ``mt_*`` batch tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..modeling.mt_align import MTRow, overlap_pairs, strip_span
from ..modeling.mt_source import MTSource, load_mt_source
from ..tasks import Task, _bos, _template_pieces, _tok
from ..translate import nllb_code

logger = logging.getLogger(__name__)

MT_BASE = "mt-base"  # the built-in tiny NLLB's folder in a run's output_dir


def check_mt_config(cfg) -> None:
    """One-line error for a FLARE MT run that cannot work, before anything is loaded or written."""
    if cfg.method != "flare-mt":
        return
    if cfg.mt_model is None and cfg.task != "toy":
        raise ValueError(
            f"--method flare-mt needs --mt-model (an NLLB checkpoint) for task {cfg.task!r}; only the toy task "
            "has a built-in one"
        )
    if getattr(cfg, "decoder_alignment", "ours") != "ours":
        raise ValueError(
            "--method flare-mt aligns the NLLB states to the target by character offsets; --decoder-alignment "
            "authors lays out an English stream, which flare-mt does not have: use --decoder-alignment ours"
        )
    if cfg.fusion == "none":
        raise ValueError("--method flare-mt needs a fusion (--fusion add_relu, ...), not --fusion none")


def mt_model_path(cfg, out: Path, *, build: bool = True) -> str:
    """The run's NLLB checkpoint: ``--mt-model``, or the built-in tiny one (built once under out/mt-base)."""
    if cfg.mt_model is not None:
        return cfg.mt_model
    path = (Path(out) / MT_BASE).resolve()  # recorded with the adapter: absolute, to load from any folder
    if build and not path.is_dir():
        from ..default.build import save_tiny_nllb

        save_tiny_nllb(path, seed=cfg.seed)
    return str(path)


def attach_mt(model, cfg, out: Path, task: Task, tokenizer, family: str) -> MTFeaturizer:
    """Give the stage-2 FlareModel its MT source (frozen NLLB encoder, a fresh map on the model's
    device, initialized from the run's seed without touching the training RNG); returns the
    featurizer of its rows."""
    import torch

    width = {m.in_features for m in model.fusion_projections().values()}
    if len(width) != 1:
        raise ValueError(f"--method flare-mt: the fusion projections read different widths {sorted(width)}")
    path = mt_model_path(cfg, out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        source = load_mt_source(path, width.pop(), device=model.device)
    model.attach_mt_source(source)
    logger.info("flare-mt: NLLB encoder %s, map %d -> %d", path, source.map.in_features, source.map.out_features)
    return MTFeaturizer(source, task, tokenizer, family, cfg.max_length)


class MTFeaturizer:
    """Rows of one task -> ``MTRow`` (NLLB ids per field + LLM/NLLB alignment), for one LLM tokenizer.

    Args:
        mt_source: the model's ``MTSource`` (its NLLB tokenizer and language codes).
        task, tokenizer, family, max_length: as the LLM's rows are encoded (``flare.tasks.encode``);
            NLLB encodings are cut at ``max_length`` tokens too (later tokens read no source).
    """

    def __init__(self, mt_source: MTSource, task: Task, tokenizer, family: str, max_length: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("--method flare-mt aligns by character offsets and needs the model's fast tokenizer")
        self.nllb = mt_source.tokenizer
        self.codes = mt_source.language_codes
        self.task, self.tokenizer, self.family, self.max_length = task, tokenizer, family, max_length
        self.names = ("text", "text_pair") if task.kind == "classification" else ("question", "context")
        self._lang = None
        if family == "decoder":
            self._bos = _bos(tokenizer)
            self._pieces = [(p, f, None if f else _tok(tokenizer, p)) for p, f in _template_pieces(task.prompt)]

    # ------------------------------------------------------------------ NLLB side
    def language_code(self, lang: str) -> str:
        """The row language's NLLB code, checked to be a token of the NLLB tokenizer."""
        code = self.codes.get(lang) or nllb_code(lang)
        token = self.nllb.convert_tokens_to_ids(code)
        if token is None or token == self.nllb.unk_token_id:
            raise ValueError(f"--mt-model: the NLLB tokenizer has no language code {code!r} (language {lang!r})")
        return code

    def _nllb_field(self, value: str | None, code: str) -> tuple[list[int], list]:
        if not value:
            return [], []
        if self._lang != code:
            self.nllb.src_lang = code  # NLLB opens (or, legacy, closes) the input with the source language code
            self._lang = code
        enc = self.nllb(value, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if self.nllb.convert_tokens_to_ids(code) not in ids:
            raise RuntimeError(f"the NLLB tokenizer did not add the language code {code!r}")
        specials = set(self.nllb.all_special_ids)
        spans = [None if t in specials else strip_span(o, value) for t, o in zip(ids, enc["offset_mapping"])]
        return ids, spans

    # ------------------------------------------------------------------ LLM side
    def _llm_field(self, value: str) -> tuple[list[int], list]:
        """The decoder's tokens of one field (tokenized as ``" " + value``, as ``encode_decoder`` does),
        their spans in ``value``'s characters."""
        enc = self.tokenizer(" " + value, add_special_tokens=False, return_offsets_mapping=True)
        spans = [strip_span((a - 1, b - 1), value) for a, b in enc["offset_mapping"]]
        return list(enc["input_ids"]), spans

    def _decoder_positions(self, row: dict, prompt: list[int], fields: dict) -> list[tuple[int, int, list]]:
        """(field index, first prompt position, spans of the tokens kept) per field of a decoder prompt.

        ``encode_decoder`` lays the prompt out as BOS + template pieces with each field's tokens, a
        field possibly cut to a prefix (truncation): walking the pieces, a field's kept length is the
        longest prefix after which the next template piece follows.
        """
        pos, out = len(self._bos), []
        if prompt[:pos] != self._bos:
            raise ValueError(f"row {row.get('id')!r}: the prompt does not start as encode_decoder starts it")
        for k, (name, is_field, ids) in enumerate(self._pieces):
            if not is_field:
                if prompt[pos : pos + len(ids)] != ids:
                    raise ValueError(f"row {row.get('id')!r}: template text {name!r} not where the prompt has it")
                pos += len(ids)
                continue
            if fields.get(name) is None:
                continue
            full, spans = fields[name]
            after = next((p[2] for p in self._pieces[k + 1 :] if not p[1]), None)
            for kept in range(min(len(full), len(prompt) - pos), -1, -1):
                end = pos + kept
                follows = end == len(prompt) if after is None else prompt[end : end + len(after)] == after
                if prompt[pos:end] == full[:kept] and follows:
                    break
            else:
                raise ValueError(f"row {row.get('id')!r}: field {name!r} not found in the prompt")
            out.append((self.names.index(name), pos, spans[:kept]))
            pos += kept
        if pos != len(prompt):
            raise ValueError(f"row {row.get('id')!r}: the prompt has {len(prompt) - pos} tokens the template does not")
        return out

    def _encoder_positions(self, row: dict, values: dict) -> tuple[list[int], list[tuple[int, int, list]]]:
        """The encoder input as ``encode_encoder`` makes it, with each token's field and span."""
        first, second = (values[n] for n in self.names)
        if self.task.kind == "classification":
            enc = self.tokenizer(first, second, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
        else:
            enc = self.tokenizer(first, second, truncation="only_second", max_length=self.max_length,
                                 return_offsets_mapping=True)  # fmt: skip
        per_field: dict[int, list] = {}
        for pos, (seq, off) in enumerate(zip(enc.sequence_ids(), enc["offset_mapping"])):
            if seq is not None:
                value = (first, second)[seq]
                per_field.setdefault(seq, [None] * len(enc["input_ids"]))[pos] = strip_span(off, value)
        return list(enc["input_ids"]), [(f, 0, spans) for f, spans in sorted(per_field.items())]

    # ------------------------------------------------------------------ rows
    def row(self, row: dict) -> MTRow:
        """``row``'s MTRow (its TARGET text fields, its own language's NLLB code)."""
        if "lang" not in row:
            raise ValueError(f"row {row.get('id')!r} has no 'lang': FLARE MT encodes each row with its language's code")
        code = self.language_code(row["lang"])
        values = self.task.fields(row, "target")
        nllb = [self._nllb_field(values.get(n), code) for n in self.names]
        nllb_spans = [spans for _, spans in nllb]
        if self.family == "decoder":
            fields = {n: self._llm_field(v) for n, v in values.items() if v is not None}

            def positions(prompt: list[int]):
                return self._decoder_positions(row, prompt, fields)
        else:
            encoder_ids, encoder_positions = self._encoder_positions(row, values)

            def positions(prompt: list[int]):
                if list(prompt) != encoder_ids:
                    raise ValueError(f"row {row.get('id')!r}: the encoder input differs from encode_encoder's")
                return encoder_positions

        def pairs(prompt: list[int]) -> list[tuple[int, int, int]]:
            out = []
            for f, start, spans in positions(prompt):
                out += [(start + i, f, j) for i, j in overlap_pairs(spans, nllb_spans[f])]
            return out

        return MTRow(nllb_ids=[ids for ids, _ in nllb], language_code=code, nllb_pad=self.nllb.pad_token_id, pairs=pairs)


def featurizer_for(model, task: Task, tokenizer, family: str, max_length: int) -> MTFeaturizer | None:
    """The featurizer of a FLARE MT model (None for any other model): evaluation finds it this way."""
    source = getattr(model, "mt_source", None)
    if source is None:
        inner = getattr(model, "module", None)  # DDP
        source = getattr(inner, "mt_source", None)
    return None if source is None else MTFeaturizer(source, task, tokenizer, family, max_length)
