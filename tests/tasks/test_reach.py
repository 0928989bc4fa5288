"""Local paths that not every node reaches are refused before anything runs, in one line (exit 2).

A node "with disks of its own" is a real process on this machine in a mount namespace of its own
(`unshare -rm`, then a tmpfs over the folder): it sees an empty folder at the same path, as a
second machine would.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.checkpoint import complete_checkpoints
from storage.reach import ADVICE, MARKER_PREFIX
from storage.run_layout import CONFIG_FILE, RunLayout
from storage.store import open_store
from tasks.train import launch_torchrun, other_nodes_command, prepare_config
from tests.builds import tiny_config, tiny_corpus
from tests.fixtures.ports import free_port
from tests.model.runs import (
    error_lines, metrics, short_documents_build, tinyllama_train, train_config, train_state,
)
from tests.reliability.cluster import REPO, RayCluster, cluster_env

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def private_folder(folder: Path) -> list[str]:
    """A command prefix: run the command where `folder` is an empty tmpfs of its own."""
    return ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', str(folder)]


@pytest.mark.slow
def test_a_local_output_that_another_torchrun_node_lacks_is_refused_in_one_line(prefect_server, tmp_path):
    store = tmp_path / "store"
    manifest = short_documents_build(str(store))
    launcher = {"kind": "torchrun", "nproc": 1, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}"}
    config = train_config("two-nodes", str(store), manifest, tmp_path, launcher=launcher)
    config_uri = RunLayout.of(str(store), config.name).store.url(CONFIG_FILE)
    # Node 1 runs what the task tells the other nodes to run: the run's config.json, from its own disk.
    command = shlex.split(other_nodes_command(config_uri, config.launcher, config.name).replace("$NODE_RANK", "1"))
    other_node = subprocess.Popen([*private_folder(store), TORCHRUN, *command[1:]], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        result = tinyllama_train(config, prefect_server, tmp_path)
        other_output, _ = other_node.communicate(timeout=120)
    finally:
        if other_node.poll() is None:
            other_node.kill()
    refusal = f"config {config_uri}: a local path not found from every node of this job; {ADVICE}"
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result) == [f"error: training failed on its input: Unreachable: {refusal}"]
    assert other_node.returncode != 0 and refusal in other_output, other_output[-3000:]
    assert not list((store / "runs" / config.name).glob("checkpoints/*"))  # nothing trained
    assert not list(store.rglob(f"{MARKER_PREFIX}*"))  # the markers are gone


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    """Two Ray nodes; the second has an address and a disk of its own at `cluster.private` (an empty folder there)."""
    private = tmp_path_factory.mktemp("private")
    cluster = RayCluster()
    cluster.private = private
    try:
        cluster.start_node(head=True)
        try:
            cluster.start_node(wrap=private_folder(private), ip="127.0.0.2")
        except RuntimeError:  # `ray start` gives a node 30 s to register: once more on a loaded machine
            cluster.kill_node(cluster.nodes.pop())
            cluster.start_node(wrap=private_folder(private), ip="127.0.0.2")
        yield cluster
    finally:
        cluster.stop()


def tinyllama(address: str, api_url: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI in its own process, a driver of the cluster at `address` (this process has its own Ray)."""
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**cluster_env(address), "PREFECT_API_URL": api_url}, timeout=600)


