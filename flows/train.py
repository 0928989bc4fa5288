"""Flow `train`: launch (or continue) a training run described by a TrainConfig."""

from __future__ import annotations

from prefect import flow
from prefect.states import Cancelled, State

from flows.cancellation import cancel_task_and_subflow_runs
from model.train_config import TrainConfig
from tasks.evaluate import evaluate_segment
from tasks.train import report_final, train_task


@flow(name="train", flow_run_name="train-{config.name}", on_cancellation=[cancel_task_and_subflow_runs])
def train(config: TrainConfig) -> str | State:
    """Train until max_steps (or for max_steps_this_run more steps), then evaluate the checkpoint it
    ended with when the config names evaluation tasks; returns the run's URI (or, when a cancel
    stopped the training, its Cancelled state)."""
    trained = train_task(config, return_state=True)
    if trained.is_cancelled():  # by a runner's cancel: this run ends Cancelled too, and the one above it
        return Cancelled(message=trained.message)
    run_uri = trained.result()
    report_final(config)  # the final metrics and the loss curve, on the flow run's page
    if config.eval is not None:
        evaluate_segment(run_uri, config.eval)
    return run_uri
