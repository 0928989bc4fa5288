"""Stage 7: publish the manifest. A build is its manifest: every shard with its counts and checksums,
the tokenizer's fingerprint, the config, and per-source accounting that must reconcile."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from storage import build_layout as layout
from storage.manifest import (
    DatasetManifest,
    ShardTable,
    SourceAccounting,
    TokenizerInfo,
    new_manifest,
    put_manifest,
    read_manifest,
    record_bytes,
)
from storage.shards import token_dtype
from storage.stage_summary import StageSummary
from storage.store import ObjectNotFound, StoreError
from tasks.parquet_io import read_table
from tasks.plan import Build
from tasks.reporting import build_artifact_key, step_seconds
from tasks.stage import EXACT_DEDUP, INGEST, MANIFEST, NEAR_DEDUP, PLAN, TOKENIZE, TOKENIZER, stage_task
from tasks.step_result import StepResult


class AccountingError(ValueError):
    """Counts do not reconcile: a document was lost or counted twice somewhere. A ValueError:
    a retry would find the same counts."""


def account(build: Build, counted: Sequence[StepResult], tokenized: StepResult) -> dict[str, SourceAccounting]:
    """Per-source accounting from the steps' results: ingest's counts less the duplicates
    removed (`counted`: ingest and the dedup steps), checked against the documents tokenize wrote."""
    sources = {s.name: SourceAccounting() for s in build.config.sources}
    for step in counted:
        for name, share in step.sources.items():
            sources[name] = sources[name] + share
    for name, acc in sources.items():
        written = tokenized.sources.get(name, SourceAccounting())  # documents written (as kept) and tokens
        acc.kept -= acc.exact_dup + acc.near_dup
        acc.tokens = written.tokens
        if not acc.reconciles or acc.kept != written.kept:
            summaries = [step.summary(build.store) for step in (*counted, tokenized)]
            raise AccountingError(
                f"source {name!r} does not reconcile: {acc.model_dump()} but {written.kept} documents tokenized; "
                f"{receipts_of(build, summaries, name)}"
            )
    return sources


NAMED_RECEIPTS = 5  # receipts an AccountingError names before it counts the rest


def _adds_up(shares: pa.Table) -> np.ndarray:
    """Per share (SourceAccounting's columns): an ingest share (documents in) reconciles on its
    own; the other stages count losses or outputs only."""
    docs_in = shares["docs_in"].to_numpy()
    where_they_went = sum(shares[name].to_numpy() for name in ("kept", "filtered", "exact_dup", "near_dup", "malformed"))
    return (docs_in == 0) | (docs_in == where_they_went)


def receipts_of(build: Build, summaries: list[StageSummary], source: str) -> str:
    """The receipts that counted `source`, those whose own counts do not add up first (else in
    stage and shard order), from the summaries' columns."""
    counted = [(summary.stage, shares, _adds_up(shares)) for summary in summaries for shares in [summary.shares(source)]]
    total = sum(len(adds_up) for _, _, adds_up in counted)
    odd = sum(int((~adds_up).sum()) for _, _, adds_up in counted)
    named = [
        (stage, shard)
        for wanted in (False, True)
        for stage, shares, adds_up in counted
        for shard in pc.filter(shares["shard"], pa.array(adds_up == wanted)).to_pylist()[:NAMED_RECEIPTS]
    ][:NAMED_RECEIPTS]
    keys = ", ".join(build.store.url(layout.receipt(stage, shard)) for stage, shard in named)
    more = f" and {total - NAMED_RECEIPTS} more" if total > NAMED_RECEIPTS else ""
    return f"counted by {keys}{more} ({odd} of them do not add up on their own)"


@stage_task(MANIFEST)
def write_manifest(build: Build, tokenizer: TokenizerInfo, counted: Sequence[StepResult], tokenized: StepResult) -> str:
    """The manifest of the token files the tokenize step committed or listed intact in this run
    (tasks.fanout), from its summary's columns: nothing under tokens/ is read or listed again.
    `counted`: the ingest and dedup steps whose per-source accounting must reconcile."""
    store, config = build.store, build.config
    token_shards = tokenized.summary(store).table.column("token_shards")
    shards = ShardTable.of_columns(pc.list_flatten(token_shards).combine_chunks())
    del token_shards
    manifest, table = new_manifest(
        shards,
        layout.SHARD_TABLE,
        name=config.name,
        build_id=build.id,
        config=config.content(),
        config_hash=config.config_hash(),
        tokenizer=tokenizer,
        documents=build.config.documents,
        dtype=token_dtype(tokenizer.vocab_size).name,
        sources=account(build, counted, tokenized),
    )
    try:  # the header records the table's sha256: an equal header means an equal table
        unchanged = store.get_bytes(layout.MANIFEST) == record_bytes(manifest)
    except ObjectNotFound:
        unchanged = False
    if not unchanged:  # a finished build's rerun rewrites nothing
        put_manifest(store, layout.MANIFEST, manifest, table)
    return store.url(layout.MANIFEST)


NEAR_SAMPLE_ROWS = 5  # near duplicates shown in the summary (all of them are in the sample's parquet)
SNIPPET_CHARS = 60


def _cell(value) -> str:
    """A markdown table cell: counts with thousands separators, text on one line without pipes."""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return " ".join(str(value).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    aligned = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = [header, aligned, *[[_cell(v) for v in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def step_rows(build: Build, manifest: DatasetManifest, steps: Sequence[StepResult], seconds: dict[str, float]) -> list[list]:
    """One row per pipeline step that ran (from the steps' results, in pipeline order): stages,
    shards, documents in and out, work and wall seconds."""
    accounting = sum(manifest.sources.values(), SourceAccounting())
    documents = accounting.docs_in
    out_of = {  # documents left after each step, from the manifest's reconciled accounting
        INGEST: documents - accounting.filtered - accounting.malformed,
        EXACT_DEDUP: -accounting.exact_dup,
        NEAR_DEDUP: -accounting.near_dup,
        TOKENIZE: 0,
    }
    rows = [[PLAN, "", len(build.plan), "", "", "", seconds.get(PLAN, 0.0), f"{len(build.plan):,} input units"]]
    kept = 0
    for step in steps:
        docs_in = documents if step.step == INGEST else kept
        if step.step in out_of:
            kept = out_of[step.step] if step.step == INGEST else kept + out_of[step.step]
        note = {
            TOKENIZER: f"vocab {manifest.tokenizer.vocab_size:,}",
            TOKENIZE: f"{manifest.total_tokens:,} tokens",
        }.get(step.step, "")
        counted = step.step in out_of
        rows.append(
            [step.step, step.stages, step.shards, docs_in if counted else "", kept if counted else "",
             step.work_seconds, seconds.get(step.step, 0.0), note]
        )
    shards = manifest.shard_table.rows  # the manifest step runs no stage: it writes the shard table and header
    rows.append([MANIFEST, "", shards, "", "", "", seconds.get(MANIFEST, 0.0), f"{shards:,} token shards in the table"])
    return rows


def near_sample_rows(build: Build) -> list[list]:
    sample = read_table(build.store, layout.NEAR_SAMPLE).slice(0, NEAR_SAMPLE_ROWS).to_pylist()
    return [[r["id"], r["kept_id"], round(r["jaccard"], 2), r["text"][:SNIPPET_CHARS], r["kept_text"][:SNIPPET_CHARS]] for r in sample]


def summary_markdown(build: Build, manifest: DatasetManifest, uri: str, train_run: str, steps: list[list]) -> str:
    """The build's one summary: what it made, where, its steps in pipeline order, per-source
    accounting, the training it feeds and the pages to look at."""
    config = build.config
    training = (
        f"the build→train automation (`train-on-build`) trains run `{train_run}` on it"
        if train_run
        else "the build→train automation (`train-on-build`) trains on it the run of its settings, "
        f"or `{config.name}-{build.id}` when that run trains on other datasets"
    )
    pages = []
    if flow_run.ui_url:
        pages.append(f"[this build run]({flow_run.ui_url})")
        pages.append(f"[every run]({flow_run.ui_url.split('/flow-runs/')[0]}/runs)")
    parts = [
        f"# Build `{manifest.name}/{manifest.build_id}`\n",
        f"Manifest: `{uri}`  \n"
        f"{manifest.shard_table.rows:,} token shards, {manifest.total_documents:,} documents, "
        f"{manifest.total_tokens:,} tokens ({manifest.dtype}), tokenizer `{manifest.tokenizer.sha256[:12]}` "
        f"(vocab {manifest.tokenizer.vocab_size:,}).  \n"
        f"Training: {training}; `tinyllama train-epoch <run>` trains it further.  \n"
        + (f"Pages: {' · '.join(pages)}\n" if pages else ""),
        "## Steps\n",
        _table(
            ["step", "stages", "shards", "documents in", "documents out", "work s", "wall s", "notes"],
            steps,
        ),
        "## Sources\n",
        _table(
            ["source", "files", "bytes in", "docs in", "kept", "filtered", "exact dup", "near dup", "malformed", "tokens"],
            [
                [n, sum(f.source == n for f in build.plan), sum(f.size for f in build.plan if f.source == n),
                 a.docs_in, a.kept, a.filtered, a.exact_dup, a.near_dup, a.malformed, a.tokens]
                for n, a in manifest.sources.items()
            ],
        ),
    ]
    if config.dedup.near:
        sample = near_sample_rows(build)
        parts += [
            f"## Near duplicates (first {NEAR_SAMPLE_ROWS}; the sample is `{build.store.url(layout.NEAR_SAMPLE)}`)\n",
            _table(["removed", "kept", "jaccard", "removed text", "kept text"], sample) if sample else "none removed\n",
        ]
    return "\n".join(parts)


def step_line(row: list) -> str:
    """A step's row of the summary as one log line."""
    step, _, shards, docs_in, docs_out, work, wall, note = row
    parts = [f"{shards:,} shards"]
    if docs_in != "":
        parts.append(f"{docs_in:,} -> {docs_out:,} documents")
    if work != "":
        parts.append(f"{work:,.1f} s of work")
    parts.append(f"{wall:,.1f} s wall")
    return f"{step}: {', '.join(parts)}" + (f" ({note})" if note else "")


def publish_summary(build: Build, manifest_uri: str, steps: Sequence[StepResult], train_run: str = "") -> None:
    """The build run's summary artifact, at the flow run's level (the Artifacts tab shows it above
    the steps' progress bars), and its steps in the run's log.

    It is for display: the build is complete once its manifest is written, so a store still
    failing past its retry deadline (storage/retry.py) leaves the summary out, logged, and never
    fails the build."""
    logger = get_run_logger()
    try:
        manifest = read_manifest(build.store, layout.MANIFEST)
        rows = step_rows(build, manifest, steps, step_seconds())
        markdown = summary_markdown(build, manifest, manifest_uri, train_run, rows)
    except StoreError as error:
        logger.warning("the build's summary is left out (the build itself is complete): %s", error)
        return
    for row in rows:
        logger.info(step_line(row))
    create_markdown_artifact(
        markdown,
        key=build_artifact_key(build.config, "summary"),
        description=f"build {build.id}: steps, sources, training, pages",
    )
