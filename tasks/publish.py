"""Stage 7: publish the manifest. A build is its manifest: every shard with its counts and checksums,
the tokenizer's fingerprint, the config, and per-source accounting that must reconcile."""

from __future__ import annotations

import hashlib
from functools import partial

from prefect.artifacts import create_markdown_artifact

from storage import build_layout as layout
from storage.manifest import (
    DatasetManifest,
    Receipt,
    ShardResult,
    SourceAccounting,
    StageSummary,
    TokenizerInfo,
    canonical_json,
    record_bytes,
)
from storage.shards import token_dtype
from storage.store import ObjectNotFound, Store
from tasks.fanout import read_summary, run_stage
from tasks.plan import Build
from tasks.reporting import artifact_key
from tasks.stage import Stage, stage_task

HASH_CHUNK_BYTES = 8 << 20


class AccountingError(RuntimeError):
    """Counts do not reconcile: a document was lost or counted twice somewhere."""


class TokenShardChanged(ValueError):
    """A token shard's bytes differ from what its tokenize receipt recorded."""


def completed(build: Build, stage: str) -> StageSummary:
    summary = read_summary(build.store, stage)
    if summary is None:
        raise AccountingError(f"stage {stage} of {build.uri} has not completed (no valid {layout.summary(stage)})")
    return summary


def account(build: Build, tokenized: StageSummary) -> dict[str, SourceAccounting]:
    """Per-source accounting from the stage summaries: ingest's counts less the duplicates
    removed, checked against the documents tokenize wrote."""
    config = build.config
    stages = ["ingest"] + ["exact-dedup"] * config.dedup.exact + ["near-dedup"] * config.dedup.near
    sources = {s.name: SourceAccounting() for s in config.sources}
    for stage in stages:
        for name, share in completed(build, stage).sources().items():
            sources[name] = sources[name] + share
    written = tokenized.sources()  # per source: documents written (as kept) and tokens
    for name, acc in sources.items():
        acc.kept -= acc.exact_dup + acc.near_dup
        acc.tokens = written.get(name, SourceAccounting()).tokens
        documents = written.get(name, SourceAccounting()).kept
        if not acc.reconciles or acc.kept != documents:
            raise AccountingError(f"source {name!r} does not reconcile: {acc.model_dump()} but {documents} documents tokenized")
    return sources


def _sha256(store: Store, key: str) -> str:
    digest = hashlib.sha256()
    with store.open_read(key) as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_token_shards(store: Store, receipt: Receipt) -> ShardResult:
    """Re-hash one tokenize shard's token files against its receipt (in a Ray task)."""
    checked = 0
    for shard in receipt.token_shards:
        for info in (shard.bin, shard.idx):
            if (actual := _sha256(store, info.key)) != info.sha256:
                raise TokenShardChanged(
                    f"{store.url(info.key)} has sha256 {actual[:12]}, not {info.sha256[:12]} as tokenized; "
                    "it changed after the tokenize stage: rerun the build to redo it"
                )
            checked += info.size
    return ShardResult(counts={"bytes_verified": checked})


def verified_name(receipt: Receipt) -> str:
    """A tokenize shard and a digest of its token files: a redone shard is verified again."""
    digest = hashlib.sha256(canonical_json([s.model_dump(mode="json") for s in receipt.token_shards])).hexdigest()
    return f"{receipt.shard}-{digest[:12]}"


@stage_task("manifest")
def write_manifest(build: Build, tokenizer: TokenizerInfo) -> str:
    store, config = build.store, build.config
    tokenized = completed(build, "tokenize")
    verify = Stage("verify-tokens", tokenized.receipts, verified_name, partial(verify_token_shards, store), ())
    run_stage(store, verify, config.name, config.parallelism)
    manifest = DatasetManifest(
        name=config.name,
        build_id=build.id,
        config=config.content(),
        config_hash=config.config_hash(),
        tokenizer=tokenizer,
        documents=build.config.documents,
        dtype=token_dtype(tokenizer.vocab_size).name,
        shards=[shard for receipt in tokenized.receipts for shard in receipt.token_shards],
        sources=account(build, tokenized),
    )
    body = record_bytes(manifest)
    try:
        unchanged = store.get_bytes(layout.MANIFEST) == body
    except ObjectNotFound:
        unchanged = False
    if not unchanged:  # a finished build's rerun rewrites nothing
        store.put_bytes(layout.MANIFEST, body)
    uri = store.url(layout.MANIFEST)
    create_markdown_artifact(summary_markdown(manifest, uri), key=artifact_key(config.name, "summary"))
    return uri


def summary_markdown(manifest: DatasetManifest, uri: str) -> str:
    rows = "\n".join(
        f"| {name} | {a.docs_in} | {a.kept} | {a.filtered} | {a.exact_dup} | {a.near_dup} | {a.malformed} | {a.tokens} |"
        for name, a in manifest.sources.items()
    )
    return (
        f"# Build `{manifest.name}/{manifest.build_id}`\n\n"
        f"Manifest: `{uri}`  \n"
        f"{len(manifest.shards)} token shards, {manifest.total_documents} documents, "
        f"{manifest.total_tokens} tokens ({manifest.dtype}), tokenizer `{manifest.tokenizer.sha256[:12]}` "
        f"(vocab {manifest.tokenizer.vocab_size}).\n\n"
        "| source | docs in | kept | filtered | exact dup | near dup | malformed | tokens |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        f"{rows}\n"
    )
