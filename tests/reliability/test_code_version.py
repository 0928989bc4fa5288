"""A Ray node on another version of the code refuses the build's tasks in one line (tasks/code_version.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tasks.code_version import PACKAGES
from tests.builds import sample_config
from tests.reliability.cluster import REPO, RayCluster, cluster_env

CODE_HASH = "from tasks.code_version import code_hash; print(code_hash())"


def code_hash_of(pythonpath: str) -> str:
    return subprocess.run([sys.executable, "-c", CODE_HASH], env={**cluster_env(None), "PYTHONPATH": pythonpath},
                          cwd="/", capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
def test_a_node_on_other_code_refuses_the_build_in_one_line(s3_endpoint, corpus, prefect_server, tmp_path):
    other = tmp_path / "other-version"
    for package in PACKAGES:
        shutil.copytree(REPO / package, other / package, ignore=shutil.ignore_patterns("__pycache__"))
    with (other / "tasks" / "stage.py").open("a") as changed:
        changed.write("# one changed line\n")
    # The head runs no tasks (no CPUs): every task lands on the node with the other version.
    cluster = RayCluster()
    try:
        cluster.start_node(head=True, cpus=0)
        cluster.extra_env["PYTHONPATH"] = str(other)
        cluster.start_node(cpus=1)
        config_path = tmp_path / "build.yaml"
        config_path.write_text(yaml.safe_dump(sample_config(corpus, str(tmp_path / "out")).model_dump(mode="json")))
        # The driver's working folder goes on its workers' sys.path (Ray's py_driver_sys_path): not the repo.
        driver = tmp_path / "driver"
        driver.mkdir()
        build = subprocess.run(
            [sys.executable, "-m", "deployments.cli", "build-dataset", str(config_path)],
            env={**cluster_env(cluster.address), "PREFECT_API_URL": prefect_server}, cwd=driver,
            capture_output=True, text=True, timeout=300,
        )
    finally:
        cluster.stop()
    theirs = code_hash_of(str(other))
    errors = [line for line in build.stderr.splitlines() if line.startswith("error:")]
    assert build.returncode == 2 and len(errors) == 1, build.stdout[-3000:] + build.stderr[-3000:]
    refusal = re.search(r"Ray node [0-9.]+ \(id [0-9a-f]{12}\) runs code ([0-9a-f]{12}), the driver ([0-9a-f]{12}): ", errors[0])
    assert refusal and refusal[1] == theirs[:12] != refusal[2], errors
    assert not list((tmp_path / "out").glob("datasets/*/*/receipts/*/*")), "no shard may commit on other code"
