"""Validated forget/retain records in three shapes, read from JSONL, CSV or Parquet.

Shapes (WMDP / TOFU / MUSE conventions):
    mcq:  {"question": str, "choices": [>= 2 str], "answer": int index into choices}
    qa:   {"question": str, "answer": str}
    text: {"text": str}
Every record is validated; the first bad one raises a ValueError naming file, line (1-based) and field.
Extra fields are ignored, except an optional "subject" on MCQ records (the entity the question is
about, used to build counterfactual prompts for attribution).

Files are UTF-8 (a leading byte-order mark is accepted); an object with a duplicated key is rejected
(which value was meant is ambiguous).  Every string field holds at most MAX_FIELD_CHARS characters and
every JSONL line at most MAX_LINE_CHARS, checked while reading: far beyond any model's context, so a
record this long is a mistake, and refusing it early beats minutes of tokenizing before the context check
(mansu.metrics.accuracy.check_context) that every forward pass is preceded by.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mansu.io import loads_strict

Shape = Literal["mcq", "qa", "text", "auto"]
SHAPES = ("mcq", "qa", "text")
FORMATS = (".jsonl", ".json", ".csv", ".parquet")
MAX_FIELD_CHARS = 100_000   # ~25k tokens of English: longer than the context of the models mansu targets (4k-8k)
MAX_LINE_CHARS = 1_000_000  # a JSONL line: room for the longest fields and many choices


@dataclass(frozen=True)
class MCQRecord:
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str | None = None


@dataclass(frozen=True)
class QARecord:
    question: str
    answer: str


@dataclass(frozen=True)
class TextRecord:
    text: str


Record = MCQRecord | QARecord | TextRecord


def load_records(path: str | Path, shape: Shape = "auto") -> list[Record]:
    """Read and validate every record of `path`; `auto` infers the shape from the first record."""
    path = Path(path)
    if shape not in (*SHAPES, "auto"):
        raise ValueError(f"unknown data shape {shape!r}: accepted are {', '.join(SHAPES)} or auto")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give a data file ({', '.join(FORMATS)})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    rows = list(_read_rows(path))
    if not rows:
        raise ValueError(f"{path}: empty split (no records); give at least one record")
    if shape == "auto":
        shape = infer_shape(rows[0][1], path, rows[0][0])
        for line, row in rows[1:]:
            _check_same_shape(row, shape, path, line, rows[0][0])
    return [_parse(row, shape, path, line) for line, row in rows]


ACCEPTED_SHAPES = "mcq (question, choices, answer), qa (question, answer) or text (text)"


def infer_shape(row: dict[str, Any], path: Path, line: int) -> Shape:
    if "choices" in row:
        return "mcq"
    if "question" in row and "answer" in row:
        return "qa"
    if "text" in row:
        return "text"
    raise ValueError(f"{path}:{line}: cannot tell the record shape from fields {sorted(row)}; "
                     f"accepted are {ACCEPTED_SHAPES}")


def _check_same_shape(row: dict[str, Any], shape: str, path: Path, line: int, first: int) -> None:
    """One file holds one shape: a record of another shape is named here, not parsed as the first one's."""
    try:
        other = infer_shape(row, path, line)
    except ValueError:  # no shape's fields at all: parsing names the missing field
        return
    if other != shape:
        raise ValueError(f"{path}:{line}: a {other} record in a file of {shape} records (line {first} is {shape}); "
                         f"one file holds one shape: {ACCEPTED_SHAPES}")


def shape_of(records: list[Record]) -> str:
    """'mcq', 'qa' or 'text': the shape of a parsed file's records (one shape per file)."""
    kinds = {type(r) for r in records}
    if len(kinds) != 1:
        raise ValueError(f"records of {len(kinds)} shapes; one split holds one shape: {ACCEPTED_SHAPES}")
    return {MCQRecord: "mcq", QARecord: "qa", TextRecord: "text"}[kinds.pop()]


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _read_jsonl(path)
    elif suffix in (".csv", ".parquet"):
        yield from _read_table(path, suffix)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; accepted are {', '.join(FORMATS)}")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            line = _decode_line(raw, path, line_no)
            if not line.strip():
                continue
            if len(line) > MAX_LINE_CHARS:
                raise ValueError(f"{path}:{line_no}: line is {len(line):,} characters long; the limit is "
                                 f"{MAX_LINE_CHARS:,} per record (a record must fit a model's context)")
            try:
                row = loads_strict(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({exc.msg}); "
                                 "each line must be one JSON object") from None
            except ValueError as exc:  # a duplicated key
                raise ValueError(f"{path}:{line_no}: {exc}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def _decode_line(raw: bytes, path: Path, line_no: int) -> str:
    """One line as text: UTF-8, with a byte-order mark allowed at the start of the file."""
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                         f"accepted are UTF-8 text files ({', '.join(FORMATS[:3])}) or Parquet") from None


