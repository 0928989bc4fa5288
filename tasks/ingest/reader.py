"""The reader interface: one planned input file in, its records out, each with its place in the file.

A reader yields `Record`s in file order. A problem with the whole file is an IngestError naming it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa

from tasks.config import Filters, SourceConfig
from tasks.plan import PlannedFile

RAW_SAMPLE = 1024  # bytes of a bad record kept in the quarantine


class IngestError(ValueError):
    """An input file cannot be ingested; the message names the file (and the line or row)."""


@dataclass(frozen=True, slots=True)
class Bad:
    """A record the reader already found bad (unparseable, too long, cut off)."""

    reason: str


class Location(NamedTuple):
    """Where a record is, for messages and the quarantine: ("line", 1-based) or ("row", 0-based)."""

    kind: str
    number: int


class Record(NamedTuple):
    """One record of a file, in file order."""

    index: int  # its place among the file's records; with the file's ordinal, the document id
    location: Location
    value: Any  # the parsed record (a dict if well formed), or a Bad the reader already judged
    raw: bytes | None  # the line as read; None for a table row


class Reader(ABC):
    """Reads the records of one planned file; `tmp` is a private scratch folder (e.g. for a download)."""

    def __init__(self, file: PlannedFile, source: SourceConfig, filters: Filters, tmp: Path):
        self.file, self.source, self.filters, self.tmp = file, source, filters, tmp

    @abstractmethod
    def records(self) -> Iterator[Record]: ...


def table_columns(schema: pa.Schema, source: SourceConfig, uri: str) -> list[str]:
    """The top-level columns a source needs; a missing or non-string text column is a config error."""
    text_column = source.text_field.split(".")[0]
    if text_column not in schema.names:
        raise IngestError(
            f"{uri}: no column {text_column!r} (text_field of source {source.name!r}); columns are {schema.names}"
        )
    kind = schema.field(text_column).type
    if "." not in source.text_field and not (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    ):
        raise IngestError(f"{uri}: text column {text_column!r} has type {kind}, not string")
    wanted = [text_column] + [field.split(".")[0] for field in [*source.meta_fields, *source.exclude]]
    return [name for name in dict.fromkeys(wanted) if name in schema.names]


def table_rows(batches: Iterator[pa.RecordBatch], uri: str, first_row: int) -> Iterator[Record]:
    """Rows of record batches as dicts, indexed from `first_row`; a batch that cannot be read is an IngestError."""
    row = first_row
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as error:
            raise IngestError(f"{uri}: cannot read the rows from row {row} on: {error}") from None
        if batch is None:
            return
        names = batch.schema.names
        for values in zip(*(column.to_pylist() for column in batch.columns)):
            yield Record(row - first_row, Location("row", row), dict(zip(names, values)), None)
            row += 1
