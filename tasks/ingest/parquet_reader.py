"""Format parquet: the rows of one parquet file, read in batches of the columns the source needs."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.ingest.reader import IngestError, Reader, Record, table_columns, table_rows
from tasks.plan import input_path

BATCH_ROWS = 1024


class ParquetReader(Reader):
    def records(self) -> Iterator[Record]:
        file = self.file
        path = input_path(file, self.tmp)
        try:
            parquet = pq.ParquetFile(path)
            columns = table_columns(parquet.schema_arrow, self.source, file.uri)
        except (pa.ArrowException, OSError) as error:
            raise IngestError(f"{file.uri}: not a readable parquet file: {error}") from None
        with parquet:
            yield from table_rows(parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns), file.uri, 0)
