"""Local paths that not every node reaches are refused before anything runs, in one line (exit 2).

A node "with disks of its own" is a real process on this machine in a mount namespace of its own
(`unshare -rm`, then a tmpfs over the folder): it sees an empty folder at the same path, as a
second machine would.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from storage.reach import ADVICE, MARKER_PREFIX
from storage.run_layout import CONFIG_FILE, RunLayout
from tasks.train import other_nodes_command
from tests.builds import tiny_config, tiny_corpus
from tests.fixtures.ports import free_port
from tests.model.runs import (
    error_lines, short_documents_build, tinyllama_train, train_config, train_state,
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
