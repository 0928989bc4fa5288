"""Stage: training. The Prefect task owns a training job that runs model/train.py on a launcher.

- torchrun on this node: `python -m torch.distributed.run --standalone ... -m model.train
  <run>/config.json`, in a session of its own. If the task is cancelled (Prefect turns the
  SIGTERM into an exception), crashes or is interrupted, the whole tree is stopped: SIGTERM
  to torchrun (which stops its workers), then SIGKILL to anything of the tree still alive.
  If the launching process dies outright (SIGKILL, OOM), the kernel kills torchrun, then its
  workers (PR_SET_PDEATHSIG on both).
- Ray Train: a `TorchTrainer` whose workers run the same program in the process group Ray
  creates. Ray Train restarts a failed worker group up to `max_failures` times; every start
  resumes from the newest checkpoint on the store (never from Ray's own checkpoints).

Either way the task streams progress into a Prefect progress artifact, ends with a table
artifact of the final metrics and the loss curve shown inline (tasks/train_report.py), and a
retry (or the next run of the same config) resumes from the newest checkpoint.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from typing import IO

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from model.checkpoint import latest_checkpoint
from model.data import DataError, DataSource, load_manifests
from model.metrics import LOSS_PLOT, METRICS_FILE, read_metrics
from model.train_config import TrainConfig
from storage.lease import acquire_lease
from storage.processes import stop_process_tree
from storage.store import ObjectNotFound, join_key, open_store
from tasks.fanout import ensure_ray
from tasks.reporting import artifact_key
from tasks.stage import stage_task
from tasks.train_report import SegmentStatus, loss_curve_markdown, metrics_rows

CONFIG_FILE = "config.json"
LEASE_FILE = "lease.json"
POLL_S = 2.0


class TrainingFailed(RuntimeError):
    """The training job exited with an error; its own log says why."""


def prepare_config(config: TrainConfig) -> TrainConfig:
    """Absolute paths, and the vocabulary size of the datasets' shared tokenizer unless overridden."""
    config = config.with_absolute_paths()
    sources = config.data + ([DataSource(manifest=config.val.manifest)] if config.val else [])
    _, tokenizer = load_manifests(sources)
    if config.vocab_size is not None and config.vocab_size < tokenizer.vocab_size:
        raise DataError(
            f"vocab_size {config.vocab_size} is below the datasets' tokenizer vocabulary {tokenizer.vocab_size}"
        )
    return TrainConfig.model_validate({**config.model_dump(), "vocab_size": config.vocab_size or tokenizer.vocab_size})


def run_config(output: str, run: str) -> TrainConfig:
    """The config a run was last trained with (its config.json), or a clear error if there is no such run."""
    run_store = open_store(output).child(join_key("runs", run))
    try:
        text = run_store.get_text(CONFIG_FILE)
    except ObjectNotFound:
        raise ValueError(
            f"no training run at {run_store.uri} (no {CONFIG_FILE}): start it first with `tinyllama train` "
            "or the pretrain / train-on-build deployments"
        ) from None
    return TrainConfig.model_validate_json(text)


# --- torchrun ---------------------------------------------------------------------------------------


def _forward_lines(stream: IO[str], on_line: Callable[[str], None]) -> None:
    for line in stream:
        on_line(line.rstrip("\n"))


# `python -m torch.distributed.run ARGS` that the kernel kills if its launcher dies, even by SIGKILL
# (PR_SET_PDEATHSIG survives exec; the training workers do the same towards torchrun).
_TORCHRUN_BOUND_TO_PARENT = """\
import runpy, signal, sys
from storage.processes import die_with_parent
die_with_parent(signal.SIGKILL)
sys.argv[0] = "torchrun"
runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
"""


