"""Config gaps are refused when the config is read, by the real `tinyllama` command: exit 2 and one
line naming the file and the key, before Prefect (or anything that writes) starts.

Pydantic's lax mode would take `seed: true` as 1 and `seed: "7"` as 7; a negative seed used to pass
and fail in the tokenizer stage after ingest and dedup wrote their outputs; a 300-character name
failed at plan with ENAMETOOLONG.
"""

from __future__ import annotations

import pytest
import yaml

from tests.deployments.test_cli import TEMPORARY_SERVER_LINE, cli, without_prefect

BUILD = {
    "name": "gaps",
    "sources": [{"name": "web", "uri": "raw/*.jsonl", "format": "jsonl"}],
    "tokenizer": {"train": {"vocab_size": 512}},
}
RUN = {
    "name": "gaps",
    "model": "tiny",
    "data": [{"manifest": "data/datasets/gaps/b/manifest.json"}],
    "seq_len": 64,
    "global_batch_tokens": 512,
    "micro_batch": 8,
    "lr": {"max": 1.0e-3, "min": 1.0e-4, "warmup_steps": 1},
    "max_steps": 4,
    "checkpoint_every": 2,
}


def with_value(config: dict, key: str, value) -> dict:
    """A copy of `config` with the value at a dotted key path ('sources.0.name') replaced."""
    config = yaml.safe_load(yaml.safe_dump(config))
    *parents, last = [int(part) if part.isdigit() else part for part in key.split(".")]
    node = config
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    node[last] = value
    return config


def refused(tmp_path, command: str, config: dict) -> str:
    """Run `tinyllama <command> <yaml>` on `config` (output in tmp_path/out); the one line it printed."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**config, "output": str(tmp_path / "out")}))
    done = cli("--data", str(tmp_path / "data"), command, str(path), env=without_prefect(), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert TEMPORARY_SERVER_LINE not in done.stderr and done.stdout == ""
    assert not (tmp_path / "out").exists()
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: "), line
    return line.removeprefix(f"error: {path}: ")


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("seed", -1, "greater than or equal to 0"),
        ("seed", True, "a valid integer"),
        ("seed", "7", "a valid integer"),
        ("seed", 1 << 40, "less than or equal to 4294967295"),
        ("minhash.seed", -1, "greater than or equal to 0"),
        ("name", "n" * 300, "at most 100 characters"),
        ("build_id", "b" * 300, "at most 100 characters"),
        ("sources.0.name", "s" * 101, "at most 100 characters"),
        ("shard_tokens", -1, "greater than 0"),  # refused before as well
        ("filters.max_record_bytes", 8.0, "a valid integer"),
        ("minhash.num_perm", "128", "a valid integer"),
        ("minhash.threshold", True, "not true/false"),
        ("tokenizer.train.character_coverage", 1.5, "less than or equal to 1"),
        ("quarantine", "no", "a valid boolean"),
        ("dedup.near", 1, "a valid boolean"),
        ("parallelism", True, "a valid integer"),
    ],
)
def test_a_build_config_gap_is_refused_at_load_naming_the_key(tmp_path, key, value, problem):
    line = refused(tmp_path, "build-dataset", with_value(BUILD, key, value))
    assert line.startswith(f"{key}: ") and problem in line, line


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("seed", -1, "greater than or equal to 0"),
        ("seed", True, "a valid integer"),
        ("seed", "7", "a valid integer"),
        ("name", "r" * 300, "at most 201 characters"),
        ("max_steps", "100", "a valid integer"),
        ("micro_batch", 8.0, "a valid integer"),
        ("lr.warmup_steps", "2", "a valid integer"),
        ("lr.max", True, "not true/false"),
        ("betas", [0.9, 1.5], "less than 1"),
        ("compile", 1, "a valid boolean"),
        ("data.0.weight", True, "not true/false"),
        ("checkpoint_every", 2.0, "a valid integer"),
    ],
)
def test_a_run_config_gap_is_refused_at_load_naming_the_key(tmp_path, key, value, problem):
    line = refused(tmp_path, "train", with_value(RUN, key, value))
    location = "betas.1" if key == "betas" else key
    assert line.startswith(f"{location}: ") and problem in line, line


def test_the_output_inside_an_input_glob_is_refused_at_load_naming_both(tmp_path):
    config = with_value(BUILD, "sources.0.uri", f"{tmp_path}/**/*.jsonl")
    line = refused(tmp_path, "build-dataset", config)
    assert line.startswith(f"source 'web': input {tmp_path}/**/*.jsonl could match the store's own outputs under output "
                           f"{tmp_path / 'out'} ("), line


def test_yaml_friendly_values_still_load(tmp_path):
    """Floats written the way YAML 1.1 reads as strings ("8e-1") and whole numbers as floats stay accepted."""
    from model.train_config import TrainConfig
    from tasks.config import BuildConfig

    build = BuildConfig.model_validate(with_value(BUILD, "minhash.threshold", "8e-1"))
    assert build.minhash.threshold == 0.8
    run = TrainConfig.model_validate({**with_value(RUN, "lr.max", "4e-4"), "output": str(tmp_path), "weight_decay": 0})
    assert (run.lr.max, run.weight_decay) == (4e-4, 0.0)
