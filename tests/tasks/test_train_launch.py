"""The launchers: Ray Train with 2 CPU workers end to end, torchrun killed without orphans, and
failures the job would repeat (a corrupt or refused checkpoint) reported by `tinyllama train` in one
line, not retried."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from prefect.states import Failed

from model.checkpoint import METADATA_FILE, commit_checkpoint, complete_checkpoints, read_metadata
from model.train_config import TorchrunLauncher
from runtime.processes import process_tree
from storage.manifest import ObjectInfo, sha256_bytes
from storage.run_layout import RunLayout
from storage.store import open_object, open_store
from tasks.stage import is_transient
from tasks.train import TrainingInputError, launch_ray, launch_torchrun, latest_step, prepare_config, run_config
from tests.fixtures.ports import free_port
from tests.model.runs import (
    START_TIMEOUT_S, STEPS, WEIGHTS_ONLY_ADVICE, NotATensor, error_lines, failed_train_task_runs, flow_run_logs,
    metrics, run_training, short_documents_build, tinyllama_train, train_config, train_state, training_processes,
    wait_until,
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
        # This session's Ray only (its raylet is our child): another pytest worker may train on Ray too.
        workers = [pid for pid in process_tree(os.getpid()) if pid in training_processes("RayTrainWorker")]
        os.kill(workers[0], signal.SIGKILL)
        killed.append(time.time())

    saboteur = threading.Thread(target=kill_a_worker_after_the_first_checkpoint)
    saboteur.start()
    launch_ray(config, RunLayout.of(config.output, config.name).write_config(config.to_json()))
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
        [sys.executable, "-c", "import sys; from model.train_config import TorchrunLauncher; from tasks.train import launch_torchrun; "
         "launch_torchrun(sys.argv[1], TorchrunLauncher(nproc=2))",
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


def test_a_data_error_in_the_job_fails_at_once_with_its_cause(manifest, tmp_path):
    """Bad data fails the same way on every try: not a retried TrainingFailed, and the message says why."""
    store, _ = open_object(manifest)
    shard = next(Path(store.root).glob("tokens/web/*.bin"))
    shard.write_bytes(bytes(b ^ 0xFF for b in shard.read_bytes()))  # same size, other content
    config = prepare_config(train_config("corrupt", str(tmp_path / "store"), manifest, tmp_path))
    config_path = tmp_path / "corrupt-config.json"
    config_path.write_text(config.to_json())
    with pytest.raises(TrainingInputError) as failed:
        launch_torchrun(str(config_path), TorchrunLauncher(nproc=1), on_line=lambda line: None)
    message = str(failed.value)
    assert "\n" not in message and "DataError" in message and str(shard) in message and "sha256" in message
    assert not is_transient(None, None, Failed(data=failed.value))


def checkpoint_files(store) -> dict[str, bytes]:
    """Every file of the run's checkpoint folders (set aside or not), by key."""
    return {key: store.get_bytes(key) for key in store.list("checkpoints/")}


