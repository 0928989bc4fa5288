"""The build on a real two-node Ray cluster (two `ray start` processes on 127.0.0.1): the same
bytes as a single-process build, also when a worker or a whole node dies mid-stage."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.reliability.cluster import RayCluster, finish_build, ray_workers, start_build, wait_for
from tests.builds import assert_reconciles, build_objects, sample_config
from tests.reliability.hold_work import driver_env


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    """Started after S3 so that its workers inherit the endpoint and credentials. A build whose
    driver has `driver_env(cluster.hold)` holds the first task of each stage while `cluster.hold`
    exists (tests/reliability/hold_work.py)."""
    cluster = RayCluster()
    cluster.hold = tmp_path_factory.mktemp("hold") / "armed"
    try:
        cluster.head = cluster.start_node(head=True)
        cluster.second = cluster.start_node()
        yield cluster
    finally:
        cluster.stop()


def stages_of(output: Path) -> set[str]:
    """The stages that committed receipts in a build's output."""
    return {folder.name for folder in output.glob("datasets/*/*/receipts/*")}


def test_two_node_build_is_byte_identical_to_a_single_process_build(cluster, corpus, reference, prefect_server, tmp_path):
    config = sample_config(corpus, str(tmp_path / "out"))
    manifest_uri = finish_build(start_build(config, tmp_path, prefect_server, cluster.address))
    assert_reconciles(manifest_uri, corpus)
    assert build_objects(config.output, receipts=False) == reference


def test_a_worker_killed_in_each_stage_changes_nothing(cluster, corpus, reference, prefect_server, tmp_path, monkeypatch):
    # The first task of each stage holds in its worker until this test SIGKILLs that worker:
    # every kill lands inside the stage it is meant for, and Ray must retry that very shard.
    output = tmp_path / "out"
    config = sample_config(corpus, str(output))
    cluster.hold.mkdir()
    for name, value in driver_env(cluster.hold).items():  # the build's driver inherits it
        monkeypatch.setenv(name, value)
    killed: dict[str, tuple[str, int]] = {}  # stage: (shard, pid)
    try:
        build = start_build(config, tmp_path, prefect_server, cluster.address)

        def kill_each_held_task() -> None:
            while build.poll() is None:
                for held in cluster.hold.iterdir():
                    if held.name == "attempts" or held.name in killed or not (text := held.read_text()):
                        continue
                    shard, pid = text.split()
                    os.kill(int(pid), signal.SIGKILL)
                    killed[held.name] = (shard, int(pid))
                time.sleep(0.02)

        killer = threading.Thread(target=kill_each_held_task, daemon=True)
        killer.start()
        manifest_uri = finish_build(build)
        killer.join()
        attempts = [line.split() for line in (cluster.hold / "attempts").read_text().splitlines()]
    finally:
        shutil.rmtree(cluster.hold, ignore_errors=True)
    assert set(killed) == stages_of(output) and {"ingest", "tokenize"} <= set(killed), killed
    for stage, (shard, pid) in killed.items():
        runs = [int(p) for s, sh, p in attempts if (s, sh) == (stage, shard)]
        assert runs[0] == pid and len(runs) >= 2 and pid not in runs[1:], (stage, shard, runs)  # retried elsewhere
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
