"""The launchers: Ray Train with 2 CPU workers end to end, and torchrun killed without orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from model.checkpoint import complete_checkpoints
from storage.store import open_store
from storage.processes import process_tree
from tasks.train import launch_ray, latest_step, prepare_config
from tests.model.runs import (
    START_TIMEOUT_S, metrics, short_documents_build, train_config, train_state, training_processes, wait_until,
)

@pytest.fixture
def manifest(tmp_path) -> str:
    return short_documents_build(str(tmp_path / "store"))


def test_ray_train_runs_two_cpu_workers_and_a_failed_worker_resumes_from_the_store(ray_local, manifest, tmp_path):
    steps = 40  # ~0.1 s each: time enough to kill a worker mid-run
    config = train_config(
        "ray-run", str(tmp_path / "store"), manifest, tmp_path,
        launcher={"kind": "ray", "workers": 2, "gpus_per_worker": 0}, max_steps=steps, checkpoint_every=4,
    )
    config = prepare_config(config)
    assert config.vocab_size == 512  # from the build's tokenizer
    killed: list[float] = []

    def kill_a_worker_after_the_first_checkpoint() -> None:
        wait_until(lambda: latest_step(config) > 4, START_TIMEOUT_S, "the first checkpoint on Ray")
        workers = training_processes("RayTrainWorker")
        os.kill(workers[0], signal.SIGKILL)
        killed.append(time.time())

    saboteur = threading.Thread(target=kill_a_worker_after_the_first_checkpoint)
    saboteur.start()
    launch_ray(config)
    saboteur.join()

    assert killed, "no Ray Train worker was found to kill"
    records = metrics(config.run_uri)
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # each step once
    # The restarted workers went on from the newest checkpoint (a multiple of 4), not from scratch.
    redone = [r["step"] for r in records if r["time"] > killed[0]]
    assert redone[0] % config.checkpoint_every == 1 and redone[0] > 4, redone
    state = train_state(config.run_uri)
    assert state["world_size"] == 2 and state["tokens_seen"] == steps * 512
    assert complete_checkpoints(open_store(config.run_uri))[0].step == steps


def test_killing_the_launcher_leaves_no_training_process(manifest, tmp_path):
    """Even SIGKILL, which runs no cleanup: the kernel ends torchrun, then its workers (PDEATHSIG).
    (Cancellation, an exception in the launcher, is tested with the flow.)"""
    config = prepare_config(train_config("endless", str(tmp_path / "store"), manifest, tmp_path, max_steps=100_000))
    config_path = tmp_path / "endless-config.json"
    config_path.write_text(config.to_json())
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tasks.train import launch_torchrun; launch_torchrun(sys.argv[1], 2)",
         str(config_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_until(lambda: latest_step(config) >= 1, START_TIMEOUT_S, "the first training step")
        workers = [pid for pid in process_tree(launcher.pid) if pid in training_processes(str(config_path))]
        assert len(workers) == 3  # torchrun and its 2 workers
        launcher.kill()
        launcher.wait(timeout=60)
        wait_until(lambda: not training_processes(str(config_path)), 30, "the training processes to exit")
    finally:
        if launcher.poll() is None:
            launcher.kill()
