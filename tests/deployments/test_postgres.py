"""`serve_main` on PostgreSQL: Debian's PostgreSQL 15 in a temporary cluster of the test's own.

The same test checks that Ctrl-C stops everything serve started, while a build (with its
local Ray) is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
from prefect.client.schemas.objects import StateType

from deployments.deploy import BUILD, submit
from deployments.serve import healthy
from runtime.processes import process_tree
from tests.deployments.conftest import start_serve, stop
from tests.fixtures.ports import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USER = "prefect"


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """initdb + pg_ctl in a fresh folder on a free port; yields the SQLAlchemy URL of its `postgres` database."""
    assert (PG_BIN / "initdb").exists(), f"{PG_BIN}/initdb is missing: apt-get install -y postgresql"
    folder = Path(tempfile.mkdtemp(prefix="tinyllama-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: the cluster belongs to nobody
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        as_owner = ["runuser", "-u", "nobody", "--"]
    data, port = folder / "data", free_port()
    pg_ctl = [*as_owner, str(PG_BIN / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(
            [*as_owner, str(PG_BIN / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True,
        )
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run([*pg_ctl, "-l", str(folder / "server.log"), "-o", options, "-w", "start"], check=True, capture_output=True)
        yield f"postgresql+asyncpg://{USER}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def live(pids: list[int]) -> list[str]:
    """The command lines of those of `pids` still running (zombies do not count)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z":
            alive.append(f"{pid}: {command[:120]}")
    return alive


async def recorded_flow_runs(url: str) -> dict[str, str]:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return {row["name"]: row["state_type"] for row in await connection.fetch("SELECT name, state_type FROM flow_run")}
    finally:
        await connection.close()


def test_serve_on_postgresql_records_runs_and_ctrl_c_leaves_nothing_behind(tmp_path):
    with postgres_cluster() as url:
        served = start_serve(tmp_path, env={"PREFECT_SERVER_DATABASE_CONNECTION_URL": url})
        try:
            config = served.build.model_copy(update={"name": "pg-build"})
            with served.api():
                run = submit(BUILD, {"config": config.model_dump(mode="json")})

            def ray_is_up() -> list[int]:  # the build's local Ray: the processes most likely to be orphaned
                tree = process_tree(served.process.pid)
                return tree if any("raylet" in line for line in live(tree)) else []

            tree = served.wait_for(ray_is_up, 180, "the build's Ray processes")
            running = served.call(lambda client: client.read_flow_run(run.id))
            assert running.state.type == StateType.RUNNING

            os.killpg(served.process.pid, signal.SIGINT)  # Ctrl-C in the terminal serve runs in
            assert served.process.wait(timeout=90) == 0, served.log_tail()
            deadline = time.monotonic() + 10
            while (survivors := live([served.process.pid, *tree])) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not survivors, "left behind by serve:\n" + "\n".join(survivors)
            assert not healthy(served.api_url), "the Prefect server serve started still answers"
        finally:
            if served.process.poll() is None:
                stop(served.process)

        runs = asyncio.run(recorded_flow_runs(url))
        assert running.name in runs, f"the build's flow run is not in PostgreSQL: {runs}"
        assert runs[running.name] == "CANCELLED", f"the stopped run ended {runs[running.name]}, not Cancelled"
        assert not (served.home / "prefect.db").exists(), "serve used SQLite instead of PostgreSQL"
