"""The configs in examples/ validate with the project's own loaders, and say what they claim to:
the own-data example reads the my-data/ folder beside it, the demo-sized run trains on the demo's
build, the 1.1B recipe holds the paper's settings. Relative paths are read from the config's
folder, so each is loaded from another working folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deployments.demo import BUILD_ID, FULL
from flows.pretrain import manifest_uri
from model.config import LlamaConfig
from model.train_config import TrainConfig
from storage.config_file import ConfigError
from tasks.config import BuildConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LOADERS = {
    "build-my-data.yaml": BuildConfig.from_yaml,
    "train-demo.yaml": TrainConfig.from_yaml,
    "tinyllama-1.1b.yaml": TrainConfig.from_yaml,
}


def demo_manifest(data_dir: Path) -> Path:
    """Where `tinyllama --data DATA_DIR demo` writes its build's manifest (deployments/demo.py)."""
    build = BuildConfig(name=FULL.build, build_id=BUILD_ID, output=str(data_dir),
                        sources=[{"name": "web", "uri": str(data_dir / "raw/*.jsonl"), "format": "jsonl"}])
    return Path(manifest_uri(build).removeprefix("file://"))


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A copy of examples/ in a checkout whose data/ holds the demo's build (only its manifest's
    name matters to a config's loader), with the own-data files beside the example, as the README
    has a user put them; the working folder is elsewhere."""
    root = tmp_path / "checkout"
    shutil.copytree(EXAMPLES, root / "examples")
    for folder, name in (("web", "a.jsonl"), ("code", "a.parquet")):
        (root / "examples/my-data" / folder).mkdir(parents=True)
        (root / "examples/my-data" / folder / name).touch()
    demo_manifest(root / "data").parent.mkdir(parents=True)
    demo_manifest(root / "data").touch()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return root


def test_every_example_is_checked():
    assert sorted(path.name for path in EXAMPLES.iterdir()) == sorted(LOADERS)


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_example_validates(name, checkout):
    config = LOADERS[name](checkout / "examples" / name)  # a ConfigError names the key that does not
    assert config.name


def test_the_own_data_example_reads_the_my_data_folder_beside_it(checkout):
    config = BuildConfig.from_yaml(checkout / "examples/build-my-data.yaml")
    assert {source.format.value: source.uri for source in config.sources} == {
        "jsonl": str(checkout / "examples/my-data/web/*.jsonl"),
        "parquet": str(checkout / "examples/my-data/code/*.parquet"),
    }
    assert config.output == str(checkout / "examples/data")


def test_the_demo_sized_run_trains_on_the_demos_build(checkout):
    config = TrainConfig.from_yaml(checkout / "examples/train-demo.yaml")
    assert config.output == str(checkout / "data")  # the CLI's default --data folder, where `make demo` writes
    assert config.data[0].manifest == str(demo_manifest(checkout / "data"))  # what it builds
    assert config.name != FULL.run  # its own run: the demo's run continues on the demo's settings
    assert (config.model, config.launcher.world_size) == ("tiny", 2)


def test_the_demo_sized_run_before_the_demo_names_where_it_looked(tmp_path):
    (tmp_path / "examples").mkdir()
    path = Path(shutil.copy(EXAMPLES / "train-demo.yaml", tmp_path / "examples"))
    with pytest.raises(ConfigError) as refused:
        TrainConfig.from_yaml(path)
    assert str(refused.value) == (
        f"{path}: data.0.manifest: {demo_manifest(tmp_path / 'data')} does not exist "
        f"('../data/datasets/{FULL.build}/{BUILD_ID}/manifest.json' is read from the config file's folder, "
        f"{tmp_path / 'examples'})"
    )


def test_the_tinyllama_recipe_is_the_papers():
    config = TrainConfig.from_yaml(EXAMPLES / "tinyllama-1.1b.yaml")  # its URIs are s3://: nothing to resolve
    assert config.llama_config() == LlamaConfig.preset("tinyllama-1.1b")
    assert (config.betas, config.weight_decay, config.grad_clip) == ((0.9, 0.95), 0.1, 1.0)
    assert (config.lr.max, config.lr.min, config.lr.warmup_steps, config.lr.decay_steps) == (4e-4, 4e-5, 2000, None)
    assert (config.seq_len, config.global_batch_tokens, config.dtype) == (2048, 2**21, "bf16")
    assert config.max_steps * config.global_batch_tokens == pytest.approx(3e12, rel=1e-3)
    weights = [source.weight for source in config.data]
    assert weights[0] / sum(weights) == pytest.approx(0.693584)  # SlimPajama's share, Starcoder the rest


def test_the_tinyllama_preset_brings_the_papers_lr_schedule(tmp_path):
    """`lr` may be left out for tinyllama-1.1b: the same config as the recipe that writes it out."""
    recipe = (EXAMPLES / "tinyllama-1.1b.yaml").read_text()
    without_lr = tmp_path / "no-lr.yaml"
    without_lr.write_text("".join(line for line in recipe.splitlines(keepends=True) if not line.startswith("lr:")))
    assert "lr:" not in without_lr.read_text()
    assert TrainConfig.from_yaml(without_lr) == TrainConfig.from_yaml(EXAMPLES / "tinyllama-1.1b.yaml")
