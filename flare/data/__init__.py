"""Task data: hub loaders (XNLI, TyDiQA-GoldP, NusaX + English counterparts), local files,
translation files and the missing-translation report. Rows follow flare.data.schema."""

from .files import atomic_write_text, attach_translations, read_rows, read_table, read_translations, write_jsonl
from .hub import (
    NUSAX_LABELS,
    NUSAX_LANGUAGES,
    TYDIQA_LANGUAGES,
    XNLI_LABELS,
    XNLI_LANGUAGES,
    load_nusax,
    load_squad,
    load_tydiqa,
    load_xnli,
)
from .schema import MissingSourceError, SourceReport, has_source, require_sources, validate_rows

__all__ = [
    "MissingSourceError",
    "NUSAX_LABELS",
    "NUSAX_LANGUAGES",
    "SourceReport",
    "TYDIQA_LANGUAGES",
    "XNLI_LABELS",
    "XNLI_LANGUAGES",
    "atomic_write_text",
    "attach_translations",
    "has_source",
    "load_nusax",
    "load_squad",
    "load_tydiqa",
    "load_xnli",
    "read_rows",
    "read_table",
    "read_translations",
    "require_sources",
    "validate_rows",
    "write_jsonl",
]
