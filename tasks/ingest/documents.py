"""A parsed record to a Document, a Filtered verdict, or Malformed."""

from __future__ import annotations

import enum
import unicodedata
from typing import Any, NamedTuple

import orjson

from tasks.config import Filters, SourceConfig
from tasks.ingest.reader import RAW_SAMPLE

MISSING = object()  # a field the record does not have


class Document(NamedTuple):
    text: str  # NFC, without NULs
    meta: str  # the source's meta fields, as JSON
    size: int  # UTF-8 bytes of the text
    had_nul: bool  # NULs were stripped from the text


class Filtered(enum.Enum):
    """Why a well-formed record is not kept."""

    EXCLUDED = "excluded"  # the source's `exclude` matched
    TOO_SHORT = "too short"  # shorter than min_chars (or empty)


class Malformed(Exception):
    """A record that cannot become a document; the message is the reason."""


def lookup(record: dict, path: tuple[str, ...]) -> Any:
    value: Any = record
    for key in path:
        if type(value) is not dict:
            return MISSING
        value = value.get(key, MISSING)
        if value is MISSING:
            break
    return value


class DocumentMapper:
    """Turns a parsed record (a dict) into a Document, or says why it is Filtered."""

    def __init__(self, source: SourceConfig, filters: Filters):
        self.text_field = source.text_field
        self.text_path = tuple(source.text_field.split("."))
        self.meta_paths = [(name, tuple(name.split("."))) for name in sorted(source.meta_fields)]
        self.exclude = [(tuple(field.split(".")), tuple(values)) for field, values in source.exclude.items()]
        self.min_chars = max(filters.min_chars, 1)  # an empty document is never kept
        self.max_bytes = filters.max_record_bytes

    def __call__(self, record: Any) -> Document | Filtered:
        if type(record) is not dict:
            raise Malformed(f"record is of type {type(record).__name__}, not a JSON object")
        text = lookup(record, self.text_path)
        if text is MISSING:
            raise Malformed(f"no text field {self.text_field!r}")
        if type(text) is not str:
            kind = "null" if text is None else f"of type {type(text).__name__}"
            raise Malformed(f"text field {self.text_field!r} is {kind}, not a string")
        for path, values in self.exclude:
            if lookup(record, path) in values:
                return Filtered.EXCLUDED
        text = unicodedata.normalize("NFC", text)
        had_nul = "\x00" in text
        if had_nul:
            text = text.replace("\x00", "")
        if len(text) < self.min_chars:
            return Filtered.TOO_SHORT
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        if size > self.max_bytes:
            raise Malformed(f"text of {size} bytes exceeds max_record_bytes={self.max_bytes}")
        if not self.meta_paths:
            return Document(text, "{}", size, had_nul)
        meta = {name: value for name, path in self.meta_paths if (value := lookup(record, path)) is not MISSING}
        try:
            meta_json = orjson.dumps(meta, default=str, option=orjson.OPT_SORT_KEYS).decode()
        except orjson.JSONEncodeError as error:  # e.g. nesting deeper than orjson writes
            raise Malformed(f"meta fields cannot be written as JSON: {error}") from None
        return Document(text, meta_json, size, had_nul)


def row_sample(record: Any) -> bytes:
    """The start of a table row, for the quarantine."""
    try:
        return orjson.dumps(record, default=str)[:RAW_SAMPLE]
    except orjson.JSONEncodeError:
        return repr(record)[:RAW_SAMPLE].encode("utf-8", "replace")
