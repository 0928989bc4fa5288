"""The configs in examples/ validate with the project's own loaders, and say what they claim to:
the demo-sized run trains on the demo's build, the 1.1B recipe holds the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.demo import BUILD_ID, FULL
from model.config import LlamaConfig
from model.train_config import TrainConfig
from tasks.config import BuildConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LOADERS = {
    "build-my-data.yaml": BuildConfig.from_yaml,
    "train-demo.yaml": TrainConfig.from_yaml,
    "tinyllama-1.1b.yaml": TrainConfig.from_yaml,
}


def test_every_example_is_checked():
    assert sorted(path.name for path in EXAMPLES.iterdir()) == sorted(LOADERS)


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_example_validates(name):
    config = LOADERS[name](EXAMPLES / name)  # a ValidationError (or ValueError) names the key that does not
    assert config.name


def test_the_own_data_example_reads_jsonl_and_parquet():
    config = BuildConfig.from_yaml(EXAMPLES / "build-my-data.yaml")
    assert {source.format.value for source in config.sources} == {"jsonl", "parquet"}


def test_the_demo_sized_run_trains_on_the_demos_build():
    config = TrainConfig.from_yaml(EXAMPLES / "train-demo.yaml")
    assert config.output == "./data"  # the CLI's default --data folder, where `make demo` writes
    assert config.data[0].manifest == f"./data/datasets/{FULL.build}/{BUILD_ID}/manifest.json"  # what it builds
    assert config.name != FULL.run  # its own run: the demo's run continues on the demo's settings
    assert (config.model, config.launcher.world_size) == ("tiny", 2)


def test_the_tinyllama_recipe_is_the_papers():
    config = TrainConfig.from_yaml(EXAMPLES / "tinyllama-1.1b.yaml")
    assert config.llama_config() == LlamaConfig.preset("tinyllama-1.1b")
    assert (config.betas, config.weight_decay, config.grad_clip) == ((0.9, 0.95), 0.1, 1.0)
    assert (config.lr.max, config.lr.min, config.lr.warmup_steps, config.lr.decay_steps) == (4e-4, 4e-5, 2000, None)
    assert (config.seq_len, config.global_batch_tokens, config.dtype) == (2048, 2**21, "bf16")
    assert config.max_steps * config.global_batch_tokens == pytest.approx(3e12, rel=1e-3)
    weights = [source.weight for source in config.data]
    assert weights[0] / sum(weights) == pytest.approx(0.693584)  # SlimPajama's share, Starcoder the rest
