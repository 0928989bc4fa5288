"""Flow `build-dataset`: raw corpora in, token shards and a manifest out.

plan -> ingest -> exact dedup -> near dedup -> tokenizer -> tokenize + pack -> manifest
Each step is one Prefect task; inside it, every shard is one Ray task (tasks.fanout.run_stage).
"""

from __future__ import annotations

from prefect import flow

from flows.cancellation import cancel_task_and_subflow_runs
from tasks.config import BuildConfig
from tasks.exact_dedup import exact_dedup
from tasks.ingest import ingest
from tasks.near_dedup import near_dedup
from tasks.plan import plan
from tasks.publish import publish_summary, write_manifest
from tasks.tokenize import tokenize
from tasks.tokenizer import tokenizer


@flow(name="build-dataset", flow_run_name="build-{config.name}", on_cancellation=[cancel_task_and_subflow_runs])
def build_dataset(config: BuildConfig, train_run: str = "") -> str:
    """Build a tokenized dataset; returns the manifest's URI.

    Args:
        config: The build.
        train_run: The training run that the train-on-build automation trains on this build
            (default: see the train-on-build flow); the build's summary names it.
    """
    build = plan(config)
    ingested = ingest(build)
    counted = [ingested]  # the steps whose per-source accounting the manifest reconciles
    if config.dedup.exact:
        counted.append(exact_dedup(build, ingested))
    if config.dedup.near:
        counted.append(near_dedup(build, ingested))
    trained = tokenizer(build, ingested)
    tokenized = tokenize(build, trained.tokenizer)
    manifest_uri = write_manifest(build, trained.tokenizer, counted, tokenized)
    publish_summary(build, manifest_uri, [*counted, trained, tokenized], train_run)
    return manifest_uri
