"""Stage: training. The Prefect task owns a training job that runs model/train.py on a launcher.

- torchrun: this node's agent, `python -m torch.distributed.run --standalone ... -m model.train
  <run>/config.json` (with `nnodes` > 1, a c10d rendezvous at `rdzv_endpoint` that the other
  nodes' agents join: see torchrun_arguments), in a session of its own. If the task is
  cancelled (Prefect turns the SIGTERM into an exception; a runner's cancel ends the task
  Cancelled, not crashed), crashes or is interrupted, the whole tree is stopped: SIGTERM to
  torchrun (which stops its workers), then SIGKILL to anything of the tree still alive.
  If the launching process dies outright (SIGKILL, OOM), the kernel kills torchrun, then its
  workers (PR_SET_PDEATHSIG on both).
- Ray Train: a `TorchTrainer` whose workers run the same program in the process group Ray
  creates. Ray Train restarts a failed worker group up to `max_failures` times; every start
  resumes from the newest checkpoint on the store (never from Ray's own checkpoints).

Either way the task streams progress (read from the run folder's progress.json, which rank 0
keeps current wherever it runs) into a Prefect progress artifact and a live card of the loss and
throughput (with the commands to export and evaluate it once done); the flow ends with a table
artifact of the final metrics and the loss curve shown inline (tasks/train_report.py), and a retry
(or the next run of the same config) resumes from the newest checkpoint.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from typing import IO

from prefect import get_client, get_run_logger
from prefect._internal.control_listener import get_intent  # the runner's cancel intent: no public API yet
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Cancelled, State

from model.checkpoint import latest_checkpoint
from model.data import DataError, load_manifests
from model.hf import check_init_from
from model.metrics import last_record, read_progress
from model.train import DETERMINISTIC_FAILURE, deterministic_failure_line
from model.train_config import DataSource, TorchrunLauncher, TrainConfig
from runtime.processes import stop_process_tree
from storage.lease import acquire_lease
from storage.run_layout import CONFIG_FILE, LEASE_FILE, LOSS_PLOT, RunLayout
from storage.retry import retry_deadline
from storage.store import ObjectNotFound, StoreError, open_store
from tasks.code_version import check_code, code_hash
from tasks.fanout import ensure_ray, interrupts_unwrapped
from tasks.reach import check_reach_on_ray
from tasks.reporting import artifact_key
from tasks.stage import stage_task
from tasks.train_report import LiveView, SegmentStatus, chart_backend, loss_curve_markdown, metrics_rows, next_steps

POLL_S = 2.0
# The Cancelled state's message: the step and the checkpoint kept are said once, in the task's log line.
JOB_CANCELLED = "the training job was stopped; a rerun resumes from the newest checkpoint"


class TrainingFailed(RuntimeError):
    """The training job exited with an error; its own log says why."""


class TrainingInputError(ValueError):
    """The training job stopped on its data, config, checkpoint or init_from weights, as it would on
    every retry: not retried (the CLI exits 2 with its one line)."""


def input_error(lines: list[str]) -> TrainingInputError | None:
    """The job's deterministic failure, from the first line of its output that reports one."""
    for line in lines:
        if DETERMINISTIC_FAILURE in line:
            return TrainingInputError(line[line.index(DETERMINISTIC_FAILURE):])
    return None


def prepare_config(config: TrainConfig) -> TrainConfig:
    """Absolute paths, and the vocabulary size of the datasets' shared tokenizer unless overridden;
    a new run's `init_from` checked against its model and data before any training process starts."""
    config = config.with_absolute_paths()
    sources = config.data + ([DataSource(manifest=config.val.manifest)] if config.val else [])
    manifests, tokenizer = load_manifests(sources)
    if config.vocab_size is not None and config.vocab_size < tokenizer.vocab_size:
        raise DataError(
            f"vocab_size {config.vocab_size} is below the datasets' tokenizer vocabulary {tokenizer.vocab_size}"
        )
    config = TrainConfig.model_validate({**config.model_dump(), "vocab_size": config.vocab_size or tokenizer.vocab_size})
    if reads_init_from(config):
        check_init_from(config.init_from, config.llama_config(), tokenizer, manifests[0].documents)
    return config


def reads_init_from(config: TrainConfig) -> bool:
    """Whether this start reads `init_from`: a new run's does, a resume never."""
    return bool(config.init_from) and latest_checkpoint(open_store(config.run_uri)) is None


