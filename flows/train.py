"""Flow `train`: launch (or continue) a training run described by a TrainConfig."""

from __future__ import annotations

from prefect import flow

from model.train_config import TrainConfig
from tasks.train import train_task


@flow(name="train", flow_run_name="train-{config.name}")
def train(config: TrainConfig) -> str:
    """Train until max_steps (or for max_steps_this_run more steps); returns the run's URI."""
    return train_task(config)
