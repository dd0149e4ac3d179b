"""Reading rows of user data with errors that name the file, the line and the field.

Loaders read rows through :func:`read_rows` and turn each into a record; a bad row raises a
:class:`DataError`, or with ``on_error="skip"`` is skipped and counted in the :class:`DataReport` that the
returned :class:`Records` list carries. Nothing is dropped silently: skipped rows also raise a warning.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A malformed row: the message names the source, the line (or row) and the field."""


class DataWarning(UserWarning):
    """Rows were skipped while loading; the message says how many, why and where."""


@dataclass
class DataReport:
    """What a loader read: rows seen, records kept, and the line numbers skipped for each reason."""

    source: str
    rows_read: int = 0
    kept: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, line: int) -> None:
        """Count a skipped row under ``reason``."""
        self.skipped.setdefault(reason, []).append(line)

    def summary(self) -> str:
        """One line: counts per reason with the first few line numbers."""
        parts = [f"{len(lines)} {reason} (lines {', '.join(map(str, lines[:5]))}{', ...' if len(lines) > 5 else ''})"
                 for reason, lines in self.skipped.items()]
        return f"{self.source}: read {self.rows_read} rows, kept {self.kept}; skipped " + "; ".join(parts)


class Records(list):
    """A list of loaded records with the :class:`DataReport` of how they were read (``.report``)."""

    def __init__(self, items, report: DataReport):
        super().__init__(items)
        self.report = report


def read_rows(source: Any) -> tuple[str, Iterator[tuple[int, Any]]]:
    """``(name, rows)`` from a JSONL(.gz) or CSV file, or from a sequence of dicts / a ``datasets.Dataset``.

    Rows are ``(line_number, row)``; an unparsable JSON line is yielded as a :class:`DataError` so the
    caller can raise or skip it like any other bad row.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        if path.suffix == ".csv":
            return str(path), _csv_rows(path)
        return str(path), _jsonl_rows(path)
    if hasattr(source, "column_names") or isinstance(source, (list, tuple)):
        return type(source).__name__, ((index, row) for index, row in enumerate(source, start=1))
    raise TypeError(f"cannot read data from {source!r:.80}; expected a .jsonl/.jsonl.gz/.csv path, a list of dicts "
                    "or a datasets.Dataset")


def _jsonl_rows(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, DataError(f"{path}, line {number}: invalid JSON ({err.msg})")


def _csv_rows(path: Path):
    with open(path, newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.DictReader(handle), 2):  # line 1 is the header
            yield number, row


def load_records(source: Any, parse: Callable[[str, int, Any], Any], on_error: str = "raise") -> Records:
    """Parse every row of ``source`` with ``parse(name, line, row)`` into a :class:`Records` list.

    ``parse`` raises :class:`DataError` for a malformed row (raised, or skipped with ``on_error="skip"``)
    and :class:`SkipRow` to drop a row under a documented rule; both are counted in the report.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}; expected 'raise' or 'skip'")
    name, rows = read_rows(source)
    report, records = DataReport(name), []
    for line, row in rows:
        report.rows_read += 1
        try:
            if isinstance(row, DataError):
                raise row
            records.append(parse(name, line, row))
        except SkipRow as rule:
            report.skip(str(rule), line)
        except DataError as err:
            if on_error == "raise":
                raise DataError(
                    f"{err}\nThis stops at the first malformed row; pass on_error='skip' to skip such rows "
                    f"instead: the result's .report then counts the rows read, kept and skipped (with each reason "
                    f"and line)."
                ) from err
            report.skip(f"malformed ({err})", line)
    report.kept = len(records)
    if report.skipped:
        warnings.warn(report.summary(), DataWarning, stacklevel=3)
    return Records(records, report)


class SkipRow(Exception):
    """Raised by a row parser to drop a row under a documented rule; the message is the rule's name."""


def field_of(name: str, line: int, row: Any, column: str, *, allow_empty: bool = False) -> str:
    """A text field of a row, or a :class:`DataError` naming the source, line and column."""
    if not isinstance(row, dict):
        raise DataError(f"{name}, line {line}: expected an object with field {column!r}, got {type(row).__name__}")
    if column not in row or row[column] is None:
        raise DataError(f"{name}, line {line}: missing field {column!r} (fields: {sorted(row)})")
    value = row[column]
    if not isinstance(value, str):
        raise DataError(f"{name}, line {line}: field {column!r} must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{name}, line {line}: field {column!r} is empty")
    return value
