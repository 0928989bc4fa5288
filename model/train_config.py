"""The typed run config of a training run (the YAML a user writes for `tinyllama train`).

    name: tiny-run
    output: ./data                      # the run lands in <output>/runs/<name>/
    model: tiny                         # a preset name (model/config.py)
    data: [{manifest: ./data/datasets/sample/BUILD/manifest.json, weight: 1.0}]
    seq_len: 256
    global_batch_tokens: 16384
    micro_batch: 8
    lr: {max: 4.0e-4, min: 4.0e-5, warmup_steps: 10}
    max_steps: 40
    checkpoint_every: 10
    launcher: {kind: torchrun, nproc: 2}

Steps are optimizer steps throughout (the lr schedule too); a step consumes exactly
`global_batch_tokens` target tokens, split into `micro_batch` x `seq_len` micro-batches per rank
and `accum_steps(world_size)` accumulation steps.

`init_from` starts a new run from a Hugging Face Llama folder's weights instead of a random
initialization (continued pretraining); its architecture must be the run's, its tokenizer and
document convention the datasets' (model.hf.check_init_from). A resume loads the run's own
checkpoint and never reads `init_from` again.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from model.config import LlamaConfig
from storage.config_fields import (
    MAX_NAME_CHARS,
    InputPath,
    NonNegativeFloat,
    NonNegativeInt,
    OutputPath,
    PositiveFloat,
    PositiveInt,
    Real,
    Seed,
)
from storage.config_file import read_config
from storage.reach import SharedPath
from storage.run_layout import RunLayout
from storage.store import check_name

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_RUN_NAME_CHARS = 2 * MAX_NAME_CHARS + 1  # room for the `<build name>-<build id>` a pretrain run is named


class Section(BaseModel):
    """Numbers and flags are strict and bounded (storage/config_fields.py)."""

    # Errors never echo the input: a rejected value might be a secret.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class DataSource(Section):
    """One entry of the run config's data mixture."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    manifest: InputPath = Field(description="URI of a manifest.json: a path, file:// or s3://")
    weight: Real = Field(1.0, gt=0, description="Mixture weight, normalized over sources")
    source: str | None = Field(
        None, max_length=MAX_NAME_CHARS, description="Only the shards of this source within the manifest"
    )


