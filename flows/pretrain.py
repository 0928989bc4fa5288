"""Flows `pretrain` (build a dataset, then train on it) and `train-on-build` (train on a finished build).

`train-on-build` is what the build->train automation runs: when a `build-dataset` deployment
run completes, its trigger passes that run's build config here, and the manifest is found
where the build wrote it. Both flows start a run or continue it; a run that exists already
continues only on the datasets it started with.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Completed, State
from pydantic import Field

from flows.build_dataset import build_dataset
from flows.cancellation import cancel_task_and_subflow_runs, result_unless_cancelled
from flows.train import train as train_run_flow
from model.data import DataSource
from model.train_config import TrainConfig
from storage import build_layout
from storage.store import open_object
from tasks.config import BuildConfig
from tasks.plan import Build
from tasks.train import run_config


class TrainSettings(TrainConfig):
    """A training run config whose main dataset is the build made (or found) by the flow."""

    data: list[DataSource] = Field(
        default_factory=list, description="Other datasets mixed in beside the build (which has weight 1.0)"
    )

    def with_build(self, manifest_uri: str) -> TrainConfig:
        settings = self.model_dump(mode="json")
        settings["data"] = [{"manifest": manifest_uri}, *settings["data"]]
        return TrainConfig.model_validate(settings)


def manifest_uri(build: BuildConfig) -> str:
    """Where the build described by `build` has (or will have) its manifest."""
    return Build(config=build).store.url(build_layout.MANIFEST)


def check_same_data(config: TrainConfig) -> None:
    """Refuse to continue an existing run on other datasets than it started with."""
    try:
        earlier = run_config(config.output, config.name)
    except ValueError:  # no such run yet
        return
    before = [d.manifest for d in earlier.data]
    now = [d.manifest for d in config.with_absolute_paths().data]
    if before != now:
        raise ValueError(
            f"run {earlier.run_uri} trains on {before}, not {now}: give this training its own run name (train.name)"
        )


@flow(name="pretrain", flow_run_name="pretrain-{build.name}", on_cancellation=[cancel_task_and_subflow_runs])
def pretrain(build: BuildConfig, train: TrainSettings) -> str | State:
    """Build a dataset, then train on it; returns the run's URI.

    Args:
        build: The dataset build (as for build-dataset).
        train: The training run; its data is the new build (plus any datasets listed).
    """
    check_same_data(train.with_build(manifest_uri(build)))  # before the build's work, not after
    manifest = build_dataset(build, train_run=train.name)
    return result_unless_cancelled(train_run_flow(train.with_build(manifest), return_state=True))


def own_run_name(build: BuildConfig, train: TrainSettings) -> str:
    """The run a build trains on by default: the settings' run if it is new or already trains on
    this build, else one named after the build (so every new build trains on a run of its own)."""
    try:
        check_same_data(train.with_build(manifest_uri(build)))
    except ValueError:
        return f"{build.name}-{build.resolved_build_id}"
    return train.name


@flow(name="train-on-build", flow_run_name="train-on-{build.name}", on_cancellation=[cancel_task_and_subflow_runs])
def train_on_build(build: BuildConfig, train: TrainSettings, train_run: str = "") -> str | State:
    """Train on a finished build; returns the run's URI (or a Completed "skipped" state).

    Args:
        build: The config of a finished build (the automation passes the build-dataset run's config).
        train: The training settings; its data is that build (plus any datasets listed).
        train_run: The run to train (default: own_run_name). A run that trains on other datasets
            is skipped with a message, not failed.
    """
    manifest = manifest_uri(build)
    store, key = open_object(manifest)
    if not store.exists(key):
        raise ValueError(f"build {build.name!r} has no manifest at {manifest}: it has not finished")
    name = train_run or own_run_name(build, train)
    config = train.model_copy(update={"name": name}).with_build(manifest)
    try:
        check_same_data(config)
    except ValueError as mismatch:
        get_run_logger().warning("skipped: %s", mismatch)
        return Completed(message=f"skipped: {mismatch}")
    return result_unless_cancelled(train_run_flow(config, return_state=True))
