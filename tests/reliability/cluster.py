"""A real multi-node Ray cluster on one machine, and helpers to run builds against it and hurt it.

Each node is a `ray start --block` process in its own session (process group), so a node is
killed the way a machine dies: SIGKILL to its raylet, object store and workers at once.
Workers inherit the environment of `ray start`, so the S3 endpoint and credentials must be in
os.environ before the cluster starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from runtime.processes import process_tree
from tasks.config import BuildConfig
from tests.fixtures.ports import free_port

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
OBJECT_STORE_BYTES = 200 << 20


def cluster_env(ray_address: str | None) -> dict[str, str]:
    """Environment for cluster processes and their drivers: the repo importable, and Ray's token
    auth off (a test cluster on 127.0.0.1; otherwise every driver needs the head's token)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


class RayCluster:
    """A head node and worker nodes (one CPU each unless told), sharing one short temp dir
    (socket paths must stay under 108 bytes)."""

    def __init__(self, env: dict[str, str] | None = None):
        self.temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
        self.port = free_port()
        self.nodes: list[subprocess.Popen] = []
        self.extra_env = env or {}  # for the nodes and so their workers

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {**cluster_env(None), **self.extra_env}

    def start_node(self, head: bool = False, cpus: int = 1, wrap: list[str] = (), ip: str = "127.0.0.1") -> subprocess.Popen:
        """`wrap`: a command prefix the node runs under (e.g. unshare: a node with disks of its own);
        `ip`: another loopback address makes it a machine of its own to Ray Train too."""
        where = ["--head", f"--port={self.port}", "--include-dashboard=false"] if head else [f"--address={self.address}"]
        ports = [f"--{name}={free_port()}" for name in (
            "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        )]
        command = [RAY, "start", "--block", *where, f"--node-ip-address={ip}", f"--num-cpus={cpus}",
                   f"--object-store-memory={OBJECT_STORE_BYTES}", f"--temp-dir={self.temp_dir}",
                   "--disable-usage-stats", *ports]
        node = subprocess.Popen([*wrap, *command], cwd=REPO, env=self.env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.nodes.append(node)
        self.wait_for_nodes(len([n for n in self.nodes if n.poll() is None]))
        return node

    def alive_nodes(self) -> int:
        # A marked line: on a busy machine Ray writes notices of its own to stdout too.
        script = "import ray; ray.init(address=%r, log_to_driver=False); print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))"
        try:
            out = subprocess.run([sys.executable, "-c", script % self.address], env=self.env(), cwd=REPO,
                                 capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:  # a busy machine: the caller asks again until its deadline
            return -1
        counts = [line.split(":")[1] for line in out.stdout.splitlines() if line.startswith("alive nodes:")]
        return int(counts[-1]) if out.returncode == 0 and counts else -1

    def wait_for_nodes(self, count: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while (alive := self.alive_nodes()) != count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray cluster has {alive} live nodes, expected {count}")
            time.sleep(1)

    def kill_node(self, node: subprocess.Popen) -> None:
        """SIGKILL every process of the node: a machine that vanished."""
        for pid in process_tree(node.pid) + [node.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.wait()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.poll() is None:
                self.kill_node(node)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def ray_workers(node_pid: int) -> list[int]:
    """PIDs of a node's Ray workers that run a task (`ray::_work_and_commit`); Ray workers are
    descendants of the node's raylet. (Not any `ray::` process: the node's agents are
    `ray::DashboardAgent` and `ray::RuntimeEnvAgent`, and the raylet dies with them.)"""
    found = []
    for pid in process_tree(node_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("ray::_work_and_commit"):
            found.append(pid)
    return found


def start_build(config: BuildConfig, workdir: Path, prefect_api_url: str, ray_address: str | None) -> subprocess.Popen:
    """`tinyllama build-dataset` in its own process (the test process already has its own Ray)."""
    config_path = workdir / f"{config.name}-{time.monotonic_ns()}.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**cluster_env(ray_address), "PREFECT_API_URL": prefect_api_url}
    log = open(workdir / f"{config_path.stem}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "deployments.cli", "build-dataset", str(config_path)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish_build(process: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a build subprocess; its manifest URI (the CLI's last line), or its log in the error."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log = _log_of(process)
    if process.returncode != 0:
        raise AssertionError(f"build exited with {process.returncode}:\n{log[-6000:]}")
    # stderr (Ray's raylet notices) shares the log: the CLI prints the URI as its last stdout line
    return [line for line in log.splitlines() if line.endswith("/manifest.json")][-1]


def _log_of(process: subprocess.Popen) -> str:
    command_config = Path(process.args[-1])
    return (command_config.parent / f"{command_config.stem}.log").read_text(errors="replace")


def wait_for(condition, process: subprocess.Popen, timeout: float = 240, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the build ended before {what}:\n{_log_of(process)[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
