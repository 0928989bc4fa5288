"""One real `serve_main` process for the deployment tests: its own Prefect server (with the UI),
the deployments with tiny defaults, and one finished build-dataset run through the API.

`served` lives for the tests of this package; tests talk to its server inside `served.api()`,
so that the session's other Prefect server (tests/fixtures/prefect.py) stays the default.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from demo.sample_corpus import make_sample_corpus
from deployments.deploy import BUILD, TRAIN_EPOCH, submit
from storage.store import open_store
from tasks.config import BuildConfig
from tests.fixtures.ports import free_port
from tests.fixtures.served import ServedProcess

RUN = "deploy-run"
SEGMENT = 2  # steps of the triggered run's first segment
GLOBAL_BATCH_TOKENS = 512
STARTUP_TIMEOUT_S = 240
RUN_TIMEOUT_S = 300


def stop_prefect_workers(timeout_s: float = 30) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        worker.drain_all(timeout=timeout_s)


@dataclass
class Served(ServedProcess):
    api_url: str
    home: Path
    data: Path
    build: BuildConfig

    @contextlib.contextmanager
    def api(self) -> Iterator[None]:
        """This process's Prefect client (and flows called here) use the served server meanwhile.

        Prefect's events and log workers bind to the API URL they start under and live on: drain
        and stop them on the way in and out, so that no event meant for one server is sent to
        the other (after the served server stops, such a backlog would hang the test session's exit).
        """
        from prefect.settings import PREFECT_API_URL, temporary_settings

        stop_prefect_workers()
        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            try:
                yield
            finally:
                stop_prefect_workers()

    def call(self, coroutine_fn, *args):
        """Run `await coroutine_fn(client, *args)` with a client of the served server."""
        from prefect.client.orchestration import get_client

        async def run():
            async with get_client() as client:
                return await coroutine_fn(client, *args)

        with self.api():
            return asyncio.run(run())

    def run_store(self):
        return open_store(self.data).child(f"runs/{RUN}")


def tiny_training(data: Path, work_dir: Path) -> dict:
    """A two-layer model on 2 gloo processes: a segment of a few steps takes seconds."""
    return {
        "name": RUN,
        "output": str(data),
        "model": "tiny",
        "model_overrides": {"n_layers": 2, "dim": 64, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 128, "max_seq_len": 64},
        "seq_len": 64,
        "global_batch_tokens": GLOBAL_BATCH_TOKENS,
        "micro_batch": 4,
        "lr": {"max": 1e-3, "min": 1e-4, "warmup_steps": 1},
        "max_steps": 100000,
        "max_steps_this_run": SEGMENT,
        "checkpoint_every": SEGMENT,
        "keep_checkpoints": None,
        "launcher": {"kind": "torchrun", "nproc": 2},
        "work_dir": str(work_dir),
    }


def start_serve(root: Path, env: dict[str, str] | None = None) -> Served:
    """`serve_main` in a subprocess on a free port, with a fresh PREFECT_HOME and data folder under
    `root` and tiny defaults (a 96 KB sample corpus, vocab 512, a two-layer model)."""
    data, home = root / "data", root / "prefect-home"
    corpus = make_sample_corpus(root / "raw", target_bytes=96 << 10, seed=5)
    build = yaml.safe_load(Path(corpus["config"]).read_text())
    build.update(output=str(data), tokenizer={"train": {"vocab_size": 512}}, dedup={"exact": True, "near": False})
    build_yaml, train_yaml = root / "build.yaml", root / "train.yaml"
    build_yaml.write_text(yaml.safe_dump(build))
    train_yaml.write_text(yaml.safe_dump(tiny_training(data, root / "work")))
    port = free_port()
    log = root / "serve.log"
    command = (
        "from pathlib import Path; from deployments.serve import serve_main; "
        f"serve_main(port={port}, data_dir=Path({str(data)!r}), build_config=Path({str(build_yaml)!r}), "
        f"train_config=Path({str(train_yaml)!r}))"
    )
    # Nothing of the session's Prefect settings: this server is on its own.
    process_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    process_env.update(PREFECT_HOME=str(home), PREFECT_RUNNER_POLL_FREQUENCY="1", **(env or {}))
    with open(log, "wb") as out:
        # A session of its own, like a command started in a terminal (whose Ctrl-C signals the group).
        process = subprocess.Popen(
            [sys.executable, "-c", command], env=process_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    served = Served(process, log, f"http://127.0.0.1:{port}/api", home, data, BuildConfig.model_validate(build))
    try:
        served.wait_for(lambda: _registered(served, TRAIN_EPOCH), STARTUP_TIMEOUT_S, "the deployments")
    except BaseException:
        stop(process)
        raise
    return served


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="package")
def served(tmp_path_factory) -> Iterator[Served]:
    served = start_serve(tmp_path_factory.mktemp("served"))
    try:
        yield served
    finally:
        stop(served.process)


def _registered(served: Served, name: str) -> bool:
    async def read(client, name):
        return await client.read_deployment_by_name(name)

    try:
        served.call(read, name)
    except Exception:  # the server is not up yet, or serve has not registered the deployment yet
        return False
    return True


@pytest.fixture(scope="package")
def finished_build(served):
    """A build-dataset deployment run, started through the API with parameters, and finished."""
    config = served.build.model_copy(update={"name": "api-build"})
    with served.api():
        run = submit(BUILD, {"config": config.model_dump(mode="json")}, wait=True)
    return config, run
