"""Where the paper's datasets live on the Hugging Face hub, and what their rows look like.

Each loader takes ``path`` (the hub name by default, or a local directory laid out like the hub
repository: tests use such copies under tests/fixtures/hub/) and returns rows in flare's format
(flare.data.schema). Facts assumed about the hub repositories (their parquet layouts, datasets 3+;
script-based loading is gone in datasets 4):

* XNLI: ``facebook/xnli``, one config per language ("ar", ..., "en", also "all_languages");
  columns premise (str), hypothesis (str), label (ClassLabel entailment/neutral/contradiction);
  splits train (392,702 rows: MultiNLI train, machine-translated for every language but "en"),
  validation (2,490), test (5,010). The language configs are row-parallel: row i of every config is
  the same example. The "en" config is the English counterpart (its train split is MultiNLI's).
  Rows carry no id; we use "<split>-<row index>", the same across languages.
* TyDiQA-GoldP: ``google-research-datasets/tydiqa``, config "secondary_task"; columns id, title,
  context, question, answers {text: [str], answer_start: [int32]}; splits train (49,881) and
  validation (5,077, the benchmark's evaluation set). The language is the id's prefix
  ("arabic-...", "english-..."). No parallel English: the English counterpart for stage 1 is
  SQuAD v1.1 (``rajpurkar/squad``, config "plain_text", same columns) or TyDiQA's English part;
  the target side of training data comes from translate-train (flare translate).
* NusaX-senti: ``indonlp/NusaX-senti``, one config per language (ace, ban, bbc, bjn, bug, eng,
  ind, jav, mad, min, nij, sun); columns id (str), text, lang, label (ClassLabel
  negative/neutral/positive); splits train (500), validation (100), test (400). The repository's
  main branch holds a loading script, which datasets >= 4 no longer runs, so the hub loader reads
  the parquet conversion (``revision="refs/convert/parquet"``, files ``<lang>/<split>/0000.parquet``,
  selected with ``data_dir=<lang>``). The corpus is parallel: the "eng" config with the same id is
  the English counterpart.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from .schema import validate_rows

logger = logging.getLogger(__name__)

XNLI_HUB = "facebook/xnli"
TYDIQA_HUB = "google-research-datasets/tydiqa"
TYDIQA_CONFIG = "secondary_task"
SQUAD_HUB = "rajpurkar/squad"
SQUAD_CONFIG = "plain_text"
NUSAX_HUB = "indonlp/NusaX-senti"
NUSAX_PARQUET_REVISION = "refs/convert/parquet"

# The paper's evaluation languages (flare-method.md).
XNLI_LANGUAGES = ("ar", "bg", "de", "el", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
TYDIQA_LANGUAGES = ("ar", "bn", "fi", "id", "ko", "ru", "sw", "te")
NUSAX_LANGUAGES = ("ace", "ban", "bbc", "bjn", "bug", "ind", "jav", "mad", "min", "nij", "sun")

XNLI_LABELS = ("entailment", "neutral", "contradiction")
NUSAX_LABELS = ("negative", "neutral", "positive")

# TyDiQA ids start with the language's English name.
TYDIQA_ID_PREFIX = {
    "ar": "arabic",
    "bn": "bengali",
    "en": "english",
    "fi": "finnish",
    "id": "indonesian",
    "ja": "japanese",
    "ko": "korean",
    "ru": "russian",
    "sw": "swahili",
    "te": "telugu",
    "th": "thai",
}


@dataclasses.dataclass(frozen=True)
class HubSource:
    """Where one language of a dataset is read from: ``datasets.load_dataset(path, name, data_dir=...)``."""

    path: str
    name: str | None = None
    data_dir: str | None = None
    revision: str | None = None


def _is_local(path: str) -> bool:
    return os.path.isdir(path)


def load_split(source: HubSource, split: str):
    """``datasets.load_dataset`` for one split, with a clear error when the split or data is absent."""
    import datasets

    kwargs = {}
    if source.data_dir is not None:
        kwargs["data_dir"] = source.data_dir
    if source.revision is not None and not _is_local(source.path):
        kwargs["revision"] = source.revision
    try:
        return datasets.load_dataset(source.path, source.name, split=split, **kwargs)
    except ValueError as exc:  # unknown split / config
        raise ValueError(f"cannot load split {split!r} of {source}: {exc}") from exc
    except (FileNotFoundError, ConnectionError) as exc:
        where = "the local directory" if _is_local(source.path) else "the Hugging Face hub"
        raise FileNotFoundError(
            f"cannot read {source} from {where}: {exc}. Without hub access, point the loader's "
            "path at a local copy laid out like the hub repository, or use pre-translated files "
            "(flare.data.read_rows)"
        ) from exc


def _class_names(ds, column: str = "label") -> tuple[str, ...] | None:
    feature = ds.features.get(column)
    return tuple(feature.names) if hasattr(feature, "names") else None


def _label_index(value, names: tuple[str, ...], expected: tuple[str, ...], where: str) -> int:
    """Labels arrive as ClassLabel ints (hub parquet) or strings (some CSV exports)."""
    if isinstance(value, str):
        if value not in expected:
            raise ValueError(f"{where}: unknown label {value!r}; expected one of {expected}")
        return expected.index(value)
    if names is not None and tuple(names) != expected:
        return expected.index(names[int(value)])
    if not 0 <= int(value) < len(expected):
        raise ValueError(f"{where}: label {value!r} out of range for {expected}")
    return int(value)


# ----------------------------------------------------------------------------------------- XNLI
def load_xnli(lang: str, split: str, *, path: str = XNLI_HUB, source: str | None = None) -> list[dict]:
    """XNLI (or its English counterpart with ``lang="en"``) as classification rows.

    source=None leaves the English side empty (fill it with flare translate: the paper's
    translate-test); source="parallel" takes the "en" config's row with the same index (for train:
    the MultiNLI original of the translated row, the paper's stage-2 source; for validation/test: the
    human English original, an oracle upper bound rather than the paper's setting).
    """
    ds = load_split(HubSource(path, lang), split)
    names = _class_names(ds)
    rows = [
        {
            "id": f"{split}-{i}",
            "lang": lang,
            "text": r["premise"],
            "text_pair": r["hypothesis"],
            "label": _label_index(r["label"], names, XNLI_LABELS, f"xnli/{lang}/{split} row {i}"),
            "source_text": None,
            "source_text_pair": None,
        }
        for i, r in enumerate(ds)
    ]
    if lang == "en":
        for r in rows:
            r["source_text"], r["source_text_pair"] = r["text"], r["text_pair"]
    elif source == "parallel":
        english = load_split(HubSource(path, "en"), split)
        if len(english) != len(rows):
            raise ValueError(
                f"xnli {lang}/{split} has {len(rows)} rows but en/{split} has {len(english)}: the configs "
                "are not row-parallel in this copy; translate instead (flare translate)"
            )
        for r, e in zip(rows, english):
            r["source_text"], r["source_text_pair"] = e["premise"], e["hypothesis"]
    elif source is not None:
        raise ValueError(f"source must be None or 'parallel', got {source!r}")
    return validate_rows(rows, "classification", name=f"xnli/{lang}/{split}", empty="warn")


# ----------------------------------------------------------------------------------------- QA
def _qa_rows(ds, lang: str, where: str, keep=None) -> list[dict]:
    rows = []
    for r in ds:
        if keep is not None and not keep(r):
            continue
        answers = r["answers"]
        rows.append(
            {
                "id": str(r["id"]),
                "lang": lang,
                "question": r["question"],
                "context": r["context"],
                "answers": {"text": list(answers["text"]), "answer_start": [int(s) for s in answers["answer_start"]]},
                "source_question": None,
                "source_context": None,
                "source_answers": None,
            }
        )
    return validate_rows(rows, "qa", name=where, empty="warn")


def load_tydiqa(lang: str, split: str, *, path: str = TYDIQA_HUB, name: str = TYDIQA_CONFIG) -> list[dict]:
    """TyDiQA-GoldP rows of one language (selected by id prefix). ``lang="en"`` gives the English part."""
    if lang not in TYDIQA_ID_PREFIX:
        raise ValueError(f"TyDiQA has no language {lang!r}; known: {sorted(TYDIQA_ID_PREFIX)}")
    prefix = TYDIQA_ID_PREFIX[lang] + "-"
    ds = load_split(HubSource(path, name), split)
    rows = _qa_rows(ds, lang, f"tydiqa/{lang}/{split}", keep=lambda r: str(r["id"]).startswith(prefix))
    if not rows:
        raise ValueError(f"tydiqa {split} at {path} has no rows whose id starts with {prefix!r}")
    if lang == "en":
        _self_source_qa(rows)
    return rows


def load_tydiqa_english(split: str, *, path: str = TYDIQA_HUB, name: str = TYDIQA_CONFIG) -> list[dict]:
    """TyDiQA-GoldP's English rows (ids "english-..."), their own source: the authors' stage-1 data for
    TyDiQA (3,696 train rows against SQuAD's 87,599, in TyDiQA's own style of question and passage)."""
    return load_tydiqa("en", split, path=path, name=name)


def load_squad(split: str, *, path: str = SQUAD_HUB, name: str = SQUAD_CONFIG) -> list[dict]:
    """SQuAD v1.1 (English QA; TyDiQA's English counterpart for stage 1 and translate-train)."""
    rows = _qa_rows(load_split(HubSource(path, name), split), "en", f"squad/{split}")
    _self_source_qa(rows)
    return rows


def _self_source_qa(rows: list[dict]) -> None:
    for r in rows:
        r["source_question"], r["source_context"], r["source_answers"] = r["question"], r["context"], r["answers"]


# ----------------------------------------------------------------------------------------- NusaX
NUSAX_ENGLISH = "eng"


def load_nusax(
    lang: str,
    split: str,
    *,
    path: str = NUSAX_HUB,
    revision: str | None = NUSAX_PARQUET_REVISION,
    source: str | None = None,
) -> list[dict]:
    """NusaX-senti rows of one language (``lang="eng"`` is the English side).

    source="parallel" attaches the English row with the same id (NusaX is a parallel corpus); rows
    whose id has no English row keep source None and are reported by ``require_sources``.
    """
    ds = load_split(HubSource(path, data_dir=lang, revision=revision), split)
    names = _class_names(ds)
    rows = [
        {
            "id": str(r["id"]),
            "lang": lang,
            "text": r["text"],
            "text_pair": None,
            "label": _label_index(r["label"], names, NUSAX_LABELS, f"nusax/{lang}/{split} id {r['id']}"),
            "source_text": None,
            "source_text_pair": None,
        }
        for r in ds
    ]
    if lang == NUSAX_ENGLISH:
        for r in rows:
            r["source_text"] = r["text"]
    elif source == "parallel":
        english = {
            str(r["id"]): r["text"]
            for r in load_split(HubSource(path, data_dir=NUSAX_ENGLISH, revision=revision), split)
        }
        for r in rows:
            r["source_text"] = english.get(r["id"])
    elif source is not None:
        raise ValueError(f"source must be None or 'parallel', got {source!r}")
    return validate_rows(rows, "classification", name=f"nusax/{lang}/{split}", empty="warn")
