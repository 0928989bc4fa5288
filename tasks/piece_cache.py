"""SentencePiece encoding through a cache of whitespace-delimited chunks: the same ids, faster.

SentencePiece BPE normalizes a document, then merges adjacent symbols whose concatenation is
in the vocabulary, best score first, over the whole normalized string. A model trained with
`split_by_whitespace` (the default, and Llama 2's setting) has no piece with U+2581 (the
escaped space) after another character unless the piece is all U+2581, so no merge, no
user-defined symbol match and no run of unknown pieces ever spans a position where U+2581
follows a character that is not U+2581. The normalized document splits there into chunks
(a run of U+2581, then the text up to the next one): a chunk's ids depend on the chunk alone,
and the document's ids are its chunks' ids end to end.

`PieceCacheEncoder` does this a batch of documents at a time, in Arrow and numpy rather than
per character in Python: normalize (an identity normalizer is a string replace; any other is
SentencePiece's own `normalize`), find the chunk boundaries in the UTF-8 bytes, dictionary-encode
the chunks, look up only the batch's distinct chunks in a bounded dict (chunk -> ids), encode
the misses in one batched call to a copy of the model that leaves text as it is and adds no
dummy prefix, and gather the ids. The conditions are checked on the model itself (its
vocabulary and options), never assumed; a model outside them is encoded by plain `encode`,
and the log says so once.
"""

from __future__ import annotations

import logging
import re
from array import array
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

log = logging.getLogger(__name__)

SPACE = "\u2581"  # what SentencePiece writes for " ": pieces hold it in place of spaces
SPACE_UTF8 = np.frombuffer(SPACE.encode(), np.uint8)
CACHE_BYTES = 64 << 20  # default bound of one encoder's cache
MAX_CACHED_CHARS = 64  # a longer chunk (CJK prose, minified code, base64) is encoded, never kept
ENTRY_OVERHEAD = 150  # bytes of a cache entry beyond its characters (2 bytes each: U+2581 is in most) and ids
Piece = model_pb2.ModelProto.SentencePiece


def cache_unsafe_reason(model: model_pb2.ModelProto) -> str | None:
    """Why the model's chunks' ids would not concatenate to a document's ids, or None."""
    trainer, normalizer = model.trainer_spec, model.normalizer_spec
    if trainer.model_type != model_pb2.TrainerSpec.BPE:
        return f"model_type {model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)} (only BPE is reproduced exactly)"
    if trainer.treat_whitespace_as_suffix:
        return "treat_whitespace_as_suffix"
    if not normalizer.escape_whitespaces:
        return "escape_whitespaces=false"
    matched = [p for p in model.pieces if p.type in (Piece.NORMAL, Piece.USER_DEFINED, Piece.UNUSED)]
    if not any(p.piece == SPACE and p.type == Piece.NORMAL for p in matched):
        return f"no {SPACE!r} piece (a run of unknown pieces could span chunks)"
    spanning = [p.piece for p in matched if re.search(f"[^{SPACE}]{SPACE}", p.piece)]
    if spanning:
        return f"{len(spanning)} pieces hold a space after another character, e.g. {spanning[0]!r} (split_by_whitespace=false?)"
    spaced = [p.piece for p in model.pieces if p.type == Piece.USER_DEFINED and " " in p.piece]
    if spaced:
        return f"user-defined symbols hold a space, e.g. {spaced[0]!r}"
    return None


def _chunk_model(model: model_pb2.ModelProto) -> bytes:
    """The model with a normalizer that leaves text as it is and adds no dummy prefix: chunks
    are normalized already, and a chunk is not the start of a document."""
    chunk = model_pb2.ModelProto()
    chunk.CopyFrom(model)
    spec = chunk.normalizer_spec
    spec.name, spec.precompiled_charsmap, spec.normalization_rule_tsv = "identity", b"", ""
    spec.add_dummy_prefix = spec.remove_extra_whitespaces = False
    return chunk.SerializeToString()


def _as_large_strings(texts: pa.Array | list[str]) -> pa.LargeStringArray:
    texts = pa.array(texts, pa.large_string()) if isinstance(texts, list) else texts.cast(pa.large_string())
    if texts.null_count:
        raise ValueError(f"{texts.null_count} of {len(texts)} texts to encode are null")
    return texts


