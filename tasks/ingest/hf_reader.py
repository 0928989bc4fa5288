"""Format hf: rows [start, end) of a local dataset saved with `datasets.Dataset.save_to_disk`, read with pyarrow."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from storage.store import open_store
from tasks.config import SourceConfig
from tasks.ingest.reader import IngestError, Reader, Record, table_columns, table_rows


class HfReader(Reader):
    def records(self) -> Iterator[Record]:
        file = self.file
        store = open_store(file.uri)
        if store.local_path() is None:
            raise IngestError(f"{file.uri}: format hf reads a local folder written by Dataset.save_to_disk")
        try:
            state = json.loads(store.local_path("state.json").read_text())
            # A key check too: a file name in state.json cannot point outside the folder.
            paths = [store.local_path(entry["filename"]) for entry in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise IngestError(f"{file.uri}: not a dataset folder written by Dataset.save_to_disk: {error}") from None
        start, end = file.rows if file.rows is not None else (0, None)
        yield from table_rows(_batches(paths, start, end, self.source, file.uri), file.uri, start)


def _batches(paths: list[Path], start: int, end: int | None, source: SourceConfig, uri: str) -> Iterator[pa.RecordBatch]:
    position = 0  # dataset row of the next batch
    columns: list[str] | None = None
    for path in paths:
        try:
            mapped = pa.memory_map(str(path))
            reader = pa.ipc.open_stream(mapped)
        except (pa.ArrowException, OSError) as error:
            raise IngestError(f"{uri}: cannot read {path.name}: {error}") from None
        with mapped:
            if columns is None:
                columns = table_columns(reader.schema, source, uri)
            for batch in reader:
                first, position = position, position + batch.num_rows
                if position <= start:
                    continue
                if end is not None and first >= end:
                    return
                lo = max(start, first)
                hi = position if end is None else min(end, position)
                yield batch.slice(lo - first, hi - lo).select(columns)
