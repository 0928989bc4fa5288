"""Malformed records to a local jsonl (uri, line or row, reason, the first KiB); with quarantine off, the first one raises."""

from __future__ import annotations

from pathlib import Path

import orjson

from tasks.ingest.reader import RAW_SAMPLE, IngestError, Location


class Quarantine:
    """Writes bad records to a local jsonl; with no path (quarantine off) the first one raises."""

    def __init__(self, path: Path | None, uri: str):
        self._file = open(path, "wb") if path is not None else None
        self._uri = uri
        self.count = 0

    def add(self, location: Location, reason: str, raw: bytes) -> None:
        if self._file is None:
            raise IngestError(
                f"{self._uri} {location.kind} {location.number}: {reason} "
                "(set quarantine: true to count and quarantine bad records)"
            )
        sample = raw[:RAW_SAMPLE].decode("utf-8", "replace")
        entry = {"uri": self._uri, location.kind: location.number, "reason": reason, "raw": sample}
        self._file.write(orjson.dumps(entry) + b"\n")
        self.count += 1

    def __enter__(self) -> Quarantine:
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
