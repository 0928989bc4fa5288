"""One planned input file to its docs shard (and quarantine), with its typed per-source counts."""

from __future__ import annotations

import tempfile
from pathlib import Path

from storage import build_layout as layout
from storage.manifest import ShardResult, SourceAccounting, upload
from storage.store import Store
from tasks.config import Filters, Format, SourceConfig
from tasks.ingest.docs_writer import DocsWriter
from tasks.ingest.documents import DocumentMapper, Filtered, Malformed, row_sample
from tasks.ingest.hf_reader import HfReader
from tasks.ingest.jsonl_reader import JsonlReader, JsonlZstReader
from tasks.ingest.parquet_reader import ParquetReader
from tasks.ingest.quarantine import Quarantine
from tasks.ingest.reader import Bad, Reader
from tasks.plan import PlannedFile, check_unchanged, document_id
from tasks.stage_counts import IngestCounts

READERS: dict[Format, type[Reader]] = {
    Format.jsonl: JsonlReader,
    Format.jsonl_zst: JsonlZstReader,
    Format.parquet: ParquetReader,
    Format.hf: HfReader,
}


def docs_key(file: PlannedFile) -> str:
    """The document shard of a planned file, relative to the build folder."""
    return layout.docs(file.source, file.shard)


def quarantine_key(file: PlannedFile) -> str:
    """The malformed records of a planned file, relative to the build folder."""
    return layout.quarantine(file.source, file.shard)


def ingest_file(file: PlannedFile, source: SourceConfig, filters: Filters, quarantine: bool, out: Store) -> ShardResult:
    """Ingest one planned file into `out` (the build folder) and return what it wrote and counted.

    An input that is no longer the one planned (InputChanged) is refused before anything is
    written for it: by the read itself (an S3 GET's length and ETag, the opened file's stat), and
    by check_unchanged before it (a pinned sha256) and after it, before the upload (a local file
    edited in place while it was read; an S3 GET serves one version whole), with no request of
    their own but the hashing read.
    """
    if file.source != source.name:
        raise ValueError(f"planned file of source {file.source!r} given the config of source {source.name!r}")
    check_unchanged(file)
    to_document = DocumentMapper(source, filters)
    docs_in = kept = excluded = too_short = bytes_in = nul_stripped = 0
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        docs_path, bad_path = Path(tmp) / "docs.parquet", Path(tmp) / "quarantine.jsonl"
        reader = READERS[source.format](file, source, filters, Path(tmp))
        with DocsWriter(docs_path, source.name) as docs, Quarantine(bad_path if quarantine else None, file.uri) as bad:
            for record in reader.records():
                docs_in += 1
                if type(record.value) is Bad:
                    bad.add(record.location, record.value.reason, record.raw)
                    continue
                try:
                    document = to_document(record.value)
                except Malformed as error:
                    bad.add(record.location, str(error), record.raw if record.raw is not None else row_sample(record.value))
                    continue
                if document is Filtered.EXCLUDED:
                    excluded += 1
                elif document is Filtered.TOO_SHORT:
                    too_short += 1
                else:
                    docs.add(document_id(file.ordinal, record.index), document.text, document.meta, document.size)
                    kept += 1
                    bytes_in += document.size
                    nul_stripped += document.had_nul
        counts = IngestCounts(
            docs_in=docs_in,
            kept=kept,
            filtered=excluded + too_short,
            malformed=bad.count,
            bytes_in=bytes_in,
            excluded=excluded,
            nul_stripped=nul_stripped,
        )
        assert docs_in == kept + counts.filtered + bad.count, counts
        check_unchanged(file, hash_content=False)
        outputs = [upload(out, docs_key(file), docs_path)]
        if bad.count:
            outputs.append(upload(out, quarantine_key(file), bad_path))
    accounting = SourceAccounting(
        docs_in=docs_in, kept=kept, filtered=counts.filtered, malformed=bad.count, bytes_in=bytes_in
    )
    return ShardResult(outputs=outputs, counts=counts, sources={file.source: accounting})