def _chunks(normalized: pa.LargeStringArray) -> tuple[pa.LargeStringArray, np.ndarray]:
    """Every document's chunks in order (views of `normalized`'s bytes), and where each
    document's chunks start (one more entry than documents)."""
    offsets = np.frombuffer(normalized.buffers()[1], np.int64)[normalized.offset : normalized.offset + len(normalized) + 1]
    data = normalized.buffers()[2]
    if data is None or offsets[-1] == offsets[0]:
        return pa.array([], pa.large_string()), np.zeros(len(offsets), np.int64)
    text = np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]]
    width = len(SPACE_UTF8)
    space = np.zeros(len(text) + width, bool)  # where a U+2581 starts, shifted by `width`
    space[width : len(text) + width - 2] = (text[:-2] == SPACE_UTF8[0]) & (text[1:-1] == SPACE_UTF8[1]) & (text[2:] == SPACE_UTF8[2])
    # a chunk starts at a document's start, or at a U+2581 that does not follow one
    breaks = np.flatnonzero(space[width:] & ~space[:-width]) + offsets[0]
    bounds = np.sort(np.concatenate((breaks, offsets)))
    bounds = bounds[np.diff(bounds, prepend=-1) > 0]  # distinct: an empty document has no chunk
    chunks = pa.LargeStringArray.from_buffers(len(bounds) - 1, pa.py_buffer(bounds), data)
    return chunks, np.searchsorted(bounds, offsets)


class PieceCacheEncoder:
    """`encode(texts)` gives the ids `SentencePieceProcessor.encode(texts)` gives (no BOS/EOS),
    as one int32 array and each document's length; chunks' ids are cached, about `cache_bytes`
    at most (the cache is cleared when it is full)."""

    def __init__(self, model_proto: bytes, cache_bytes: int = CACHE_BYTES, num_threads: int = 1, name: str = "the tokenizer"):
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.num_threads = num_threads
        self.cache_bytes = cache_bytes
        self._cache: dict[str, bytes] = {}
        self.cached_bytes = 0  # what the cache holds, as counted on insertion
        self.chunks = self.misses = 0  # chunks seen, and those SentencePiece encoded (once per batch)
        model = model_pb2.ModelProto.FromString(model_proto)
        self.fallback_reason = cache_unsafe_reason(model)
        if self.fallback_reason is not None:
            log.info("%s is encoded without the piece cache: %s", name, self.fallback_reason)
            return
        self._chunk_processor = spm.SentencePieceProcessor(model_proto=_chunk_model(model))
        spec = model.normalizer_spec
        # an identity normalizer only escapes spaces and adds the dummy prefix: done here in Arrow
        self._identity = not spec.precompiled_charsmap and not spec.remove_extra_whitespaces
        self._prefix = pa.scalar(SPACE if spec.add_dummy_prefix else "", pa.large_string())

    @property
    def hit_rate(self) -> float:
        """The share of chunks whose ids came from the cache or an earlier copy in their batch."""
        return 1 - self.misses / self.chunks if self.chunks else 0.0

    def _normalize(self, texts: pa.LargeStringArray) -> pa.LargeStringArray:
        if not self._identity:
            return pa.array(self.processor.normalize(texts.to_pylist()), pa.large_string())
        escaped = pc.replace_substring(texts, " ", SPACE)
        prefixed = pc.binary_join_element_wise(self._prefix, escaped, pa.scalar("", pa.large_string()))
        return pc.if_else(pc.greater(pc.binary_length(texts), 0), prefixed, texts)  # "" stays ""

    def _ids_of(self, chunks: list[str]) -> list[bytes]:
        """Each chunk's ids as int32 bytes: from the cache, or encoded (one batched call) and kept."""
        found = list(map(self._cache.get, chunks))
        missing = [chunk for chunk, ids in zip(chunks, found) if ids is None]
        self.misses += len(missing)
        if not missing:
            return found
        if self.cached_bytes > self.cache_bytes:
            self._cache.clear()
            self.cached_bytes = 0
        encoded = dict(zip(missing, (array("i", ids).tobytes() for ids in self._chunk_processor.encode(missing, num_threads=self.num_threads))))
        kept = {chunk: ids for chunk, ids in encoded.items() if len(chunk) <= MAX_CACHED_CHARS}
        self._cache.update(kept)
        self.cached_bytes += sum(2 * len(chunk) + len(ids) + ENTRY_OVERHEAD for chunk, ids in kept.items())
        return [encoded[chunk] if ids is None else ids for chunk, ids in zip(chunks, found)]

    def encode(self, texts: pa.Array | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All documents' ids end to end (int32), and each document's count of them (int64)."""
        if self.fallback_reason is not None:
            encoded = self.processor.encode(_as_large_strings(texts).to_pylist(), num_threads=self.num_threads)
            lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
            return np.fromiter(chain.from_iterable(encoded), np.int32, int(lengths.sum())), lengths
        chunks, first_chunk = _chunks(self._normalize(_as_large_strings(texts)))
        distinct = pc.dictionary_encode(chunks)
        ids = self._ids_of(distinct.dictionary.to_pylist())
        self.chunks += len(chunks)
        sizes = np.fromiter(map(len, ids), np.int64, len(ids)) // 4  # int32 ids
        table = pa.LargeListArray.from_arrays(np.concatenate(([0], np.cumsum(sizes))), np.frombuffer(b"".join(ids), np.int32))
        tokens = table.take(distinct.indices).flatten().to_numpy()
        chunk_ends = np.concatenate(([0], np.cumsum(sizes[distinct.indices.to_numpy()])))
        return tokens, np.diff(chunk_ends[first_chunk])