@pytest.mark.slow
def test_a_build_refuses_a_local_source_that_a_ray_node_lacks(cluster, prefect_server, tmp_path):
    inputs = tiny_corpus(cluster.private / "raw", files=2, docs_per_file=5, seed=1)
    config = tiny_config(f"{inputs}/*.jsonl", str(tmp_path / "out"))  # the output: on both nodes
    (tmp_path / "build.yaml").write_text(config.model_dump_json())
    result = tinyllama(cluster.address, prefect_server, "build-dataset", str(tmp_path / "build.yaml"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result) == [
        f"error: sources.0.uri {inputs}/*.jsonl: a local path not found from every node of the Ray cluster "
        f"(2 nodes); {ADVICE}"
    ]
    assert not list((tmp_path / "out").rglob("plan.json")) and not list(tmp_path.rglob(f"{MARKER_PREFIX}*"))


@pytest.mark.slow
def test_ray_train_shares_out_the_data_by_the_nodes_it_placed_workers_on(cluster, prefect_server, tmp_path):
    store = tmp_path / "store"  # on both nodes: the check passes
    manifest = short_documents_build(str(store))
    # One CPU per node: Ray Train puts one worker on each.
    config = train_config("ray-nodes", str(store), manifest, tmp_path, max_steps=2,
                          launcher={"kind": "ray", "workers": 2, "gpus_per_worker": 0})
    (tmp_path / "run.yaml").write_text(config.to_json())
    result = tinyllama(cluster.address, prefect_server, "--data", str(tmp_path / "data"), "train",
                       str(tmp_path / "run.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_state(config.run_uri)["loader"]["nodes"] == 2  # from Ray Train's context, not data_nodes
    assert not list(store.rglob(f"{MARKER_PREFIX}*"))


def agent(command: list[str], home: Path, run_dir: Path) -> subprocess.Popen:
    """One torchrun agent as on a machine of its own: its own HOME, TMPDIR, cache and working folder,
    and an empty `run_dir` (the run's local folder: metrics, shard cache) that no other agent sees."""
    for folder in ("home", "tmp", "cache", "work"):
        (home / folder).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home / "home"), "TMPDIR": str(home / "tmp"),
           "XDG_CACHE_HOME": str(home / "cache"), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([*private_folder(run_dir), TORCHRUN, *command[1:]], cwd=home / "work", env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_two_torchrun_agents_sharing_only_s3_resume_after_one_is_killed_with_the_same_losses(
    s3_bucket_uri, tmp_path
):
    """Two agents, each as on its own machine, train one run on S3; one is SIGKILLed once a
    checkpoint is committed, the other fails with it; both started again resume from the store and
    every loss equals an uninterrupted run's (the single agent plays the two data nodes)."""
    prefix = f"{s3_bucket_uri}/agents-{tmp_path.name}"
    manifest = short_documents_build(f"{prefix}/data")
    steps = dict(max_steps=24, checkpoint_every=4)
    reference = prepare_config(train_config("reference", f"{prefix}/out", manifest, tmp_path, data_nodes=2,
                                            launcher={"kind": "torchrun", "nproc": 2}, **steps))
    launch_torchrun(RunLayout.of(reference.output, reference.name).write_config(reference.to_json()),
                    reference.launcher, "reference", on_line=lambda line: None)

    launcher = {"kind": "torchrun", "nproc": 1, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}"}
    config = prepare_config(train_config("agents", f"{prefix}/out", manifest, tmp_path, launcher=launcher, **steps))
    run_dir = config.local_dir
    run_dir.mkdir(parents=True)
    config_uri = RunLayout.of(config.output, config.name).write_config(config.to_json())
    command = other_nodes_command(config_uri, config.launcher, config.name)

    def start(attempt: str) -> list[subprocess.Popen]:
        return [agent(shlex.split(command.replace("$NODE_RANK", str(rank))), tmp_path / f"{attempt}-node{rank}", run_dir)
                for rank in (0, 1)]

    first = start("first")
    run_store = open_store(config.run_uri)
    deadline = time.monotonic() + 300
    while not complete_checkpoints(run_store) and time.monotonic() < deadline and first[1].poll() is None:
        time.sleep(0.2)
    os.killpg(first[1].pid, signal.SIGKILL)
    killed_at = max(c.step for c in complete_checkpoints(run_store))
    outputs = [process.communicate(timeout=300)[0] for process in first]
    assert killed_at < steps["max_steps"] and first[0].returncode != 0, outputs[0][-3000:]

    second = start("second")
    outputs = [process.communicate(timeout=600)[0] for process in second]
    assert [p.returncode for p in second] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "resumed from" in outputs[0], outputs[0][-3000:]  # rank 0 found the committed checkpoint
    trained, uninterrupted = metrics(config.run_uri), metrics(reference.run_uri)
    assert [r["step"] for r in trained] == list(range(1, steps["max_steps"] + 1))
    assert [r["loss"] for r in trained] == [r["loss"] for r in uninterrupted]
