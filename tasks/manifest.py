"""Stage 7: the manifest. A build is its manifest: every shard with its counts and checksums,
the tokenizer's fingerprint, the config, and per-source accounting that must reconcile."""

from __future__ import annotations

from collections import defaultdict

from prefect.artifacts import create_markdown_artifact

from storage.manifest import DatasetManifest, Receipt, SourceAccounting, TokenizerInfo, record_bytes
from storage.shards import token_dtype
from storage.store import ObjectNotFound
from tasks.plan import Build
from tasks.fanout import finished_receipt, list_receipts
from tasks.reporting import artifact_key
from tasks.stage import stage_task

MANIFEST_KEY = "manifest.json"


class AccountingError(RuntimeError):
    """Counts do not reconcile: a document was lost or counted twice somewhere."""


def stage_receipts(build: Build, stage: str, shards: list[str]) -> list[Receipt]:
    receipts = [finished_receipt(build.store, stage, shard) for shard in shards]
    missing = [shard for shard, r in zip(shards, receipts) if r is None]
    if missing:
        raise AccountingError(f"stage {stage} of {build.uri} has no receipt for shards {missing[:5]}")
    return receipts


def account(build: Build) -> tuple[dict[str, SourceAccounting], list[Receipt]]:
    plan = build.plan
    shards = [f.shard for f in plan]
    sources = {s.name: SourceAccounting() for s in build.config.sources}
    for file, receipt in zip(plan, stage_receipts(build, "ingest", shards)):
        acc = sources[file.source]
        for name in ("docs_in", "kept", "filtered", "malformed", "bytes_in"):
            setattr(acc, name, getattr(acc, name) + receipt.counts.get(name, 0))
    removed = defaultdict(int)
    for stage in ("exact-dedup", "near-dedup"):
        for receipt in list_receipts(build.store, stage):
            for name, value in receipt.counts.items():
                if ":" in name:
                    removed[tuple(name.split(":", 1))] += value
    tokenized = stage_receipts(build, "tokenize", shards)
    documents = defaultdict(int)
    for file, receipt in zip(plan, tokenized):
        sources[file.source].tokens += receipt.counts["tokens"]
        documents[file.source] += receipt.counts["documents"]
    for name, acc in sources.items():
        acc.exact_dup = removed[("exact_dup", name)]
        acc.near_dup = removed[("near_dup", name)]
        acc.kept -= acc.exact_dup + acc.near_dup
        if not acc.reconciles or acc.kept != documents[name]:
            raise AccountingError(
                f"source {name!r} does not reconcile: {acc.model_dump()} but {documents[name]} documents tokenized"
            )
    return sources, tokenized


@stage_task("manifest")
def write_manifest(build: Build, tokenizer: TokenizerInfo) -> str:
    sources, tokenized = account(build)
    manifest = DatasetManifest(
        name=build.config.name,
        build_id=build.id,
        config=build.config.content(),
        config_hash=build.config.config_hash(),
        tokenizer=tokenizer,
        documents=build.config.documents,
        dtype=token_dtype(tokenizer.vocab_size).name,
        shards=[shard for receipt in tokenized for shard in receipt.token_shards],
        sources=sources,
    )
    body = record_bytes(manifest)
    store = build.store
    try:
        unchanged = store.get_bytes(MANIFEST_KEY) == body
    except ObjectNotFound:
        unchanged = False
    if not unchanged:  # a finished build's rerun rewrites nothing
        store.put_bytes(MANIFEST_KEY, body)
    uri = store.url(MANIFEST_KEY)
    create_markdown_artifact(summary_markdown(manifest, uri), key=artifact_key(build.config.name, "summary"))
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
