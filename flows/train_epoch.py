"""Flow `train-epoch`: advance a named training run by one segment, from its newest checkpoint.

The run must exist (its config.json is written when training first starts it: `tinyllama
train`, or the `pretrain` / `train-on-build` deployments). The scheduled `train-epoch`
deployment calls this flow, so a long run advances a segment at a time; a run that has reached
its `max_steps` is left alone.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import State

from flows.cancellation import cancel_task_and_subflow_runs, result_unless_cancelled
from flows.train import train
from model.checkpoint import latest_checkpoint
from storage.config_fields import OutputPath
from storage.store import open_store
from tasks.train import run_config


@flow(name="train-epoch", flow_run_name="train-epoch-{run}", on_cancellation=[cancel_task_and_subflow_runs])
def train_epoch(run: str, output: OutputPath = "./data", steps: int = 50) -> str | State:
    """Continue a training run from its newest checkpoint for `steps` more optimizer steps.

    Args:
        run: The run's name: its folder is `runs/<run>` in the output store.
        output: The store that holds the run: a folder, or `s3://bucket/prefix`.
        steps: Optimizer steps to train in this segment (fewer if the run ends sooner).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    logger = get_run_logger()
    config = run_config(output, run)
    checkpoint = latest_checkpoint(open_store(config.run_uri))
    done = checkpoint.step if checkpoint else 0
    if done >= config.max_steps:
        logger.info("run %s is complete (step %d of %d): nothing to train", config.run_uri, done, config.max_steps)
        return config.run_uri
    logger.info(
        "run %s: steps %d -> %d of %d", config.run_uri, done, min(done + steps, config.max_steps), config.max_steps
    )
    return result_unless_cancelled(train(config.model_copy(update={"max_steps_this_run": steps}), return_state=True))
