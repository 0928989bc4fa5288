"""The Prefect deployments, declared once, here: how the flows run when a server schedules them.

    deployment                  flow            runs
    build-dataset/on-demand     build-dataset   from the UI form, `prefect deployment run`, `tinyllama submit-build`
    pretrain/on-demand          pretrain        build, then train on the new build
    train-on-build/triggered    train-on-build  when a build-dataset/on-demand run completes (a deployment trigger)
    train-epoch/scheduled       train-epoch     every hour once its schedule is switched on (created paused)
    evaluate/on-demand          evaluate        from the UI form: lm-eval tasks on a checkpoint (default: the run's newest)

`tinyllama serve` serves them (flow.serve: each run in a subprocess of the serve process), so
no work pool or worker is needed on one machine. The training deployments run one at a time
(a deployment concurrency limit of 1, extra runs wait in the queue); beyond that, every
training job takes the run's lease on the store, so two jobs never train one run at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy, FlowRun
from prefect.deployments import run_deployment
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron
from prefect.settings import PREFECT_UI_URL

from deployments.settings import SAMPLE_RUN

if TYPE_CHECKING:  # the flows import the training stack: only the functions that declare runs load it
    from flows.pretrain import TrainSettings
    from tasks.config import BuildConfig

BUILD = "build-dataset/on-demand"
PRETRAIN = "pretrain/on-demand"
TRAIN_ON_BUILD = "train-on-build/triggered"
TRAIN_EPOCH = "train-epoch/scheduled"
EVALUATE = "evaluate/on-demand"
EPOCH_CRON = "0 * * * *"  # hourly, at minute 0
EPOCH_STEPS = 50
TAGS = ["tinyllama"]
# One run of a deployment at a time; more wait their turn (ENQUEUE) instead of failing.
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def sample_training(data_dir: Path, name: str = SAMPLE_RUN) -> TrainSettings:
    """The defaults of the training deployments (and the demo's run): the `tiny` model on 2 CPU
    processes, 8192 tokens a step, 50 steps a segment, a checkpoint at each segment's end (and every
    50 steps), a log line every 25."""
    from flows.pretrain import TrainSettings

    return TrainSettings(
        name=name,
        output=str(data_dir.resolve()),
        model="tiny",
        seq_len=256,
        global_batch_tokens=8192,
        micro_batch=8,
        lr={"max": 1e-3, "min": 1e-4, "warmup_steps": 20},
        max_steps=2000,
        max_steps_this_run=EPOCH_STEPS,
        checkpoint_every=EPOCH_STEPS,
        log_every=25,
        launcher={"kind": "torchrun", "nproc": 2},
    )


def build_to_train_trigger(enabled: bool = True) -> DeploymentEventTrigger:
    """Fires when a run of the build-dataset deployment completes, passing its build config on.

    Only runs of that deployment count: a build inside `pretrain`, or one started with
    `tinyllama build-dataset`, trains on its own or not at all.
    """
    flow_name, deployment_name = BUILD.split("/")
    return DeploymentEventTrigger(
        name="train when a build-dataset run completes",
        enabled=enabled,
        expect={"prefect.flow-run.Completed"},
        match_related=[
            {"prefect.resource.role": "flow", "prefect.resource.name": flow_name},
            {"prefect.resource.role": "deployment", "prefect.resource.name": deployment_name},
        ],
        # A lone Jinja expression keeps its type (Prefect renders it `| tojson`, hence the
        # parentheses): the build's config arrives as an object, train_run as a string.
        parameters={"build": "{{ flow_run.parameters.config }}", "train_run": "{{ (flow_run.parameters.train_run or '') }}"},
    )


def deployments(
    build: BuildConfig,
    train: TrainSettings,
    epoch_steps: int = EPOCH_STEPS,
    epoch_cron: str = EPOCH_CRON,
    epoch_schedule_active: bool = False,
    train_after_build: bool = True,
) -> list[RunnerDeployment]:
    """The five deployments; `build` and `train` are the default parameters their UI forms show."""
    from flows.build_dataset import build_dataset
    from flows.evaluate import evaluate
    from flows.pretrain import pretrain, train_on_build
    from flows.train_epoch import train_epoch

    def declare(flow, deployment: str, **options) -> RunnerDeployment:
        flow_name, name = deployment.split("/")
        assert flow.name == flow_name, f"{deployment} is not a deployment of flow {flow.name!r}"
        # Module entrypoints: the serve process's runs import the installed packages, wherever it was started.
        return flow.to_deployment(
            name, tags=TAGS, description=description(flow), entrypoint_type=EntrypointType.MODULE_PATH, **options
        )

    both = {"build": build.model_dump(mode="json"), "train": train.model_dump(mode="json")}
    return [
        declare(build_dataset, BUILD, parameters={"config": both["build"]}),
        declare(pretrain, PRETRAIN, parameters=both, concurrency_limit=ONE_AT_A_TIME),
        declare(
            train_on_build,
            TRAIN_ON_BUILD,
            parameters=both,
            concurrency_limit=ONE_AT_A_TIME,
            triggers=[build_to_train_trigger(train_after_build)],
        ),
        declare(
            train_epoch,
            TRAIN_EPOCH,
            parameters={"run": train.name, "output": train.output, "steps": epoch_steps},
            schedules=[Cron(epoch_cron, active=epoch_schedule_active)],
            concurrency_limit=ONE_AT_A_TIME,
        ),
        declare(evaluate, EVALUATE, parameters={"checkpoint": train.run_uri}),
    ]


def description(flow) -> str:
    """The deployment's description: its flow's docstring without the Args section, whose entries
    the UI shows under the run form's fields. The UI renders both as markdown (so a docstring puts
    `<placeholders>` in code spans, else they vanish as HTML tags)."""
    return flow.description.split("\n\nArgs:")[0].strip()


def submit(deployment: str, parameters: dict, wait: bool = False) -> FlowRun:
    """Start a run of a served deployment through the API (what the UI's Run button does).

    Returns at once with the scheduled run, or with the finished run if `wait`.
    """
    return run_deployment(
        deployment, parameters=parameters, timeout=None if wait else 0, poll_interval=1, as_subflow=False
    )


def flow_run_url(flow_run: FlowRun) -> str:
    """The run's page in the Prefect UI."""
    return f"{PREFECT_UI_URL.value()}/runs/flow-run/{flow_run.id}"
