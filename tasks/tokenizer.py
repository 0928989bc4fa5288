"""Stage 5: the tokenizer. Load the user's SentencePiece model, or train a BPE one (byte
fallback, identity normalization so code round-trips) on a seeded sample of kept documents,
drawn from only as many docs shards as give it, spread over every source."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache, partial
from itertools import chain

import numpy as np
import pyarrow as pa
import sentencepiece as spm
import xxhash

from storage import build_layout as layout
from storage.manifest import ObjectInfo, ShardResult, TokenizerInfo, record_bytes, sha256_bytes
from storage.stage_summary import StageSummary
from storage.store import ObjectNotFound, Store, open_object
from tasks.config import TokenizerConfig, TokenizerTrain
from tasks.fanout import read_valid
from tasks.parquet_io import read_table
from tasks.partitioning import batch_bytes, batches, ingested_documents
from tasks.plan import Build, PlannedFile
from tasks.removals import deduplicated_ids
from tasks.stage import TOKENIZER, TOKENIZER_SAMPLE, Run, Stage, stage_task
from tasks.step_result import StepResult, StepRun, TokenizerResult
from tasks.stage_counts import TokenizerCounts, TokenizerSampleCounts

# A source's files are chosen to hold this multiple of its quota, and documents drawn at the
# matching rate: dedup (already-deduplicated corpora lose a few percent), blank lines and the
# draw's chance (~1% at thousands of documents) take some; a source left short after all is
# topped up by a further round, sized from its yield.
MARGIN = 1.25
# A source's share comes from at least this many of its files (or all it has), spread over its
# plan order: one file may hold one language (Starcoder's folders) or one crawl.
SPREAD_FILES = 16


class TokenizerError(ValueError):
    pass


def load_sentencepiece(model: bytes, name: str) -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model)
    except (RuntimeError, OSError) as error:
        raise TokenizerError(f"{name} is not a SentencePiece model: {error}") from None
    if processor.eos_id() < 0:
        raise TokenizerError(f"tokenizer {name} has no EOS token; documents need one appended")
    return processor


@lru_cache(maxsize=2)
def cached_processor(uri: str, sha256: str) -> spm.SentencePieceProcessor:
    """One processor per worker process and tokenizer, not one per task or document."""
    store, key = open_object(uri)
    return load_sentencepiece(store.get_bytes(key), uri)


def spread_order(count: int) -> list[int]:
    """0 .. count-1 in an order whose every prefix is spread evenly over the range (van der
    Corput: positions by their bit-reversed value), so a source's first k files span all of it."""
    bits = max(1, (count - 1).bit_length())
    return sorted(range(count), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))


@dataclass(frozen=True)
class SampleGroup:
    """Chosen docs shards of one source that one sample task reads, each document drawn at `rate`;
    its part of the sample is named by its first shard."""

    files: tuple[PlannedFile, ...]
    rate: float

    @property
    def shard(self) -> str:
        return self.files[0].shard


@dataclass
class SourceDraw:
    """One source's share of the sample: `quota` bytes of lines drawn from the first `chosen` of its
    files in spread order (the `groups`), every document at one `rate` fixed by the first round."""

    files: list[PlannedFile]  # in spread order
    kept: list[int]  # each file's kept text bytes, from the ingest summary
    quota: int
    rate: float = 1.0
    chosen: int = 0
    groups: list[SampleGroup] = field(default_factory=list)

    def wanted(self, drawn: dict[str, int]) -> int:
        """Kept bytes of further files to draw from: MARGIN x the quota at first; then, if dedup
        left the lines drawn short of the quota, MARGIN x the shortfall over the yield so far (all
        the rest when nothing came); 0 once the quota is met or every file is chosen."""
        if self.quota <= 0 or self.chosen == len(self.files):
            return 0
        if not self.chosen:
            return math.ceil(MARGIN * self.quota)
        got = sum(drawn[group.shard] for group in self.groups)
        if got >= self.quota:
            return 0
        if not got:
            return sum(self.kept[self.chosen :])
        return math.ceil(MARGIN * (self.quota - got) * sum(self.kept[: self.chosen]) / got)

    def choose(self, wanted: int, sizes: dict[str, int], limit: int) -> list[SampleGroup]:
        """The next files in spread order holding `wanted` kept bytes (at first also at least
        SPREAD_FILES files), as groups of docs shards of at most `limit` bytes."""
        start, held = self.chosen, 0
        while self.chosen < len(self.files) and (held < wanted or (not start and self.chosen < SPREAD_FILES)):
            held += self.kept[self.chosen]
            self.chosen += 1
        if not start:
            self.rate = min(1.0, MARGIN * self.quota / max(1, held))
        files = self.files[start : self.chosen]
        members = batches([sizes[f.shard] for f in files], limit)
        groups = [SampleGroup(tuple(files[r.start : r.stop]), self.rate) for r in members]
        self.groups += groups
        return groups


