"""Stage 2, ingest: read one planned input file and write its documents as one parquet shard.

Every source's records map to one document schema (id, source, text, meta). Text is
NFC-normalized; NUL characters are stripped from it (they carry no text and break C-string
tools downstream; the record is kept and counted in `nul_stripped`). A record is:
- kept, or
- filtered: its `exclude` field matches, or its text is empty or shorter than `min_chars`, or
- malformed: not JSON, not an object, no string text field, invalid UTF-8 (the reason names
  its byte offset) or lone surrogates, nesting deeper than the parser's limit, longer than
  `max_record_bytes`, or the point where a `.zst` stream ends inside a frame or is corrupt.
A UTF-8 byte order mark at the start of a jsonl file (of its text, for .zst) is not part of
its first record.
With quarantine on, malformed records are counted and written to a quarantine jsonl
(uri, 1-based line or 0-based row, reason, the first KiB of the record); with it off, the
first one fails the file with an IngestError naming file and line/row, and nothing is
written. A whole-file problem (an unreadable parquet file, a missing text column) is always
an IngestError: it is a configuration error, not a bad record. Blank lines are not records.

Memory stays bounded whatever the input: lines are read in chunks and a line over the cap
is skipped chunk by chunk, decompression is streamed, and documents are written in row groups.

The modules, in the order a record passes them:
- `reader.py`: the reader interface (one planned file in, records with their line or row out)
  and the table helpers the parquet and HF readers share;
  `jsonl_reader.py` (jsonl and jsonl.zst, over `zstd_frames.py`), `parquet_reader.py`,
  `hf_reader.py`: one reader per format;
- `documents.py`: a record to a document, or a filter verdict, or malformed;
- `quarantine.py`: malformed records to a jsonl (or the first one raised);
- `docs_writer.py`: documents to the parquet shard;
- `shard.py`: one planned file to its docs shard (`ingest_file`); `task.py`: the Prefect stage.
"""

from tasks.ingest.docs_writer import DOC_SCHEMA
from tasks.ingest.reader import IngestError
from tasks.ingest.shard import docs_key, ingest_file, quarantine_key
from tasks.ingest.task import ingest

__all__ = ["DOC_SCHEMA", "IngestError", "docs_key", "ingest", "ingest_file", "quarantine_key"]