def run_config(output: str, run: str) -> TrainConfig:
    """The config a run was last trained with (its config.json), or a clear error if there is no such
    run. Never one that starts over: that is asked for one invocation, not for every later one."""
    layout = RunLayout.of(output, run)
    try:
        text = layout.read_config()
    except ObjectNotFound:
        raise ValueError(
            f"no training run at {layout.uri} (no {CONFIG_FILE}): start it first with `tinyllama train` "
            "or the pretrain / train-on-build deployments"
        ) from None
    return TrainConfig.model_validate_json(text).model_copy(update={"start_over": False})


# --- torchrun ---------------------------------------------------------------------------------------


# The workers' own log timestamp: Prefect (or any on_line logger) stamps each line again.
_LEADING_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ ")


def _forward_lines(
    stream: IO[str], on_line: Callable[[str], None], failures: list[str], stopping: threading.Event
) -> None:
    """Each line of the job's output to `on_line`, until the job is being stopped: then its
    workers' tracebacks of the signal are not news (the task says in one line what was kept)."""
    for line in stream:
        line = _LEADING_TIMESTAMP.sub("", line.rstrip("\n"))
        if DETERMINISTIC_FAILURE in line:
            failures.append(line)
        if not stopping.is_set():
            on_line(line)


# `python -m torch.distributed.run ARGS` that the kernel kills if its launcher dies, even by SIGKILL
# (PR_SET_PDEATHSIG survives exec; the training workers do the same towards torchrun).
_TORCHRUN_BOUND_TO_PARENT = """\
import runpy, signal, sys
from runtime.processes import die_with_parent
die_with_parent(signal.SIGKILL)
sys.argv[0] = "torchrun"
runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
"""


def torchrun_arguments(launcher: TorchrunLauncher, run_id: str, node_rank: int | str | None = None) -> list[str]:
    """torchrun's options for node `node_rank` (default the launcher's): standalone on one node, else
    a c10d rendezvous at `rdzv_endpoint` that every node's agent joins with the same `run_id`."""
    if launcher.nnodes == 1 and launcher.rdzv_endpoint is None:
        return ["--standalone", f"--nproc-per-node={launcher.nproc}"]
    node_rank = launcher.node_rank if node_rank is None else node_rank
    return [
        f"--nnodes={launcher.nnodes}", f"--node-rank={node_rank}", f"--nproc-per-node={launcher.nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={launcher.rdzv_endpoint}", f"--rdzv-id={run_id}",
    ]


def other_nodes_command(config_uri: str, launcher: TorchrunLauncher, run_id: str) -> str:
    """What every other node runs (NODE_RANK set to its rank): the run's own config.json on the store,
    the one copy the launching task wrote, so no node trains on a config of its own."""
    arguments = torchrun_arguments(launcher, run_id, node_rank="NODE_RANK")
    return shlex.join(["torchrun", *arguments, "-m", "model.train", config_uri]).replace("NODE_RANK", "$NODE_RANK")


