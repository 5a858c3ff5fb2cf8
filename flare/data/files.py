"""Rows from local files (jsonl / json / csv / tsv / parquet), translation files, atomic writes.

A data file holds rows in flare's format (flare.data.schema), possibly under other column names
(``columns={"premise": "text", ...}`` renames them). In CSV/TSV cells, nested values (QA
``answers``) are JSON strings; an empty cell is a missing value (None).

A translation file (what ``flare translate`` writes) holds ``id`` plus source fields
(``source_text``, ``source_question``, ...); ``attach_translations`` copies them onto the rows with
the same id. Ids absent from the file stay without source and are reported, never dropped silently.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .schema import SourceReport, check_kind, has_source, validate_rows

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
_SOURCE_FIELDS = ("source_text", "source_text_pair", "source_question", "source_context", "source_answers")
_NESTED = ("answers", "source_answers")


def file_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot read {str(path)!r}: unknown extension {suffix!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[suffix]


def _json_reason(exc: json.JSONDecodeError) -> str:
    # json's messages end in " at" where its str() appends the position ("Invalid control character at")
    reason = exc.msg.removesuffix(" at")
    if exc.pos < len(exc.doc) and not exc.doc[exc.pos].isprintable():
        reason += f" {exc.doc[exc.pos]!r}"
    return reason


def read_table(path: str | os.PathLike) -> list[dict]:
    """All records of a jsonl / json / csv / tsv / parquet file, as dicts."""
    path = Path(path)
    fmt = file_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {str(path)!r}")
    # "utf-8-sig" reads plain UTF-8 unchanged and drops a byte-order mark (Excel's "CSV UTF-8", Notepad):
    # kept, it would rename the first CSV column to "\ufeffid" (ids silently become row numbers) and make
    # the first JSON line unparsable.
    if fmt == "jsonl":
        records = []
        with path.open(encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(
                            f"{path}:{n}:{exc.colno}: not valid JSON: {_json_reason(exc)} at line {n}, column "
                            f"{exc.colno}; each line must hold one JSON object"
                        ) from None
        return records
    if fmt == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {_json_reason(exc)} at line {exc.lineno}, column "
                f"{exc.colno}"
            ) from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        return data
    if fmt in ("csv", "tsv"):
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
            return [{k: (None if v == "" else v) for k, v in row.items()} for row in reader]
    import pyarrow.parquet as pq  # comes with datasets

    return pq.read_table(path).to_pylist()


def _coerce(record: dict, kind: str) -> dict:
    row = dict(record)
    for key in _NESTED:
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    if kind == "classification":
        if isinstance(row.get("label"), str) and row["label"].lstrip("-").isdigit():
            row["label"] = int(row["label"])
        row.setdefault("text_pair", None)
        row.setdefault("source_text", None)
        row.setdefault("source_text_pair", None)
    else:
        for key in ("source_question", "source_context", "source_answers"):
            row.setdefault(key, None)
        if isinstance(row.get("answers"), dict):
            row["answers"] = {
                "text": list(row["answers"].get("text", [])),
                "answer_start": [int(s) for s in row["answers"].get("answer_start", [])],
            }
    if row.get("id") is not None:
        row["id"] = str(row["id"])
    return row


def read_rows(
    path: str | os.PathLike,
    kind: str,
    *,
    columns: Mapping[str, str] | None = None,
    lang: str | None = None,
    label_names: Sequence[str] | None = None,
) -> list[dict]:
    """Rows of a task from a local file.

    Args:
        columns: renames {file column: flare field}, e.g. {"premise": "text", "hypothesis": "text_pair"}.
        lang: language for rows without a ``lang`` column.
        label_names: maps string labels ("positive") to class indices.
    """
    check_kind(kind)
    rows = []
    for i, record in enumerate(read_table(path)):
        if columns:
            record = {columns.get(k, k): v for k, v in record.items()}
        if "id" not in record or record["id"] is None:
            record["id"] = str(i)
        if record.get("lang") is None:
            if lang is None:
                raise ValueError(
                    f"{path}: row {i} (id {record['id']!r}) has no 'lang' field: add a 'lang' column (or jsonl key) "
                    "giving each row's language code, e.g. \"sw\", the code --languages selects"
                )
            record["lang"] = lang
        if kind == "classification" and isinstance(record.get("label"), str) and label_names is not None:
            if record["label"] in label_names:
                record["label"] = list(label_names).index(record["label"])
        rows.append(_coerce(record, kind))
    return validate_rows(rows, kind, name=str(path), label_names=label_names)


class Translations(dict):
    """{(lang, id): {source field: value}} of a translation file; lang is None for a record that
    names no language.

    Row ids repeat across languages: XNLI's "test-0" is the same id in each of its 15 languages and
    NusaX is parallel, so a file joining several languages' translations (flare translate writes
    each record's ``lang``) is matched on (lang, id), and on the id alone only where the record
    names no language.
    """

    def for_row(self, row: Mapping) -> dict:
        key = str(row["id"])
        hit = self.get((row.get("lang"), key))
        return hit if hit is not None else self.get((None, key), {})

    def matching(self, rows: Iterable[Mapping]) -> set:
        """The keys that some row reads."""
        rows = list(rows)
        keys = {(r.get("lang"), str(r["id"])) for r in rows} | {(None, str(r["id"])) for r in rows}
        return keys & set(self)


def read_translations(path: str | os.PathLike) -> Translations:
    """The English fields of a translation file (flare translate's output), by (lang, id)."""
    out = Translations()
    for i, record in enumerate(read_table(path)):
        if record.get("id") is None:
            raise ValueError(f"{path}: translation record {i} has no 'id'")
        fields = {k: v for k, v in record.items() if k in _SOURCE_FIELDS}
        if not fields:
            raise ValueError(f"{path}: record {record['id']!r} has none of the source fields {_SOURCE_FIELDS}")
        for key in _NESTED:
            if isinstance(fields.get(key), str):
                fields[key] = json.loads(fields[key])
        lang = record.get("lang")
        key = (None if lang is None or lang == "" else str(lang), str(record["id"]))
        if key in out:
            where = f" for language {key[0]!r}" if key[0] else " (the file has no 'lang' column)"
            raise ValueError(
                f"{path}: id {key[1]!r} appears twice{where}; a file joining several languages needs each record's "
                "'lang' (flare translate writes it)"
            )
        out[key] = fields
    return out


def attach_translations(
    rows: Iterable[dict], translations: Translations, kind: str, *, name: str = "rows"
) -> tuple[list[dict], SourceReport]:
    """Copy each row's English fields from ``translations`` (by language and id). Returns the rows
    (all of them) and a report of those still without a complete source."""
    out, missing = [], []
    for row in rows:
        row = dict(row)
        row.update({k: v for k, v in translations.for_row(row).items() if v is not None})
        if not has_source(row, kind):
            missing.append(str(row["id"]))
        out.append(row)
    return out, SourceReport(name=name, total=len(out), missing_ids=missing)


# ----------------------------------------------------------------------------------------- writing
def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file under this process's umask (0o644 under 022)."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or every file under a folder) the umask's mode. ``tempfile.mkstemp`` and
    safetensors create files 0600 whatever the umask, so results and adapters were private to their
    owner where every other file of a run (and a plain ``open``) follows the umask."""
    path = Path(path)
    mode = file_mode()
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(f, mode)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so readers see the old or the new content, never a partial one (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Rows as JSON lines, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
