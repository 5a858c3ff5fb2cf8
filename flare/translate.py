"""Machine translation of task rows with a transformers seq2seq model (NLLB-200 by default).

Two directions, as in the paper:

* translate-test (``mode="test"``): target-language rows -> their English source fields
  (``source_text``/``source_text_pair`` or ``source_question``/``source_context``). The output is a
  translation file: ``id``, ``lang`` and the source fields, attached to the rows by id at training
  or evaluation time (``--eval-translations`` / ``--test-translations``).
* translate-train (``mode="train"``): English rows -> complete target-language rows whose source
  fields hold the English original (stage 2's training data, ``--train-file``).

NLLB needs language codes (``eng_Latn``, ``swh_Latn``, ...): the source code is set on the
tokenizer (``tokenizer.src_lang``) and the target code is forced as the first generated token
(``forced_bos_token_id``). ``NLLB_CODES`` maps the paper's languages. Three NusaX languages are not
in NLLB-200 (bbc Toba Batak, mad Madurese, nij Ngaju); they are read as Indonesian (ind_Latn), the
closest NLLB language, with a warning (override with ``src_code=``).

QA answer spans through translation (translate-train): the answer is wrapped in quote markers inside
the English passage (``« ... »``; if the passage already contains one of those characters, the next
free pair of ``" "`` or ``[ ]``), the marked passage is translated, and the text between the markers
in the translation becomes the answer, its offset the new ``answer_start``, the markers removed. If
the markers do not survive, the answer is translated on its own and searched for in the translated
passage. If that fails too the row keeps the separately translated answer with ``answer_start = -1``
(usable by generative QA, not by extractive QA) and is listed in the report. ``span`` in each output
row says which case applied ("marker", "search", "unaligned").

Texts longer than ``max_length`` tokens are split into sentences, translated, and joined again.
Output is written chunk by chunk to ``<output>.partial`` (each chunk flushed and fsynced); a rerun
with ``resume=True`` continues after the last complete row; the file is renamed to ``<output>``
only when every row is done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import torch

from .data.schema import check_kind

logger = logging.getLogger(__name__)

DEFAULT_MT_MODEL = "facebook/nllb-200-3.3B"  # the paper's; facebook/nllb-200-distilled-600M has 5.5x fewer parameters

NLLB_CODES = {
    "en": "eng_Latn",
    "eng": "eng_Latn",
    # XNLI
    "ar": "arb_Arab",
    "bg": "bul_Cyrl",
    "de": "deu_Latn",
    "el": "ell_Grek",
    "es": "spa_Latn",
    "fr": "fra_Latn",
    "hi": "hin_Deva",
    "ru": "rus_Cyrl",
    "sw": "swh_Latn",
    "th": "tha_Thai",
    "tr": "tur_Latn",
    "ur": "urd_Arab",
    "vi": "vie_Latn",
    "zh": "zho_Hans",
    # TyDiQA
    "bn": "ben_Beng",
    "fi": "fin_Latn",
    "id": "ind_Latn",
    "ko": "kor_Hang",
    "te": "tel_Telu",
    "ja": "jpn_Jpan",
    # NusaX
    "ace": "ace_Latn",
    "ban": "ban_Latn",
    "bjn": "bjn_Latn",
    "bug": "bug_Latn",
    "ind": "ind_Latn",
    "jav": "jav_Latn",
    "min": "min_Latn",
    "sun": "sun_Latn",
}
NOT_IN_NLLB = {"bbc": "ind_Latn", "mad": "ind_Latn", "nij": "ind_Latn"}
MARKERS = (("«", "»"), ('"', '"'), ("[", "]"))
# Latin/Arabic/Devanagari sentence ends need following whitespace ("3.5", "e.g." stay whole); the CJK
# full stops end a sentence with or without it, since Chinese and Japanese put no space between sentences
# (a run like "！？" or a closing quote after the stop stays with its sentence).
_SENTENCE_END = re.compile(r"(?<=[.!?؟।])\s+|(?<=[。！？])(?![。！？」』）])\s*")


def nllb_code(lang: str, override: str | None = None) -> str:
    """NLLB-200 code of a dataset language (ISO 639-1/3 as the datasets use them)."""
    if override:
        return override
    if lang in NLLB_CODES:
        return NLLB_CODES[lang]
    if lang in NOT_IN_NLLB:
        logger.warning("%s is not an NLLB-200 language; translating it as %s", lang, NOT_IN_NLLB[lang])
        return NOT_IN_NLLB[lang]
    if re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", lang):
        return lang  # already an NLLB code
    raise ValueError(
        f"no NLLB-200 code known for language {lang!r}; pass it explicitly with --lang-code (e.g. --lang-code swh_Latn)"
    )


# ------------------------------------------------------------------------------------- translator
class Translator:
    """Batched translation with a seq2seq model and its tokenizer (NLLB conventions).

    Args:
        batch_size: texts per ``generate`` call (sorted by length to waste little padding).
        max_length: longest input in tokens; longer texts are split into sentences.
        max_new_tokens: generation budget per text (default: 2 x max_length).
        num_beams: beam search width (1 = greedy).
    """

    # Segments cut by the tokenizer at max_length (no sentence break short enough): counted over the
    # translator's lifetime, warned about once (class defaults: test doubles skip __init__).
    truncated_segments: int = 0
    _warned_truncation: bool = False

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 16,
        max_length: int = 256,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
    ) -> None:
        if batch_size <= 0 or max_length <= 0 or num_beams <= 0:
            raise ValueError(
                f"batch_size, max_length and num_beams must be positive, got {batch_size}, {max_length}, {num_beams}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens or 2 * max_length
        self.num_beams = num_beams

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_MT_MODEL,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> "Translator":
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, dtype=dtype).to(device)
        return cls(model, tokenizer, **kwargs)

    def _language_id(self, code: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(code)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"language code {code!r} is not a token of this tokenizer (is it an NLLB model?)")
        return token_id

    def _n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _fits(self, text: str) -> bool:
        return self._n_tokens(text) <= self.max_length - 2  # NLLB adds the language code and </s>

    def _split(self, text: str) -> tuple[list[str], int]:
        """(the text, or its sentences when it is longer than max_length tokens; how many of those
        segments are still longer than max_length)."""
        if self._fits(text):
            return [text], 0
        sentences = [s for s in _SENTENCE_END.split(text) if s] or [text]
        return sentences, sum(not self._fits(s) for s in sentences)

    def _note_truncated(self, n: int) -> None:
        """Count segments the tokenizer will cut at max_length (their tail is never translated); warn once
        per translator so a long run says it without repeating itself for every chunk."""
        if not n:
            return
        self.truncated_segments += n
        if not self._warned_truncation:
            self._warned_truncation = True
            logger.warning(
                "%d text segment(s) have no sentence break within max_length=%d tokens and are truncated to it "
                "(the rest is not translated); raise --max-length to keep them whole (warned once; "
                "Translator.truncated_segments keeps the total, which flare translate prints at the end)",
                n,
                self.max_length,
            )

    @torch.no_grad()
    def _generate(self, texts: list[str], src_code: str, tgt_code: str) -> list[str]:
        self.tokenizer.src_lang = src_code
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        out = self.model.generate(
            **enc,
            forced_bos_token_id=self._language_id(tgt_code),
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def translate(self, texts: Sequence[str], src_code: str, tgt_code: str) -> list[str]:
        """Translations of ``texts`` in order (empty strings stay empty)."""
        self._language_id(src_code)
        self._language_id(tgt_code)
        pieces: list[tuple[int, str]] = []  # (text index, segment)
        too_long = 0
        for i, text in enumerate(texts):
            if text and text.strip():
                segments, n_long = self._split(text)
                pieces += [(i, seg) for seg in segments]
                too_long += n_long
        self._note_truncated(too_long)
        order = sorted(range(len(pieces)), key=lambda k: -len(pieces[k][1]))
        translated = [""] * len(pieces)
        for start in range(0, len(order), self.batch_size):
            ks = order[start : start + self.batch_size]
            for k, t in zip(ks, self._generate([pieces[k][1] for k in ks], src_code, tgt_code)):
                translated[k] = t
        out = [[] for _ in texts]
        for (i, _), t in zip(pieces, translated):
            out[i].append(t)
        return [" ".join(parts) for parts in out]


# ------------------------------------------------------------------------------------- QA spans
def choose_markers(*texts: str) -> tuple[str, str]:
    for pair in MARKERS:
        if not any(m in t for m in pair for t in texts):
            return pair
    raise ValueError("every marker pair already occurs in the passage; cannot mark the answer span")


def mark_answer(context: str, start: int, answer: str, markers: tuple[str, str]) -> str:
    """The passage with the answer wrapped in markers (checks that the span really holds the answer)."""
    if context[start : start + len(answer)] != answer:
        raise ValueError(f"answer {answer!r} is not at offset {start} of the passage")
    return f"{context[:start]}{markers[0]}{answer}{markers[1]}{context[start + len(answer) :]}"


def unmark_answer(text: str, markers: tuple[str, str]) -> tuple[str, int, str] | None:
    """(passage without markers, answer start, answer) when the markers survived once each, in order."""
    open_, close = markers
    if open_ == close:
        if text.count(open_) != 2:
            return None
        i = text.index(open_)
        j = text.index(close, i + 1)
    else:
        if text.count(open_) != 1 or text.count(close) != 1:
            return None
        i, j = text.index(open_), text.index(close)
        if j < i:
            return None
    inner = text[i + len(open_) : j]
    answer = inner.strip()
    if not answer:
        return None
    clean = text[:i] + inner + text[j + len(close) :]
    return clean, i + len(inner) - len(inner.lstrip()), answer


# ------------------------------------------------------------------------------------- rows
def _fields(kind: str) -> tuple[str, ...]:
    return ("text", "text_pair") if kind == "classification" else ("question", "context")


def translate_test_rows(
    rows: Sequence[dict], kind: str, translator: Translator, src_code: str, tgt_code: str = "eng_Latn"
) -> list[dict]:
    """Translation records (id, lang, source fields) for target-language rows."""
    check_kind(kind)
    out = [{"id": r["id"], "lang": r["lang"]} for r in rows]
    for field in _fields(kind):
        values = [r.get(field) or "" for r in rows]
        if not any(values):
            continue
        for rec, row, t in zip(out, rows, translator.translate(values, src_code, tgt_code)):
            rec["source_" + field] = t if row.get(field) is not None else None
    return out


def translate_train_rows(
    rows: Sequence[dict], kind: str, translator: Translator, lang: str, tgt_code: str, src_code: str = "eng_Latn"
) -> list[dict]:
    """Target-language rows (machine-translated) whose source fields hold the English originals."""
    check_kind(kind)
    if kind == "classification":
        out = []
        texts = translator.translate([r["text"] for r in rows], src_code, tgt_code)
        pairs = translator.translate([r.get("text_pair") or "" for r in rows], src_code, tgt_code)
        for r, t, p in zip(rows, texts, pairs):
            out.append(
                {
                    "id": r["id"],
                    "lang": lang,
                    "text": t,
                    "text_pair": p if r.get("text_pair") is not None else None,
                    "label": r["label"],
                    "source_text": r["text"],
                    "source_text_pair": r.get("text_pair"),
                }
            )
        return out
    questions = translator.translate([r["question"] for r in rows], src_code, tgt_code)
    marked, markers, answers_en = [], [], []
    for r in rows:
        answer, start = r["answers"]["text"][0], r["answers"]["answer_start"][0]
        pair = choose_markers(r["context"])
        markers.append(pair)
        answers_en.append(answer)
        marked.append(mark_answer(r["context"], start, answer, pair))
    contexts = translator.translate(marked, src_code, tgt_code)
    out, retry = [], []
    for i, (r, q, c, pair) in enumerate(zip(rows, questions, contexts, markers)):
        found = unmark_answer(c, pair)
        rec = {
            "id": r["id"],
            "lang": lang,
            "question": q,
            "context": c,
            "answers": None,
            "source_question": r["question"],
            "source_context": r["context"],
            "source_answers": r["answers"],
        }
        if found:
            clean, start, answer = found
            rec.update(context=clean, answers={"text": [answer], "answer_start": [start]}, span="marker")
        else:
            rec["context"] = c.replace(pair[0], "").replace(pair[1], "")
            retry.append(i)
        out.append(rec)
    if retry:
        alone = translator.translate([answers_en[i] for i in retry], src_code, tgt_code)
        for i, answer in zip(retry, alone):
            pos = out[i]["context"].find(answer) if answer else -1
            out[i]["answers"] = {"text": [answer], "answer_start": [pos]}
            out[i]["span"] = "search" if pos >= 0 else "unaligned"
    return out


# ------------------------------------------------------------------------------------- resumable file
@dataclasses.dataclass
class TranslationReport:
    output: Path
    rows: int
    resumed_from: int
    unaligned_ids: list[str]

    def message(self) -> str:
        shown = ", ".join(self.unaligned_ids[:20]) + (" ..." if len(self.unaligned_ids) > 20 else "")
        extra = (
            f"; {len(self.unaligned_ids)} answer spans not located (answer_start -1): {shown}"
            if self.unaligned_ids
            else ""
        )
        return f"wrote {self.rows} rows to {self.output} (resumed after {self.resumed_from}){extra}"


def _read_partial(path: Path) -> list[dict]:
    """Complete JSON lines of a partial file (a torn last line is cut off; a complete last record whose
    newline was lost gets it back, so the next append starts a line of its own)."""
    if not path.exists():
        return []
    good, records = 0, []
    with open(path, "rb") as f:
        data = f.read()
    while good < len(data):
        end = data.find(b"\n", good)
        stop = len(data) if end < 0 else end + 1
        line = data[good:stop]
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:  # JSONDecodeError, or UnicodeDecodeError when torn inside a UTF-8 character
                break
        good = stop
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    elif data and not data.endswith(b"\n"):
        # A crash between a record's "}" and its "\n": the record is whole (no proper prefix of a JSON
        # object parses), but appending the next chunk would continue its line and break the JSONL.
        with open(path, "ab") as f:
            f.write(b"\n")
    return records


def translate_to_file(
    rows: Sequence[dict],
    output: str | os.PathLike,
    translate_chunk: Callable[[list[dict]], list[dict]],
    *,
    chunk_size: int = 256,
    resume: bool = False,
    progress: bool = True,
) -> TranslationReport:
    """Run ``translate_chunk`` over rows in chunks, appending to ``<output>.partial``; rename when done."""
    from tqdm.auto import tqdm

    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists() and not resume:
        raise FileExistsError(f"{output} exists; remove it or pass resume=True (--resume) to keep it")
    if output.exists():
        done = _read_partial(output)
        return TranslationReport(
            output, len(done), len(done), [str(r["id"]) for r in done if r.get("span") == "unaligned"]
        )
    done = _read_partial(partial) if resume else []
    if not resume and partial.exists():
        partial.unlink()
    ids = [str(r["id"]) for r in rows]
    if [str(r["id"]) for r in done] != ids[: len(done)]:
        raise ValueError(f"{partial} does not hold a prefix of these rows (other input?); delete it to start over")
    start = len(done)
    bar = tqdm(total=len(rows), initial=start, desc=f"translate -> {output.name}", unit="row", disable=not progress)
    with open(partial, "a", encoding="utf-8") as f:
        for i in range(start, len(rows), chunk_size):
            records = translate_chunk(list(rows[i : i + chunk_size]))
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
            done += records
            bar.update(len(records))
    bar.close()
    os.replace(partial, output)
    return TranslationReport(output, len(done), start, [str(r["id"]) for r in done if r.get("span") == "unaligned"])