def launch_torchrun(
    config_uri: str,
    launcher: TorchrunLauncher,
    run_id: str = "tinyllama",
    on_line: Callable[[str], None] = print,
    on_poll: Callable[[], None] | None = None,
    program: str = "model.train",
) -> None:
    """Run `torchrun ... -m model.train CONFIG_URI` (this node's agent) until it ends.

    Its output goes line by line to `on_line`; `on_poll` is called every POLL_S seconds. Any
    exception here (cancellation included) stops the whole process tree before propagating.
    `program`: the module the workers run (a test's wrapper of model.train, say).
    """
    command = [
        sys.executable, "-c", _TORCHRUN_BOUND_TO_PARENT, *torchrun_arguments(launcher, run_id),
        "-m", program, config_uri,
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        # OMP_NUM_THREADS given (torchrun's own default) spares the log torchrun's banner about it.
        env={"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    failures: list[str] = []
    stopping = threading.Event()
    # The reader logs in the caller's context: Prefect's settings (which server) and run live in
    # contextvars, which a new thread would not see.
    context = contextvars.copy_context()
    reader = threading.Thread(
        target=context.run, args=(_forward_lines, process.stdout, on_line, failures, stopping), daemon=True
    )
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
            stopping.set()
            stop_process_tree(process)
        reader.join(timeout=10)
    if process.returncode != 0:
        raise input_error(failures) or TrainingFailed(
            f"torchrun -m model.train {config_uri} exited with code {process.returncode}"
        )


# --- Ray Train --------------------------------------------------------------------------------------


def train_worker(job: tuple[str, str]) -> None:
    """Ray Train's per-worker function: the training program, in the process group Ray created,
    on the run config it reads from the run folder (like torchrun's workers); `job` is that
    config's URI and the driver's code hash, which this worker's code must match."""
    import ray.train.torch

    from model.train import train

    config_uri, driver_hash = job
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_code(driver_hash)
        config = TrainConfig.from_yaml(config_uri)
        device = ray.train.torch.get_device()
        if config.data_nodes is None:  # the nodes Ray Train placed the workers on share out the data
            config = config.model_copy(update={"data_nodes": ray_train_nodes(device)})
        train(config, device=device)
    except ValueError as error:  # Ray Train reports a worker's error by its text: keep the cause findable
        raise ValueError(deterministic_failure_line(error)) from None


def ray_train_nodes(device) -> int:
    """How many nodes this Ray Train worker group spans: one more than the largest node rank, agreed by
    every worker (each sees only its own)."""
    import ray.train
    import torch
    import torch.distributed as dist

    nodes = torch.tensor(ray.train.get_context().get_node_rank() + 1, device=device)
    dist.all_reduce(nodes, op=dist.ReduceOp.MAX)
    return int(nodes.item())


def _fit(config_uri: str, driver_hash: str) -> None:
    """Build and run the TorchTrainer; runs as a Ray task, which owns (and so fate-shares) the run."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from model.checkpoint import DIST_TIMEOUT  # the training program's timeout, for the group Ray creates

    config = TrainConfig.from_yaml(config_uri)
    launcher = config.launcher
    use_gpu = launcher.gpus_per_worker > 0
    resources = {"CPU": launcher.cpus_per_worker, **({"GPU": launcher.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=(config_uri, driver_hash),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(DIST_TIMEOUT.total_seconds())),
        scaling_config=ScalingConfig(num_workers=launcher.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{config.name}-{uuid.uuid4().hex[:8]}",
            storage_path=str(config.local_dir / "ray-train"),
            failure_config=FailureConfig(max_failures=launcher.max_failures),
        ),
    )
    trainer.fit()


def launch_ray(config: TrainConfig, config_uri: str, on_poll: Callable[[], None] | None = None) -> None:
    """Run the training program on Ray Train with the config's `ray` launcher until it ends;
    `config_uri` is where the launcher wrote the config (the run's config.json).

    The trainer runs inside a Ray task: cancelling that task (on any exception here) ends its
    controller and workers with it.
    """
    import ray
    from ray.exceptions import RayTaskError

    if config.launcher.kind != "ray":
        raise ValueError(f"launch_ray needs a ray launcher, the config has {config.launcher.kind!r}")
    ensure_ray()
    job = ray.remote(num_cpus=0, max_retries=0)(_fit).remote(config_uri, code_hash())
    finished = False
    try:
        with interrupts_unwrapped():
            while not ray.wait([job], timeout=POLL_S)[0]:
                if on_poll is not None:
                    on_poll()
            finished = True
            ray.get(job)
    except RayTaskError as error:
        cause = str(error.cause or error)
        raise input_error(cause.splitlines()) or TrainingFailed(f"Ray Train run of {config.run_uri} failed: {cause}") from None
    finally:
        if not finished:
            ray.cancel(job, force=True)


# --- the Prefect task -------------------------------------------------------------------------------


def latest_record(config: TrainConfig) -> dict | None:
    """The last step's record rank 0 put on the run folder (None before the first step),
    whichever launcher runs the job and wherever rank 0 is."""
    progress = read_progress(open_store(config.run_uri))
    return progress.latest if progress else None


def latest_step(config: TrainConfig) -> int:
    record = latest_record(config)
    return record["step"] if record else 0


def progress_reporter(config: TrainConfig) -> Callable[..., None]:
    """A callback that moves this segment's progress artifact to the latest step and refreshes the
    run's live card (tasks/train_report.py); `final=True` (the job is done) adds the next steps to it.

    Its reads are for display and never stop or fail the job: each poll gives the store at most
    POLL_S of retries (the next poll tries again), and a failed read is logged once per spell of
    failures and skipped."""
    logger = get_run_logger()
    failing = False
    unread = object()

    def display_read(read: Callable[[], object], default: object) -> object:
        nonlocal failing
        try:
            with retry_deadline(POLL_S):
                value = read()
        except StoreError as error:
            if not failing:
                logger.warning("training progress not updated (the job goes on): %s", error)
            failing = True
            return default
        if failing:
            logger.info("training progress is read again")
        failing = False
        return value

    newest = display_read(lambda: latest_checkpoint(open_store(config.run_uri)), None)
    segment = SegmentStatus.of(newest.step if newest else 0, config.max_steps, config.max_steps_this_run)
    artifact_id = create_progress_artifact(
        0.0, key=artifact_key(config.name, "train-progress"), description=f"{config.name}: {segment.describe(None)}"
    )
    live = LiveView(config.name, segment)
    live_id = create_markdown_artifact(
        live.markdown(), key=artifact_key(config.name, "train-live"), description=f"{config.name}: training, live"
    )
    last = -1

    def update(final: bool = False, cancelled: bool = False) -> None:
        nonlocal last
        progress = display_read(lambda: read_progress(open_store(config.run_uri)), unread)
        if progress is unread:
            return
        record = progress.latest if progress else None
        step = record["step"] if record else segment.start_step
        if cancelled:  # one line, in the log and on the progress card, instead of the job's tracebacks
            kept = display_read(lambda: latest_checkpoint(open_store(config.run_uri)), None)
            line = f"cancelled at step {step}; checkpoint step {kept.step if kept else 0} kept (a rerun resumes from it)"
            logger.info(line)
            update_progress_artifact(artifact_id, segment.percent(step), description=f"{config.name}: {line}")
            with get_client(sync_client=True) as client:
                client.update_artifact(live_id, ArtifactUpdate(data=live.markdown(status=line)))
            return
        if step != last:
            last = step
            update_progress_artifact(
                artifact_id, segment.percent(step), description=f"{config.name}: {segment.describe(record)}"
            )
        if (progress and live.add(progress.latest, progress.logged)) or final:
            steps = next_steps(config.run_uri, config.name, config.eval) if final else None
            with get_client(sync_client=True) as client:  # the card's data edited in place: no version per poll
                client.update_artifact(live_id, ArtifactUpdate(data=live.markdown(steps)))

    return update


def report_final(config: TrainConfig) -> dict:
    """Table artifact of the last step's metrics and the loss curve (inline); returns that record.
    Called by the flow, so the cards sit in the flow run's own group in the UI."""
    run_store = open_store(config.run_uri)
    final = last_record(run_store) or {}
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
def train_task(config: TrainConfig) -> str | State:
    """Launch (or continue) a training run; returns the run's URI, or a Cancelled state when a cancel
    from the UI (or the API) stopped the job.

    The job holds the run's lease on the store while it trains, so two jobs never train one run.
    A crash or a failed job is retried once (resuming from the newest checkpoint); a bad config,
    bad data, a corrupt or refused checkpoint or init_from (ValueError, DataError, CheckpointError,
    or TrainingInputError from inside the job) fails at once.
    """
    logger = get_run_logger()
    config = prepare_config(config)
    layout = RunLayout.of(config.output, config.name)
    launcher = config.launcher
    if launcher.kind == "ray":  # torchrun's nodes check theirs when they start (model/reach.py)
        check_reach_on_ray(config.shared_paths(with_init_from=reads_init_from(config)))
    with acquire_lease(layout.store, LEASE_FILE, owner=f"train task of flow run {flow_run.name!r}") as lease:
        config_uri = layout.write_config(config.to_json())  # the one copy every process reads
        logger.info("training %s on %s (world size %d)", config.run_uri, launcher.kind, launcher.world_size)
        if launcher.kind == "torchrun" and launcher.nnodes > 1:
            logger.info("the other nodes run: %s", other_nodes_command(config_uri, launcher, config.name))
        report_progress = progress_reporter(config)
        chart_backend()  # now, not at the first chart: a SIGTERM must not land inside its import

        def on_poll() -> None:
            lease.check()  # LeaseLost stops the job: another holder may be training this run now
            report_progress()

        try:
            if launcher.kind == "torchrun":
                launch_torchrun(config_uri, launcher, config.name, on_line=logger.info, on_poll=on_poll)
            else:
                launch_ray(config, config_uri, on_poll=on_poll)
        except (TerminationSignal, KeyboardInterrupt) as stopped:  # a Cancel in the UI, or Ctrl-C: the job was stopped
            report_progress(cancelled=True)
            if isinstance(stopped, TerminationSignal) and get_intent() == "cancel":
                # The runner's cancel (it sends the intent before its SIGTERM): end Cancelled here, and the
                # flows above with it, where Prefect's task engine would call the signal a crash.
                return Cancelled(message=JOB_CANCELLED)
            raise
        report_progress(final=True)
    logger.info("run %s at step %d", config.run_uri, latest_step(config))
    return config.run_uri