def _read_table(path: Path, suffix: str) -> Iterator[tuple[int, dict[str, Any]]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, encoding="utf-8-sig") if suffix == ".csv" else pd.read_parquet(path)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                         f"accepted are UTF-8 text files ({', '.join(FORMATS[:3])}) or Parquet") from None
    except Exception as exc:  # pandas raises many types for unreadable files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: cannot read as {suffix[1:]} ({first}); accepted are {', '.join(FORMATS)}") from None
    if suffix == ".csv":
        _check_csv_header(path)
    # Line numbers count the CSV header as line 1, so data row i is line i + 2.
    offset = 2 if suffix == ".csv" else 1
    for i, row in enumerate(frame.to_dict(orient="records")):
        yield i + offset, row


def _check_csv_header(path: Path) -> None:
    """pandas renames a second column "a" to "a.1" silently: read the header itself and refuse duplicates."""
    import csv

    with path.open(encoding="utf-8-sig", newline="") as fh:
        header = next(csv.reader(fh), [])
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise ValueError(f"{path}: duplicated column {name!r}; each column name may appear once")
        seen.add(name)


def _parse(row: dict[str, Any], shape: str, path: Path, line: int) -> Record:
    where = f"{path}:{line}"
    if shape == "mcq":
        return _parse_mcq(row, where)
    if shape == "qa":
        return QARecord(question=_text_field(row, "question", where), answer=_text_field(row, "answer", where))
    return TextRecord(text=_text_field(row, "text", where))


def _text_field(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {_short(value)}")
    return _check_length(value, name, where)


def _check_length(value: str, name: str, where: str) -> str:
    if len(value) > MAX_FIELD_CHARS:
        raise ValueError(f"{where}: field {name!r} is {len(value):,} characters long; the limit is "
                         f"{MAX_FIELD_CHARS:,} (a record must fit a model's context)")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_mcq(row: dict[str, Any], where: str) -> MCQRecord:
    question = _text_field(row, "question", where)
    choices = row.get("choices")
    if isinstance(choices, str):  # CSV cells hold the list as JSON text
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: field 'choices' must be a list of strings (JSON list in CSV)") from None
    if hasattr(choices, "tolist"):  # parquet gives numpy arrays
        choices = choices.tolist()
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings, "
                         f"got {_short(choices)}")
    for choice in choices:
        _check_length(choice, "choices", where)
    answer = row.get("answer")
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: field 'answer' must be an integer index in 0..{len(choices) - 1}, "
                         f"got {_short(answer)}")
    subject = row.get("subject")
    return MCQRecord(question=question, choices=tuple(choices), answer=answer,
                     subject=subject if isinstance(subject, str) and subject else None)


def mcq_only(records: list[Record], path: str | Path) -> list[MCQRecord]:
    """Narrow to MCQ records for accuracy evaluation; other shapes get a clear error."""
    if not all(isinstance(r, MCQRecord) for r in records):
        raise ValueError(f"{path}: accuracy evaluation needs MCQ records (question, choices, answer)")
    return records  # type: ignore[return-value]


def record_to_dict(record: Record) -> dict[str, Any]:
    """The JSONL form of a record (inverse of parsing)."""
    if isinstance(record, MCQRecord):
        out: dict[str, Any] = {"question": record.question, "choices": list(record.choices), "answer": record.answer}
        if record.subject:
            out["subject"] = record.subject
        return out
    if isinstance(record, QARecord):
        return {"question": record.question, "answer": record.answer}
    return {"text": record.text}