@pytest.mark.slow
def test_a_corrupt_only_checkpoint_stops_tinyllama_train_in_one_line_until_told_to_start_over(
    prefect_server, manifest, tmp_path
):
    config = train_config("corrupt-only", str(tmp_path / "store"), manifest, tmp_path, max_steps=2)
    run_training(config, 1)
    store = open_store(config.run_uri)
    (only,) = complete_checkpoints(store)
    key = only.key("__0_0.distcp")
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0x01  # a bit flipped, the size kept
    store.put_bytes(key, bytes(data))
    expected = next(f.sha256 for f in only.files if f.key == "__0_0.distcp")
    evidence = checkpoint_files(store)
    longer = config.model_copy(update={"max_steps": 4})

    refused = tinyllama_train(longer, prefect_server, tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    (error,) = error_lines(refused)
    assert error.startswith(
        f"error: training failed on its input: CheckpointError: run {config.run_uri} cannot resume, no checkpoint "
        f"verifies: {store.url(key)}: sha256 {sha256_bytes(bytes(data))}, its COMMIT lists {expected}. Nothing was changed"
    ), error
    assert checkpoint_files(store) == evidence  # nothing overwritten, nothing pruned, nothing moved
    (task,) = failed_train_task_runs("train-corrupt-only")
    assert task.run_count == 1  # a retry would fail alike: none

    started_over = tinyllama_train(longer, prefect_server, tmp_path, "--start-over")
    assert started_over.returncode == 0, started_over.stderr[-3000:]
    assert "starting over from step 0" in started_over.stdout + started_over.stderr
    assert [r["step"] for r in metrics(config.run_uri)] == [1, 2, 3, 4]
    assert [c.step for c in complete_checkpoints(store)] == [4, 2]
    set_aside = {k: v for k, v in checkpoint_files(store).items() if ".corrupt-" in k}
    assert sorted(k.replace(k.split("/")[1], "step-0000002") for k in set_aside) == sorted(evidence)
    assert sorted(set_aside.values()) == sorted(evidence.values())  # every file as it was
    assert run_config(config.output, config.name).start_over is False  # a later train-epoch never starts over


def plant_value(store, checkpoint, fqn: str, payload: bytes) -> None:
    """Point the checkpoint's value `fqn` at `payload` (appended to its file), then rewrite the
    COMMIT as a save would: the checkpoint stays committed, its sha256s verify."""
    metadata = read_metadata(store, checkpoint)
    (index,) = [i for i in metadata.storage_data if i.fqn == fqn]
    info = metadata.storage_data[index]
    key = checkpoint.key(info.relative_path)
    data = store.get_bytes(key)
    store.put_bytes(key, data + payload)
    metadata.storage_data[index] = dataclasses.replace(info, offset=len(data), length=len(payload))
    store.put_bytes(checkpoint.key(METADATA_FILE), pickle.dumps(metadata))
    files = [f.key for f in checkpoint.files]
    commit_checkpoint(store, checkpoint.step, [
        ObjectInfo(key=name, size=len(body), sha256=sha256_bytes(body))
        for name, body in ((name, store.get_bytes(checkpoint.key(name))) for name in files)
    ])


@pytest.mark.slow
def test_a_refused_checkpoint_fails_tinyllama_train_in_one_line_without_a_retry(prefect_server, manifest, tmp_path):
    config = train_config("refused", str(tmp_path / "store"), manifest, tmp_path, max_steps=2)
    run_training(config, 1)
    store = open_store(config.run_uri)
    payload = io.BytesIO()
    torch.save(NotATensor(), payload)
    plant_value(store, complete_checkpoints(store)[0], "progress.step", payload.getvalue())
    evidence = checkpoint_files(store)

    result = tinyllama_train(config.model_copy(update={"max_steps": 4}), prefect_server, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result) == [
        f"error: training failed on its input: CheckpointError: {store.url(RunLayout.checkpoint(2))} value "
        "progress.step: refused to load: it holds pickled objects other than tensors and plain containers "
        "(Unsupported global: GLOBAL eval was not an allowed global by default.)"
    ]
    (task,) = failed_train_task_runs("train-refused")
    assert task.run_count == 1
    for log in (result.stdout, result.stderr, flow_run_logs("train-refused")):
        assert not WEIGHTS_ONLY_ADVICE.search(log)
    assert checkpoint_files(store) == evidence


@pytest.mark.slow
def test_two_torchrun_agents_meet_as_two_nodes_and_train_like_one_agent_with_two_processes(manifest, tmp_path):
    store = str(tmp_path / "store")
    # The data is shared out by node, so the single agent plays two data nodes: the same sequence.
    one_node = prepare_config(train_config(
        "one-node", store, manifest, tmp_path, launcher={"kind": "torchrun", "nproc": 2}, data_nodes=2
    ))
    two_nodes = prepare_config(train_config(
        "two-nodes", store, manifest, tmp_path,
        launcher={"kind": "torchrun", "nproc": 1, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}"},
    ))
    paths = {}
    for config in (one_node, two_nodes):
        paths[config.name] = tmp_path / f"{config.name}.json"
        paths[config.name].write_text(config.to_json())
    launch_torchrun(str(paths["one-node"]), one_node.launcher, "one-node", on_line=lambda line: None)

    lines: list[str] = []
    failures: list[BaseException] = []

    def agent(node_rank: int) -> None:
        try:
            launcher = two_nodes.launcher.model_copy(update={"node_rank": node_rank})
            launch_torchrun(str(paths["two-nodes"]), launcher, "two-nodes", on_line=lines.append)
        except BaseException as error:
            failures.append(error)

    agents = [threading.Thread(target=agent, args=(node_rank,)) for node_rank in (0, 1)]
    for thread in agents:
        thread.start()
    for thread in agents:
        thread.join()

    assert not failures, failures
    assert any("world size 2" in line for line in lines)  # one process group across the two agents
    one, two = metrics(one_node.run_uri), metrics(two_nodes.run_uri)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in two] == [r["loss"] for r in one]
