"""The whole build-dataset flow: MB/s of raw text per core, each stage's share, Prefect's overhead.

    .venv/bin/python -m benchmarks.build [--bytes 1G]

Makes the sample corpus (default ~1 GB), then runs the flow once on local Ray with every core
into a local folder. Each stage's time is the wall time of its Prefect task's body (the Ray
fan-out, tokenizer training, manifest); Prefect's own overhead is the flow's wall time minus
the sum of the task bodies (task-run bookkeeping, state changes, the flow run itself); Ray and
the Prefect server are started before the clock, as long-lived services are in production.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.tokenize import parse_bytes
from deployments.settings import configure_prefect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=parse_bytes, default=parse_bytes("1G"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-build-"))
    configure_prefect(work)  # before prefect is imported: the flow runs on a temporary server

    import ray
    from prefect import flow

    import flows.build_dataset as flow_module
    from tasks.config import BuildConfig
    from tasks.fanout import ensure_ray
    from tasks.sample_corpus import make_sample_corpus

    started = time.perf_counter()
    corpus = make_sample_corpus(work / "raw", target_bytes=args.bytes)
    print(f"made the corpus in {time.perf_counter() - started:.0f} s: {corpus['documents']}")
    raw_bytes = sum(s["bytes"] for s in corpus["sources"].values())
    config = BuildConfig.model_validate({**yaml.safe_load(Path(corpus["config"]).read_text()), "output": str(work / "out")})

    stage_seconds = time_stages(flow_module)
    # Ray and the Prefect server start before the clock: long-lived services are the normal case.
    ensure_ray()
    cores = int(ray.cluster_resources()["CPU"])
    flow(name="warm-up")(lambda: None)()

    started = time.perf_counter()
    manifest_uri = flow_module.build_dataset(config)
    wall = time.perf_counter() - started
    work_s = sum(stage_seconds.values())

    print(f"\n{raw_bytes / 1e6:.0f} MB raw text, {cores} cores, manifest {manifest_uri}\n")
    print("| stage | seconds | share of flow |\n| --- | ---: | ---: |")
    for name, seconds in stage_seconds.items():
        print(f"| {name} | {seconds:.1f} | {seconds / wall:.1%} |")
    print(f"| Prefect overhead (flow wall - stage bodies) | {wall - work_s:.1f} | {(wall - work_s) / wall:.1%} |")
    print(f"| **flow wall time** | {wall:.1f} | 100% |")
    print(f"\nend to end: {raw_bytes / 1e6 / wall:.2f} MB/s, {raw_bytes / 1e6 / wall / cores:.2f} MB/s per core")


STAGES = ("plan", "ingest", "exact_dedup", "near_dedup", "tokenizer", "tokenize", "write_manifest")


def time_stages(flow_module) -> dict[str, float]:
    """Wrap the body of every stage task of the build flow to add its wall time, by task name,
    to the returned dict."""
    seconds: dict[str, float] = {}
    for name in STAGES:
        stage = getattr(flow_module, name)
        stage.fn = _timed(stage.fn, stage.name, seconds)
    return seconds


def _timed(fn, name: str, seconds: dict[str, float]):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started

    return timed


if __name__ == "__main__":
    main()
