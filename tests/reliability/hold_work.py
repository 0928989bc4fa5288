"""Hold the first shard of each stage in its Ray worker until the test kills that worker.

A build driver started with `driver_env(folder)` has Ray run `install` first in each of its
workers (Ray's worker_process_setup_hook; nothing in the product knows). While `folder` exists,
each shard that reaches its commit appends "STAGE SHARD PID" to folder/attempts, and the first
one of each stage also creates folder/STAGE (holding "SHARD PID") and blocks until it is killed:
its outputs are written, its receipt is not. The retry finds folder/STAGE and commits.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

HOLD_ENV = "TINYLLAMA_TEST_HOLD_WORK"


def driver_env(folder: Path) -> dict[str, str]:
    """Environment for a build driver whose Ray workers hold while `folder` exists."""
    job = {"runtime_env": {"worker_process_setup_hook": f"{__name__}.install", "env_vars": {HOLD_ENV: str(folder)}}}
    return {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}  # the job config Ray's job submission passes


def install() -> None:
    import tasks.fanout

    commit = tasks.fanout.commit

    def held_commit(store, stage_name: str, prefixes, shard: str, *rest):
        _hold(stage_name, shard)
        return commit(store, stage_name, prefixes, shard, *rest)

    tasks.fanout.commit = held_commit


def _hold(stage_name: str, shard: str) -> None:
    folder = Path(os.environ[HOLD_ENV])
    if not folder.is_dir():
        return
    with open(folder / "attempts", "a") as attempts:
        attempts.write(f"{stage_name} {shard} {os.getpid()}\n")
    try:
        held = os.open(folder / stage_name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(held, f"{shard} {os.getpid()}".encode())
    os.close(held)
    threading.Event().wait()