class LRSchedule(Section):
    """Linear warmup to `max`, then cosine decay to `min` at `decay_steps` (default: max_steps)."""

    max: PositiveFloat
    min: NonNegativeFloat = 0.0
    warmup_steps: NonNegativeInt = 0
    decay_steps: PositiveInt | None = None

    @model_validator(mode="after")
    def _ordered(self) -> LRSchedule:
        if self.min > self.max:
            raise ValueError(f"lr.min {self.min} exceeds lr.max {self.max}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"lr.decay_steps {self.decay_steps} must exceed lr.warmup_steps {self.warmup_steps}")
        return self


# The lr schedule a preset was trained with, the default of `lr` for it: TinyLlama's (arXiv 2401.02385;
# its other settings are the defaults: AdamW (0.9, 0.95), weight decay 0.1, grad clip 1.0).
PRESET_LR = {"tinyllama-1.1b": LRSchedule(max=4e-4, min=4e-5, warmup_steps=2000)}


class Validation(Section):
    """Mean loss over the first `batches` micro-batches per rank of a held-out build, every `every` steps."""

    manifest: InputPath
    every: PositiveInt
    batches: PositiveInt = 8


class Evaluation(Section):
    """lm-evaluation-harness tasks scored on the checkpoint each training segment ends with."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task names (registry or include_path)")
    include_path: InputPath | None = Field(None, description="Folder of task YAMLs (local data)")
    num_fewshot: NonNegativeInt | None = None
    limit: PositiveInt | None = Field(None, description="At most this many items per task")
    batch_size: PositiveInt = 8


class TorchrunLauncher(Section):
    """`nproc` processes on each of `nnodes` nodes. Several nodes meet at a c10d rendezvous on
    `rdzv_endpoint` (host:port of one node, e.g. the first of a Slurm job); the Prefect task runs
    the agent of node `node_rank` and every other node runs its own (docs/scaling.md: multi-node training)."""

    kind: Literal["torchrun"] = "torchrun"
    nproc: PositiveInt = Field(1, description="Processes (GPUs) per node")
    nnodes: PositiveInt = 1
    node_rank: NonNegativeInt = 0
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous; required with nnodes > 1")

    @model_validator(mode="after")
    def _rendezvous(self) -> TorchrunLauncher:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"launcher.nnodes {self.nnodes} needs launcher.rdzv_endpoint (host:port of the rendezvous)")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"launcher.node_rank {self.node_rank} must be below launcher.nnodes {self.nnodes}")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


class RayLauncher(Section):
    kind: Literal["ray"]
    workers: PositiveInt
    gpus_per_worker: NonNegativeFloat = 0
    cpus_per_worker: PositiveFloat = 1
    # Ray Train restarts the worker group this many times; each restart resumes from the store.
    max_failures: NonNegativeInt = 2

    @property
    def world_size(self) -> int:
        return self.workers


Launcher = Annotated[TorchrunLauncher | RayLauncher, Field(discriminator="kind")]
Beta = Annotated[Real, Field(ge=0, lt=1)]  # an AdamW beta (torch refuses others when training starts)


class TrainConfig(Section):
    # `model` and `model_overrides` are config keys here, not pydantic's namespace.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)

    name: str = Field(max_length=MAX_RUN_NAME_CHARS, description="Run name: the run lives in <output>/runs/<name>/")
    output: OutputPath = Field(description="Store URI or path that holds runs/")
    model: str = Field(description="Model preset name")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="LlamaConfig fields that replace the preset's")
    init_from: InputPath | None = Field(
        None, description="Hugging Face Llama folder (a path or store URI) whose weights a new run "
        "starts from; its architecture must be the run's (model, model_overrides, vocab_size), its tokenizer the "
        "datasets'. A resume loads the run's checkpoint instead."
    )
    vocab_size: PositiveInt | None = Field(None, description="Default: the datasets' tokenizer vocabulary")
    data: list[DataSource] = Field(min_length=1)
    val: Validation | None = None
    eval: Evaluation | None = None
    seq_len: PositiveInt
    global_batch_tokens: PositiveInt
    micro_batch: PositiveInt = Field(description="Sequences per rank per forward/backward")
    lr: LRSchedule | None = Field(
        None, description="Default: the schedule the preset's paper trained it with (tinyllama-1.1b: 4e-4 to 4e-5 "
        "after 2,000 warmup steps); required for the other presets"
    )
    weight_decay: NonNegativeFloat = 0.1
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    grad_clip: PositiveFloat | None = 1.0
    max_steps: PositiveInt = Field(description="Optimizer steps of the whole run")
    max_steps_this_run: PositiveInt | None = Field(None, description="Stop after this many steps in one invocation")
    checkpoint_every: PositiveInt
    log_every: PositiveInt = Field(10, description="A log line every this many steps (and at each checkpoint)")
    keep_checkpoints: PositiveInt | None = Field(3, description="Keep the checkpoint folders of the newest k steps (a save never reads the older ones to count them); null keeps all")
    async_checkpoint: StrictBool = Field(False, description="Train on while a checkpoint is written (at most one in flight)")
    start_over: StrictBool = Field(
        False, description="When the run has checkpoints but none verifies (all corrupt), train from step 0 "
        "instead of refusing; the corrupt ones are set aside, unchanged. For this invocation only: a run continued "
        "from its stored config (train-epoch) never starts over"
    )
    launcher: Launcher = Field(default_factory=TorchrunLauncher)
    data_nodes: PositiveInt | None = Field(
        None, description="Nodes that share out the data, each fetching ~1/data_nodes of it (default: the "
        "torchrun launcher's nnodes, or the nodes Ray Train placed the workers on); a resumed run keeps the count it "
        "started with"
    )
    seed: Seed = 42
    compile: StrictBool = False
    activation_checkpointing: StrictBool = False
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPUs, fp32 on CPUs")
    data_parallel: Literal["auto", "fsdp", "ddp"] = Field("auto", description="auto: FSDP2 on GPUs, DDP on CPUs")
    work_dir: OutputPath | None = Field(
        None, description="Local folder of each node for metrics, TensorBoard and the shard cache (<work_dir>/shard-cache)"
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_key_segment(cls, name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"run name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a folder name)")
        return check_name(name)

    @field_validator("model")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        if name not in LlamaConfig.preset_names():
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(LlamaConfig.preset_names())}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.lr is None:
            if self.model not in PRESET_LR:
                raise ValueError(f"lr: required for model {self.model!r} (a default comes with: {', '.join(PRESET_LR)})")
            self.lr = PRESET_LR[self.model].model_copy()
        self.llama_config(self.vocab_size or LlamaConfig.preset(self.model).vocab_size)  # shapes and overrides
        self.accum_steps(self.launcher.world_size)
        if self.lr.decay_steps is None and self.lr.warmup_steps >= self.max_steps:
            raise ValueError(f"lr.warmup_steps {self.lr.warmup_steps} must be below max_steps {self.max_steps}")
        return self

    @classmethod
    def from_yaml(cls, path_or_uri: str | os.PathLike) -> TrainConfig:
        """Read a YAML (or JSON) config from a local path or a store URI; its relative paths from its folder."""
        return read_config(path_or_uri, cls)

    def with_absolute_paths(self) -> TrainConfig:
        """The same config with local paths made absolute (a launcher's workers may run elsewhere)."""
        data = self.model_dump(mode="json")
        data["output"] = _absolute(self.output)
        data["work_dir"] = str(self.local_dir)
        for source in data["data"]:
            source["manifest"] = _absolute(source["manifest"])
        if data["val"]:
            data["val"]["manifest"] = _absolute(data["val"]["manifest"])
        if data["init_from"]:
            data["init_from"] = _absolute(data["init_from"])
        if data["eval"] and data["eval"]["include_path"]:
            data["eval"]["include_path"] = _absolute(data["eval"]["include_path"])
        return TrainConfig.model_validate(data)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    def llama_config(self, vocab_size: int | None = None) -> LlamaConfig:
        """The model's architecture: the preset, the overrides, and the vocabulary size."""
        vocab = self.vocab_size or vocab_size
        overrides = {**self.model_overrides, **({"vocab_size": vocab} if vocab else {})}
        try:
            config = LlamaConfig.preset(self.model, **overrides)
        except ValueError as e:
            raise ValueError(f"model {self.model!r} with overrides {overrides}: {e}") from None
        if self.seq_len > config.max_seq_len:
            raise ValueError(
                f"seq_len {self.seq_len} exceeds model {self.model!r}'s max_seq_len {config.max_seq_len}; "
                f"lower seq_len or set model_overrides: {{max_seq_len: {self.seq_len}}}"
            )
        return config

    def accum_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step; global_batch_tokens must split exactly."""
        per_micro_step = self.micro_batch * self.seq_len * world_size
        if self.global_batch_tokens % per_micro_step:
            raise ValueError(
                f"global_batch_tokens {self.global_batch_tokens} is not a multiple of micro_batch {self.micro_batch} "
                f"x seq_len {self.seq_len} x world size {world_size} = {per_micro_step}"
            )
        return self.global_batch_tokens // per_micro_step

    @property
    def run_uri(self) -> str:
        """<output>/runs/<name>, as an absolute store URI."""
        return RunLayout.of(self.output, self.name).uri

    @property
    def local_dir(self) -> Path:
        """Rank 0's local run folder (TensorBoard, plots) and the shard cache's parent."""
        if self.work_dir:
            return Path(self.work_dir).expanduser().resolve()
        return Path(tempfile.gettempdir()) / "tinyllama-runs" / self.name

    @property
    def loader_nodes(self) -> int:
        """`data_nodes`, else torchrun's `nnodes`; on Ray the launcher sets `data_nodes` from Ray Train's
        context (tasks/train.py train_worker), so 1 here only outside Ray Train."""
        if self.data_nodes is not None:
            return self.data_nodes
        return self.launcher.nnodes if self.launcher.kind == "torchrun" else 1

    def shared_paths(self, with_init_from: bool) -> list[SharedPath]:
        """The local paths every node reads or writes: the output, the manifests, and `init_from` when a
        new run reads it (storage/reach.py; remote store URIs need no check)."""
        paths = [SharedPath.of("output", self.output, output=True)]
        paths += [SharedPath.of(f"data.{i}.manifest", d.manifest, is_file=True) for i, d in enumerate(self.data)]
        if self.val:
            paths.append(SharedPath.of("val.manifest", self.val.manifest, is_file=True))
        if self.init_from and with_init_from:
            paths.append(SharedPath.of("init_from", self.init_from))
        return [path for path in paths if path is not None]

    @property
    def shard_cache_dir(self) -> Path:
        """Where the loader keeps token shards fetched from a remote store; the node's ranks share it."""
        return self.local_dir / "shard-cache"


def _absolute(path_or_uri: str) -> str:
    return path_or_uri if "://" in path_or_uri else str(Path(path_or_uri).expanduser().resolve())
