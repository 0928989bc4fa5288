"""The near-dedup stage as one Prefect task: every step runs through tasks.fanout.run_stage."""

from __future__ import annotations

from storage import build_layout as layout
from tasks.near_dedup.steps import DocsShard, bands_rows, run_near_dedup
from tasks.partitioning import NEAR_BAND_ROW_BYTES, NEAR_EDGE_BYTES, batch_bytes, ingested_documents, partitions
from tasks.plan import Build
from tasks.stage import NEAR_DEDUP, stage_task
from tasks.step_result import StepResult, StepRun


@stage_task(NEAR_DEDUP)
def near_dedup(build: Build, ingested: StepResult) -> StepResult:
    store, config = build.store, build.config
    documents, sizes = ingested_documents(ingested.summary(store))
    budget, cfg = config.task_memory_bytes, config.minhash
    bands, _ = bands_rows(cfg)
    cfg = cfg.model_copy(
        update={
            "bucket_partitions": partitions(documents, bands * NEAR_BAND_ROW_BYTES, budget, cfg.bucket_partitions),
            "component_partitions": partitions(documents, NEAR_EDGE_BYTES, budget, cfg.component_partitions),
        }
    )
    exact = config.dedup.exact
    shards = [
        DocsShard(f, layout.docs(f.source, f.shard), exact, sizes[f.shard])
        for f in build.plan
    ]
    run = StepRun(NEAR_DEDUP, store, config)
    run_near_dedup(store, shards, cfg, run, batch_bytes(budget), budget)
    return run.result()