def launch_torchrun(
    config_uri: str,
    nproc: int,
    on_line: Callable[[str], None] = print,
    on_poll: Callable[[], None] | None = None,
) -> None:
    """Run `torchrun --standalone -m model.train CONFIG_URI` with `nproc` processes until it ends.

    Its output goes line by line to `on_line`; `on_poll` is called every POLL_S seconds. Any
    exception here (cancellation included) stops the whole process tree before propagating.
    """
    command = [
        sys.executable, "-c", _TORCHRUN_BOUND_TO_PARENT, "--standalone", f"--nproc-per-node={nproc}",
        "-m", "model.train", config_uri,
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    reader = threading.Thread(target=_forward_lines, args=(process.stdout, on_line), daemon=True)
    reader.start()
    try:
        while True:
            try:
                process.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                if on_poll is not None:
                    on_poll()
    finally:
        if process.poll() is None:
            stop_process_tree(process)
        reader.join(timeout=10)
    if process.returncode != 0:
        raise TrainingFailed(f"torchrun -m model.train {config_uri} exited with code {process.returncode}")


# --- Ray Train --------------------------------------------------------------------------------------


def train_worker(config_json: dict) -> None:
    """Ray Train's per-worker function: the training program, in the process group Ray created."""
    import ray.train.torch

    from model.train import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(TrainConfig.model_validate(config_json), device=ray.train.torch.get_device())


def _fit(config_json: dict) -> None:
    """Build and run the TorchTrainer; runs as a Ray task, which owns (and so fate-shares) the run."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = TrainConfig.model_validate(config_json)
    launcher = config.launcher
    use_gpu = launcher.gpus_per_worker > 0
    resources = {"CPU": launcher.cpus_per_worker, **({"GPU": launcher.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config_json,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=launcher.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{config.name}-{uuid.uuid4().hex[:8]}",
            storage_path=str(config.local_dir / "ray-train"),
            failure_config=FailureConfig(max_failures=launcher.max_failures),
        ),
    )
    trainer.fit()


def launch_ray(config: TrainConfig, on_poll: Callable[[], None] | None = None) -> None:
    """Run the training program on Ray Train with the config's `ray` launcher until it ends.

    The trainer runs inside a Ray task: cancelling that task (on any exception here) ends its
    controller and workers with it.
    """
    import ray
    from ray.exceptions import RayTaskError

    if config.launcher.kind != "ray":
        raise ValueError(f"launch_ray needs a ray launcher, the config has {config.launcher.kind!r}")
    ensure_ray()
    job = ray.remote(num_cpus=0, max_retries=0)(_fit).remote(config.model_dump(mode="json"))
    finished = False
    try:
        while not ray.wait([job], timeout=POLL_S)[0]:
            if on_poll is not None:
                on_poll()
        finished = True
        ray.get(job)
    except RayTaskError as error:
        raise TrainingFailed(f"Ray Train run of {config.run_uri} failed: {error.cause or error}") from None
    finally:
        if not finished:
            ray.cancel(job, force=True)


# --- the Prefect task -------------------------------------------------------------------------------


def latest_record(config: TrainConfig) -> dict | None:
    """The last record in rank 0's local metrics.jsonl (None before the first)."""
    try:
        with open(config.local_dir / METRICS_FILE, "rb") as f:
            tail_start = max(0, f.seek(0, os.SEEK_END) - 4096)
            f.seek(tail_start)
            tail = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    records = read_metrics(tail.split("\n", 1)[-1] if tail_start else tail)  # skip a cut first line
    return records[-1] if records else None


def latest_step(config: TrainConfig) -> int:
    """The last step in rank 0's local metrics.jsonl (0 before the first)."""
    record = latest_record(config)
    return record["step"] if record else 0


def progress_reporter(config: TrainConfig) -> Callable[[], None]:
    """A callback that moves this segment's progress artifact to the latest step (tasks/train_report.py)."""
    newest = latest_checkpoint(open_store(config.run_uri))
    segment = SegmentStatus.of(newest.step if newest else 0, config.max_steps, config.max_steps_this_run)
    artifact_id = create_progress_artifact(
        0.0, key=artifact_key(config.name, "train-progress"), description=f"{config.name}: {segment.describe(None)}"
    )
    last = -1

    def update() -> None:
        nonlocal last
        record = latest_record(config)
        step = record["step"] if record else segment.start_step
        if step != last:
            last = step
            update_progress_artifact(
                artifact_id, segment.percent(step), description=f"{config.name}: {segment.describe(record)}"
            )

    return update


def report_final(config: TrainConfig) -> dict:
    """Table artifact of the last step's metrics and the loss curve (inline); returns that record."""
    run_store = open_store(config.run_uri)
    try:
        records = read_metrics(run_store.get_text(METRICS_FILE))
    except ObjectNotFound:
        records = []
    final = records[-1] if records else {}
    create_table_artifact(
        metrics_rows(final),
        key=artifact_key(config.name, "train-metrics"),
        description=f"{config.name}: metrics of the last step ({config.run_uri})",
    )
    create_markdown_artifact(
        loss_curve_markdown(run_store, LOSS_PLOT, f"{config.name}: loss curve"),
        key=artifact_key(config.name, "loss-curve"),
        description="Training loss against optimizer step",
    )
    return final


@stage_task("train", retries=1)
def train_task(config: TrainConfig) -> str:
    """Launch (or continue) a training run; returns the run's URI.

    The job holds the run's lease on the store while it trains, so two jobs never train one run.
    A crash or a failed job is retried once (resuming from the newest checkpoint); a bad config
    (ValueError) is not.
    """
    logger = get_run_logger()
    config = prepare_config(config)
    run_store = open_store(config.run_uri)
    launcher = config.launcher
    with acquire_lease(run_store, LEASE_FILE, owner=f"train task of flow run {flow_run.name!r}") as lease:
        run_store.put_text(CONFIG_FILE, config.to_json())
        logger.info("training %s on %s (world size %d)", config.run_uri, launcher.kind, launcher.world_size)
        report_progress = progress_reporter(config)

        def on_poll() -> None:
            lease.check()  # LeaseLost stops the job: another holder may be training this run now
            report_progress()

        if launcher.kind == "torchrun":
            launch_torchrun(run_store.url(CONFIG_FILE), launcher.nproc, on_line=logger.info, on_poll=on_poll)
        else:
            launch_ray(config, on_poll=on_poll)
        report_progress()
    final = report_final(config)
    logger.info("run %s at step %s, loss %s", config.run_uri, final.get("step"), final.get("loss"))
    return config.run_uri
