"""The build on a real two-node Ray cluster (two `ray start` processes on 127.0.0.1): the same
bytes as a single-process build, also when a worker or a whole node dies mid-stage."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.reliability.cluster import RayCluster, finish_build, ray_workers, start_build, wait_for
from tests.builds import assert_reconciles, build_objects, sample_config


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """Started after S3 so that its workers inherit the endpoint and credentials."""
    cluster = RayCluster()
    try:
        cluster.head = cluster.start_node(head=True)
        cluster.second = cluster.start_node()
        yield cluster
    finally:
        cluster.stop()


def receipts_of(output: Path) -> Path:
    return next(output.glob("datasets/*/*"), output) / "receipts"


def test_two_node_build_is_byte_identical_to_a_single_process_build(cluster, corpus, reference, prefect_server, tmp_path):
    config = sample_config(corpus, str(tmp_path / "out"))
    manifest_uri = finish_build(start_build(config, tmp_path, prefect_server, cluster.address))
    assert_reconciles(manifest_uri, corpus)
    assert build_objects(config.output, receipts=False) == reference


def test_a_worker_killed_in_each_stage_changes_nothing(cluster, corpus, reference, prefect_server, tmp_path):
    output = tmp_path / "out"
    config = sample_config(corpus, str(output))
    build = start_build(config, tmp_path, prefect_server, cluster.address)
    killed: dict[str, int] = {}

    def kill_one_worker_per_stage() -> None:
        # When a stage's first receipt lands, its other shards are still running: SIGKILL one.
        while build.poll() is None:
            receipts = receipts_of(output)
            for stage in sorted(receipts.iterdir()) if receipts.is_dir() else []:
                if stage.name in killed or not any(stage.iterdir()):
                    continue
                busy = ray_workers(cluster.head.pid) + ray_workers(cluster.second.pid)
                for pid in busy[:1]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed[stage.name] = pid
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_worker_per_stage, daemon=True)
    killer.start()
    manifest_uri = finish_build(build)
    killer.join()
    assert {"ingest", "tokenize"} <= set(killed), killed
    assert_reconciles(manifest_uri, corpus)
    assert build_objects(config.output, receipts=False) == reference


def test_the_second_node_killed_mid_stage_the_build_finishes_on_the_head(cluster, corpus, reference, prefect_server, tmp_path):
    config = sample_config(corpus, str(tmp_path / "out"))
    build = start_build(config, tmp_path, prefect_server, cluster.address)
    wait_for(lambda: ray_workers(cluster.second.pid), build, what="a task running on the second node")
    cluster.kill_node(cluster.second)
    manifest_uri = finish_build(build)
    assert_reconciles(manifest_uri, corpus)
    assert build_objects(config.output, receipts=False) == reference
