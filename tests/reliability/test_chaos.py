"""Chaos: a seeded loop SIGKILLs the build process or a busy Ray worker at random moments of a
build, restarting the build whenever it died, then lets it finish; the result must be the same
bytes as an undisturbed build. And three short rounds of benchmarks/chaos.py (store faults and
SIGKILLs over build and training).

TINYLLAMA_CHAOS_KILLS (default 5) sets the number of kills, TINYLLAMA_CHAOS_SEED the seed.
A moment is "after 0, 1 or 2 more receipts, then up to half a second": it lands in Ray's start,
the plan, inside any stage, or between stages, and the seed makes the run reproducible.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.builds import assert_reconciles, build_objects, sample_config
from tests.reliability.cluster import RayCluster, finish_build, ray_workers, start_build

KILLS = int(os.environ.get("TINYLLAMA_CHAOS_KILLS", "5"))
SEED = int(os.environ.get("TINYLLAMA_CHAOS_SEED", "16"))
MOMENT_TIMEOUT_S = 240
CHAOS_ROUNDS_SEED = 7  # its 3 rounds hold a SIGKILL and faults of several kinds


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """One node with two CPUs, outside the build process: killing the build leaves Ray up, as on a
    real cluster. Started after S3 so that its workers inherit the endpoint and credentials."""
    cluster = RayCluster()
    try:
        cluster.head = cluster.start_node(head=True, cpus=2)
        yield cluster
    finally:
        cluster.stop()


def receipt_count(output: Path) -> int:
    return sum(1 for _ in output.glob("datasets/*/*/receipts/*/*.json"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_seeded_kills_of_the_build_or_a_worker_then_a_rerun_give_identical_bytes(
    cluster, corpus, reference, prefect_server, tmp_path
):
    rng = random.Random(SEED)
    output = tmp_path / "out"
    config = sample_config(corpus, str(output))
    build = start_build(config, tmp_path, prefect_server, cluster.address)
    kills: list[str] = []
    while len(kills) < KILLS:
        if build.poll() is not None:  # killed (or failed after a kill): resume it
            assert not list(output.glob("datasets/*/*/manifest.json"))
            build = start_build(config, tmp_path, prefect_server, cluster.address)
        target = receipt_count(output) + rng.randint(0, 2)
        deadline = time.monotonic() + MOMENT_TIMEOUT_S
        while receipt_count(output) < target and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.5))
        assert build.poll() is None or build.returncode != 0, f"the build finished after only {len(kills)} kills"
        if build.poll() is not None:
            continue
        busy = ray_workers(cluster.head.pid)
        if rng.random() < 0.5 and busy:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rng.choice(busy), signal.SIGKILL)
            kills.append("worker")
        else:
            os.killpg(build.pid, signal.SIGKILL)
            build.wait()
            kills.append("build")
    if build.poll() is not None:
        build = start_build(config, tmp_path, prefect_server, cluster.address)
    manifest_uri = finish_build(build)
    assert len(kills) == KILLS, kills
    assert_reconciles(manifest_uri, corpus)
    assert build_objects(config.output, receipts=False) == reference


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_three_seeded_rounds_of_store_faults_and_kills_over_build_and_train(prefect_server, tmp_path):
    """benchmarks/chaos.py, short: a reference build + training on SeaweedFS, then 3 rounds of
    seeded proxy faults (bursts, cut bodies, stalls, refusals of up to 15 s) and SIGKILLs of a
    command's whole tree; each round's build bytes, losses and weights equal the reference's,
    no process is left and nothing lands outside the round's prefix."""
    from benchmarks.chaos import run_chaos

    report = run_chaos(tmp_path, rounds=3, seed=CHAOS_ROUNDS_SEED, max_outage=15, prefect_api_url=prefect_server)
    assert report.passed, [(r.index, r.problems) for r in report.rounds]
    assert sum(report.injected.values()) >= 3 and any(r.killed for r in report.rounds), report
    assert not sum(r.reruns for r in report.rounds), "a store fault made a command fail"