def source_draws(plan: list[PlannedFile], kept_bytes: dict[str, int], sample_bytes: int) -> list[SourceDraw]:
    """Each source's files in spread order and its quota: its share of the kept text."""
    by_source: dict[str, list[PlannedFile]] = {}
    for file in plan:
        by_source.setdefault(file.source, []).append(file)
    total = max(1, sum(kept_bytes.values()))
    draws = []
    for files in by_source.values():
        spread = [files[i] for i in spread_order(len(files))]
        kept = [kept_bytes[f.shard] for f in spread]
        draws.append(SourceDraw(spread, kept, sample_bytes * sum(kept) // total))
    return draws


def draw_sample(
    store: Store, plan: list[PlannedFile], ingested: StageSummary, sample_bytes: int, seed: int, budget: int, run: Run
) -> list[tuple[list[str], int]]:
    """Draw the training sample from as few docs shards as give it, spread over every source; returns
    each source's sample parts and quota. Only the chosen shards are read; rounds go on while a
    source falls short of its quota and has files left (heavy dedup)."""
    draws = source_draws(plan, ingested.source_sum("bytes_in"), sample_bytes)
    _, sizes = ingested_documents(ingested)
    work = partial(write_sample, store, seed)
    groups: list[SampleGroup] = []
    drawn: dict[str, int] = {}  # group: bytes of lines it drew
    while wanted := [(draw, more) for draw in draws if (more := draw.wanted(drawn))]:
        groups += [group for draw, more in wanted for group in draw.choose(more, sizes, batch_bytes(budget))]
        summary = run(Stage(TOKENIZER_SAMPLE, list(groups), _group_shard, work, (layout.TOKENIZER_SAMPLE,)))
        drawn = dict(zip(summary.shards, (counts.bytes for counts in summary.per_shard(TokenizerSampleCounts))))
    return [([layout.tokenizer_sample(group.shard) for group in draw.groups], draw.quota) for draw in draws]


def write_sample(store: Store, seed: int, group: SampleGroup) -> ShardResult:
    """The non-empty lines of a seeded sample of a group's kept documents: a document is in it
    when a hash of (seed, id) falls below the group's rate, so the sample depends only on the data."""
    threshold = int(min(1.0, group.rate) * (2**64 - 1))
    texts: list[str] = []
    for file in group.files:
        docs = read_table(store, layout.docs(file.source, file.shard), columns=["id", "text"])
        ids = docs.column("id").to_numpy()
        drawn = np.array([xxhash.xxh64_intdigest(i.to_bytes(8, "little"), seed) <= threshold for i in ids.tolist()], dtype=bool)
        rows = np.flatnonzero(drawn & ~np.isin(ids, deduplicated_ids(store, file)))
        texts += docs.column("text").take(pa.array(rows)).to_pylist()
    body = "".join(f"{line}\n" for text in texts for line in text.splitlines() if line.strip()).encode("utf-8")
    key = layout.tokenizer_sample(group.shard)
    outputs = [ObjectInfo(key=key, size=len(body), sha256=sha256_bytes(body), stored=store.put_bytes(key, body))]
    return ShardResult(outputs=outputs, counts=TokenizerSampleCounts(bytes=len(body)))


def sample_lines(store: Store, keys: list[str], sample_bytes: int) -> Iterator[str]:
    """Lines of the sample files in order, until about `sample_bytes` of text."""
    taken = 0
    for key in keys:
        for line in store.get_text(key).splitlines():
            yield line
            taken += len(line.encode("utf-8")) + 1
            if taken >= sample_bytes:
                return


def train_model(lines: Iterator[str], train: TokenizerTrain) -> bytes:
    """A Llama-2-style BPE model: byte fallback, split digits, identity normalization."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_writer=model,
        model_type="bpe",
        vocab_size=train.vocab_size,
        hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary instead of an error
        character_coverage=train.character_coverage,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return model.getvalue()


def make_tokenizer(store: Store, config: TokenizerConfig, sample: list[tuple[list[str], int]], _item: str) -> ShardResult:
    """The one item of the tokenizer stage: load the user's model or train one on the sample (each
    source's parts, until its quota)."""
    if config.model is not None:
        source, key = open_object(config.model)
        try:
            model = source.get_bytes(key)
        except ObjectNotFound:
            raise TokenizerError(f"tokenizer model {config.model} does not exist") from None
    else:
        model = train_model(chain.from_iterable(sample_lines(store, keys, quota) for keys, quota in sample), config.train)
    processor = load_sentencepiece(model, config.model or "the trained tokenizer")
    stored_model = store.put_bytes(layout.TOKENIZER_MODEL, model)
    info = TokenizerInfo(
        key=layout.TOKENIZER_MODEL,
        sha256=sha256_bytes(model),
        vocab_size=processor.vocab_size(),
        bos_id=processor.bos_id(),
        eos_id=processor.eos_id(),
        trained=config.model is None,
    )
    body = record_bytes(info)
    stored_info = store.put_bytes(layout.TOKENIZER_INFO, body)
    outputs = [
        ObjectInfo(key=layout.TOKENIZER_MODEL, size=len(model), sha256=info.sha256, stored=stored_model),
        ObjectInfo(key=layout.TOKENIZER_INFO, size=len(body), sha256=sha256_bytes(body), stored=stored_info),
    ]
    return ShardResult(outputs=outputs, counts=TokenizerCounts(vocab_size=info.vocab_size))


def _group_shard(group: SampleGroup) -> str:
    return group.shard


def _only_shard(_item: str) -> str:
    return TOKENIZER


@stage_task(TOKENIZER)
def tokenizer(build: Build, ingested: StepResult) -> TokenizerResult:
    store, config = build.store, build.config
    run = StepRun(TOKENIZER, store, config)
    sample: list[tuple[list[str], int]] = []
    if config.tokenizer.train is not None:
        sample_bytes = config.tokenizer.train.sample_bytes
        sample = draw_sample(store, build.plan, ingested.summary(store), sample_bytes, config.seed, config.task_memory_bytes, run)
    work = partial(make_tokenizer, store, config.tokenizer, sample)
    run(Stage(TOKENIZER, [TOKENIZER], _only_shard, work, (layout.TOKENIZER_MODEL, layout.TOKENIZER_INFO)))
    info = read_valid(store, layout.TOKENIZER_INFO, TokenizerInfo)
    if info is None:
        raise TokenizerError(f"{store.url(layout.TOKENIZER_INFO)} vanished or was damaged while the build ran; rerun it")
    return TokenizerResult(**dict(run.result()), tokenizer=info)
