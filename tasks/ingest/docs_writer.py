"""Documents to a parquet docs shard (zstd), one row group per ~8 MiB of text or 2048 documents."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DOC_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("text", pa.large_string(), nullable=False),  # large: no 2 GiB limit per row group
        pa.field("meta", pa.string(), nullable=False),  # JSON object of the kept meta fields
    ]
)

ROW_GROUP_BYTES = 8 << 20  # a row group is written once this much text is buffered...
ROW_GROUP_DOCS = 2048  # ...or this many documents


class DocsWriter:
    """Buffers documents and writes them to a parquet file in row groups."""

    def __init__(self, path: Path, source: str):
        self._writer = pq.ParquetWriter(
            path, DOC_SCHEMA, compression="zstd", use_dictionary=["source"], write_statistics=["id"]
        )
        self._source = source
        self._ids: list[int] = []
        self._texts: list[str] = []
        self._metas: list[str] = []
        self._bytes = 0

    def add(self, doc_id: int, text: str, meta: str, size: int) -> None:
        self._ids.append(doc_id)
        self._texts.append(text)
        self._metas.append(meta)
        self._bytes += size
        if self._bytes >= ROW_GROUP_BYTES or len(self._ids) >= ROW_GROUP_DOCS:
            self._flush()

    def _flush(self) -> None:
        if not self._ids:
            return
        rows = len(self._ids)
        table = pa.table(
            [
                pa.array(self._ids, pa.int64()),
                pa.array([self._source] * rows, pa.string()),
                pa.array(self._texts, pa.large_string()),
                pa.array(self._metas, pa.string()),
            ],
            schema=DOC_SCHEMA,
        )
        self._writer.write_table(table, row_group_size=rows)
        self._ids, self._texts, self._metas, self._bytes = [], [], [], 0

    def __enter__(self) -> DocsWriter:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self._flush()
        finally:
            self._writer.close()
