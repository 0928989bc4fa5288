"""Ray workers run the driver's code, or refuse.

A node of a Ray cluster on another version of this project would run a stage and silently write
different bytes. So the driver hashes its own source once per process (`code_hash`: every .py
file of the project's packages, wherever they are imported from), and each function it sends to
Ray carries that hash (`on_driver_code`, or `check_code` where the hash travels as an argument);
the worker compares it with its own hash, computed once per worker process, and refuses in one
line naming the node and both hashes. On joining a cluster the driver first asks every alive
node (`check_ray_nodes`): a node whose code differs so much that a task's own modules or
arguments would fail to import there is refused in the same line, before anything runs. A
CodeMismatch is a ValueError: it fails the same way every time, so nothing retries it.

Why a check, not Ray's runtime_env (working_dir / py_modules) shipping the driver's code: Ray
recommends a container image for production clusters (KubeRay), and with an image the check is
all that is needed; runtime_env ships only our sources while a node's other packages can still
differ; and it repacks, uploads and unpacks per job and node. A user who does ship code that way
(`ray job submit --working-dir .`) passes the check, as every node then runs the driver's code.
The cost is one hash of ~150 files per process (~10 ms) and nothing per task: `on_driver_code`
puts the hash in the function's closure, which Ray exports once per remote function (a stage),
not once per task.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

PACKAGES = ("demo", "deployments", "flows", "model", "runtime", "storage", "tasks")  # pyproject.toml's packages
SHOWN = 12  # hex digits of a hash shown in a message, as git shows a commit

P = ParamSpec("P")
R = TypeVar("R")


class CodeMismatch(ValueError):
    """A Ray worker's code is not the driver's."""


@functools.cache
def code_hash() -> str:
    """sha256 over the project's source files (their paths and contents), as this process imports
    them; computed once per process."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in spec.submodule_search_locations if spec else ():
            root = Path(folder).parent
            for path in sorted(Path(folder).rglob("*.py")):
                digest.update(f"{path.relative_to(root).as_posix()}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def check_code(driver_hash: str) -> None:
    """Raise CodeMismatch, naming this node and both hashes, unless this process runs `driver_hash`'s code."""
    if (own := code_hash()) != driver_hash:
        import ray

        node = f"{ray.util.get_node_ip_address()} (id {ray.get_runtime_context().get_node_id()[:SHOWN]})"
        raise CodeMismatch(
            f"Ray node {node} runs code {own[:SHOWN]}, the driver {driver_hash[:SHOWN]}: "
            f"install the driver's version on every node (or run the driver on the cluster's)"
        )


def check_ray_nodes() -> None:
    """Refuse a Ray cluster with an alive node on other code before anything runs there: one tiny
    task per node, which imports nothing of the project but this module. (A node that joins later
    is refused by the tasks themselves.)"""
    import ray
    from ray.exceptions import RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(check_code)
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    try:
        ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(code_hash())
                 for node in nodes])
    except RayTaskError as error:
        raise (error.cause or error) from None


def on_driver_code(work: Callable[P, R]) -> Callable[P, R]:
    """`work`, checked to run on this process's code wherever Ray runs it: wrap it when handing it
    to Ray (`ray.remote(...)(on_driver_code(work))`), never at import time, where it would carry
    the hash of whichever process imports it."""
    driver_hash = code_hash()

    @functools.wraps(work)  # keeps Ray's task name (`ray::<work's name>`)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        check_code(driver_hash)
        return work(*args, **kwargs)

    return checked
