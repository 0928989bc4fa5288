"""Training SIGKILLed for real, then resumed: every step's loss and the final weights equal an
uninterrupted run's, bit for bit.

The job runs as the training stage starts it (tasks/train.py's `launch_torchrun`: torchrun and
2 gloo workers), its workers running tests/model/held_train.py (model.train with a Checkpointer
that holds every rank at a known point of the save of step 4); the test SIGKILLs every process
of the job's tree at once (a machine dying), checks that none is left, and launches the same
config again (model.train itself):
- during a checkpoint (on S3): step 4's shards and .metadata uploaded, its COMMIT not written;
- between checkpoints (local folder): step 2 committed, steps 3 and 4 trained and their
  metrics uploaded, nothing of step 4's checkpoint written.
Both resume from step 2 and train steps 3 to 6 again.
"""

from __future__ import annotations

import os
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from model.checkpoint import METADATA_FILE, complete_checkpoints, load_model
from model.train_config import TrainConfig
from runtime.processes import process_alive, process_start, process_tree
from storage.run_layout import RunLayout
from storage.store import open_store
from tasks.train import TrainingFailed, launch_torchrun
from tests.model.held_train import HOLD_SAVE_ENV
from tests.model.runs import START_TIMEOUT_S, metrics, short_documents_build, train_config, training_processes, wait_until

MAX_STEPS = 6
HELD_STEP = 4  # checkpoints at 2, 4, 6: the kill comes after step 2's commit


def run_config(name: str, output: str, manifest: str, work_dir: Path) -> TrainConfig:
    return train_config(name, output, manifest, work_dir, max_steps=MAX_STEPS,
                        launcher={"kind": "torchrun", "nproc": 2})


def write_config(config: TrainConfig) -> str:
    return RunLayout.of(config.output, config.name).write_config(config.to_json())


def launch(config: TrainConfig, lines: list[str], program: str = "model.train") -> None:
    launch_torchrun(write_config(config), config.launcher, config.name, on_line=lines.append, program=program)


@pytest.fixture(scope="module")
def dataset(s3_bucket_uri) -> str:
    return short_documents_build(f"{s3_bucket_uri}/kills-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory) -> str:
    """The uninterrupted run's URI."""
    tmp = tmp_path_factory.mktemp("straight")
    config = run_config("straight", str(tmp / "out"), dataset, tmp)
    lines: list[str] = []
    launch(config, lines)
    return config.run_uri


def job_tree(config_uri: str) -> dict[int, int]:
    """The training job's processes (torchrun's agent, a child of this process, and its workers)
    by pid, with their start times."""
    agents = [pid for pid in process_tree(os.getpid()) if config_uri in _cmdline(pid) and "torchrun" in _cmdline(pid)]
    pids = [pid for agent in agents for pid in (agent, *process_tree(agent))]
    return {pid: started for pid in pids if (started := process_start(pid)) is not None}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("point, where", [("commit", "s3"), ("start", "local")],
                         ids=["during-a-checkpoint-on-s3", "between-checkpoints-local"])
def test_sigkilled_training_resumes_bit_exactly(point, where, straight, dataset, s3_bucket_uri, tmp_path, monkeypatch):
    output = f"{s3_bucket_uri}/kills-out-{uuid.uuid4().hex[:8]}" if where == "s3" else str(tmp_path / "out")
    config = run_config("killed", output, dataset, tmp_path)
    store, config_uri = open_store(config.run_uri), write_config(config)
    held = tmp_path / "held"
    held.mkdir()
    markers = [held / f"{point}-rank{rank}" for rank in range(2)]
    monkeypatch.setenv(HOLD_SAVE_ENV, f"{HELD_STEP}:{point}:{held}")
    lines: list[str] = []
    with ThreadPoolExecutor(1) as pool:  # the launching thread lives on: torchrun dies with it
        job = pool.submit(launch, config, lines, "tests.model.held_train")
        wait_until(lambda: job.done() or all(m.exists() for m in markers), START_TIMEOUT_S, "both ranks held")
        assert not job.done(), "\n".join(lines[-40:])
        monkeypatch.delenv(HOLD_SAVE_ENV)

        # Where the job stands when it dies: step 2 is the newest complete checkpoint.
        assert [c.step for c in complete_checkpoints(store)] == [2]
        in_flight = {Path(key).name for key in store.list(RunLayout.checkpoint(HELD_STEP) + "/")}
        if point == "commit":
            assert in_flight == {"__0_0.distcp", "__1_0.distcp", "__0_optimizer_0.distcp",
                                 "__1_optimizer_0.distcp", METADATA_FILE}
        else:
            assert in_flight == set()
            assert [r["step"] for r in metrics(config.run_uri)] == [1, 2, 3, 4]

        tree = job_tree(config_uri)
        assert len(tree) >= 3, tree  # the agent and two workers
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(TrainingFailed, match="exited with code -9"):
            job.result(timeout=60)
    wait_until(lambda: not any(process_alive(pid, started) for pid, started in tree.items()), 30, "the job's processes to die")
    assert training_processes(config_uri) == []

    launch(config, lines)  # the same config, as the stage's retry does

    assert [r["step"] for r in metrics(config.run_uri)] == list(range(1, MAX_STEPS + 1))
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in metrics(config.run_uri)] == [r[key] for r in metrics(straight)], key
    assert [c.step for c in complete_checkpoints(store)] == [6, 4, 2]
    resumed_model, _ = load_model(config.run_uri)
    straight_model, _ = load_model(straight)
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name
