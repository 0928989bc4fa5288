"""Config gaps are refused when the config is read, by the real `tinyllama` command: exit 2 and one
line naming the file and the key, before Prefect (or anything that writes) starts. The build and
run configs have one loader (storage/config_file.py): the same line from either, and from Python.

Pydantic's lax mode would take `seed: true` as 1 and `seed: "7"` as 7; a negative seed used to pass
and fail in the tokenizer stage after ingest and dedup wrote their outputs; a 300-character name
failed at plan with ENAMETOOLONG.

Relative paths in a config file are read from the file's folder: every test here runs the command
from another working folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from model.train_config import TrainConfig
from storage.config_file import ConfigError
from storage.store import open_object
from tasks.config import BuildConfig
from tests.builds import tiny_corpus
from tests.deployments.test_cli import TEMPORARY_SERVER_LINE, cli, without_prefect
from tests.model.runs import short_documents_build

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


def config_folder(tmp_path: Path) -> Path:
    """tmp_path/configs, holding what BUILD and RUN read (their relative paths are read from it)."""
    folder = tmp_path / "configs"
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    (folder / "data/datasets/gaps/b").mkdir(parents=True, exist_ok=True)
    (folder / "data/datasets/gaps/b/manifest.json").touch()
    return folder


def refused(tmp_path, command: str, config: dict) -> str:
    """Run `tinyllama <command> <yaml>` on `config` (output in tmp_path/out) from another working
    folder; the one line it printed, without `error: <file>: `."""
    path = config_folder(tmp_path) / "config.yaml"
    path.write_text(yaml.safe_dump({**config, "output": str(tmp_path / "out")}))
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    done = cli("--data", str(tmp_path / "data"), command, str(path), env=without_prefect(), cwd=tmp_path / "elsewhere")
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
    build = BuildConfig.model_validate(with_value(BUILD, "minhash.threshold", "8e-1"))
    assert build.minhash.threshold == 0.8
    run = TrainConfig.model_validate({**with_value(RUN, "lr.max", "4e-4"), "output": str(tmp_path), "weight_decay": 0})
    assert (run.lr.max, run.weight_decay) == (4e-4, 0.0)


@pytest.mark.parametrize(
    ("command", "loader", "config", "line"),
    [
        ("build-dataset", BuildConfig, with_value(BUILD, "sources.0.text_feild", "x"),
         "sources.0.text_feild: unknown key (did you mean 'text_field'?)"),
        ("train", TrainConfig, with_value(RUN, "data.0.manifst", "x"), "data.0.manifst: unknown key (did you mean 'manifest'?)"),
        ("train", TrainConfig, {**RUN, "launcher": {"kind": "torchrun", "nprocs": 2}},  # pydantic: launcher.torchrun.nprocs
         "launcher.nprocs: unknown key (did you mean 'nproc'?)"),
        ("build-dataset", BuildConfig, with_value(BUILD, "seed", -1), "seed: Input should be greater than or equal to 0"),
        ("train", TrainConfig, with_value(RUN, "seed", -1), "seed: Input should be greater than or equal to 0"),
        ("train", TrainConfig, {**RUN, "lr": None}, "lr: required for model 'tiny' (a default comes with: tinyllama-1.1b)"),
    ],
)
def test_the_cli_and_both_loaders_give_the_same_line(tmp_path, command, loader, config, line):
    assert refused(tmp_path, command, config) == line
    path = config_folder(tmp_path) / "config.yaml"
    with pytest.raises(ConfigError) as error:
        loader.from_yaml(path)
    assert str(error.value) == f"{path}: {line}"


@pytest.mark.parametrize(
    ("command", "config", "key", "written"),
    [
        ("build-dataset", with_value(BUILD, "sources.0.uri", "corpus/*.jsonl"), "sources.0.uri", "corpus/*.jsonl"),
        ("build-dataset", with_value(BUILD, "tokenizer", {"model": "./llama2.model"}), "tokenizer.model", "./llama2.model"),
        ("train", with_value(RUN, "data.0.manifest", "../data/b/manifest.json"), "data.0.manifest", "../data/b/manifest.json"),
        ("train", {**RUN, "init_from": "released"}, "init_from", "released"),
    ],
)
def test_a_missing_relative_path_names_the_folder_it_was_read_from(tmp_path, command, config, key, written):
    folder = config_folder(tmp_path)
    resolved = os.path.normpath(folder / written)
    assert refused(tmp_path, command, config) == (
        f"{key}: {resolved} does not exist ({written!r} is read from the config file's folder, {folder})"
    )


def test_relative_paths_are_read_from_the_config_files_folder_not_the_working_folder(tmp_path, monkeypatch):
    folder = config_folder(tmp_path)
    for name in ("released", "eval-tasks"):
        (folder / name).mkdir()
    (folder / "llama2.model").touch()
    build = {**BUILD, "output": "../out", "tokenizer": {"model": "llama2.model"}, "sources": [
        *BUILD["sources"],
        {"name": "absolute", "uri": str(tmp_path / "other/*.jsonl"), "format": "jsonl"},
        {"name": "remote", "uri": "s3://bucket/web/*.jsonl", "format": "jsonl"},
    ]}
    run = {**RUN, "output": "out", "init_from": "released", "work_dir": "work", "val": {"manifest": RUN["data"][0]["manifest"], "every": 2},
           "eval": {"tasks": ["tiny_mc"], "include_path": "eval-tasks"}, "data": [*RUN["data"], {"manifest": "s3://b/m.json"}]}
    (folder / "build.yaml").write_text(yaml.safe_dump(build))
    (folder / "run.yaml").write_text(yaml.safe_dump(run))
    (folder / "default-output.yaml").write_text(yaml.safe_dump(BUILD))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    loaded = BuildConfig.from_yaml("../configs/build.yaml")
    assert [source.uri for source in loaded.sources] == [
        str(folder / "raw/*.jsonl"), str(tmp_path / "other/*.jsonl"), "s3://bucket/web/*.jsonl"
    ]
    assert (loaded.output, loaded.tokenizer.model) == (str(tmp_path / "out"), str(folder / "llama2.model"))
    assert BuildConfig.from_yaml(folder / "default-output.yaml").output == str(folder / "data")  # left out: ./data

    trained = TrainConfig.from_yaml(folder / "run.yaml")
    manifest = str(folder / "data/datasets/gaps/b/manifest.json")
    assert [source.manifest for source in trained.data] == [manifest, "s3://b/m.json"]
    assert (trained.output, trained.work_dir, trained.init_from) == (str(folder / "out"), str(folder / "work"), str(folder / "released"))
    assert (trained.val.manifest, trained.eval.include_path) == (manifest, str(folder / "eval-tasks"))
    assert trained.with_absolute_paths() == trained  # nothing left for the launcher to resolve

    # A config made in Python keeps its paths, relative to the working folder as before.
    assert BuildConfig.model_validate(build).output == "../out"
    assert TrainConfig.model_validate(run).with_absolute_paths().output == str(tmp_path / "elsewhere/out")


def test_a_config_on_a_store_reads_its_relative_paths_from_its_folder_there(s3_bucket_uri):
    uri = f"{s3_bucket_uri}/configs/run.yaml"
    store, key = open_object(uri)
    store.put_text(key, yaml.safe_dump({**RUN, "output": "..", "data": [{"manifest": "../datasets/gaps/b/manifest.json"}]}))
    loaded = TrainConfig.from_yaml(uri)
    assert (loaded.output, loaded.data[0].manifest) == (s3_bucket_uri, f"{s3_bucket_uri}/datasets/gaps/b/manifest.json")


@pytest.mark.slow
def test_a_build_config_in_another_folder_builds_from_it(tmp_path, prefect_server):
    """`tinyllama build-dataset ../project/build.yaml` reads and writes under project/, whatever the working folder."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    tiny_corpus(project / "raw", files=2, docs_per_file=40, seed=3)
    (project / "build.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "output": "data", "sources": [{"name": "web", "uri": "raw/*.jsonl", "format": "jsonl"}],
        "tokenizer": {"train": {"vocab_size": 512}}, "filters": {"min_chars": 10}, "dedup": {"near": False},
    }))
    elsewhere.mkdir()
    done = cli("--data", str(tmp_path / "cli-data"), "build-dataset", "../project/build.yaml",
               env=without_prefect(PREFECT_API_URL=prefect_server), cwd=elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = done.stdout.splitlines()[-1]
    assert manifest.startswith(f"file://{project}/data/datasets/tiny/") and manifest.endswith("/manifest.json")
    assert " 80 " in done.stdout  # both files' documents were read
    assert list(elsewhere.iterdir()) == []


@pytest.mark.slow
def test_a_run_config_in_another_folder_trains_from_it(tmp_path, prefect_server):
    """`tinyllama train ../project/run.yaml` reads the manifest and writes the run under project/; the
    run's stored config holds the absolute paths, so a continuation (train-epoch) runs from anywhere."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    manifest = short_documents_build(str(project / "data")).removeprefix("file://")
    run = {**RUN, "name": "relative", "model_overrides": {"n_layers": 2}, "seq_len": 32, "global_batch_tokens": 256,
           "output": "out", "work_dir": "work", "data": [{"manifest": os.path.relpath(manifest, project)}]}
    (project / "run.yaml").write_text(yaml.safe_dump(run))
    elsewhere.mkdir()
    done = cli("--data", str(tmp_path / "cli-data"), "train", "../project/run.yaml",
               env=without_prefect(PREFECT_API_URL=prefect_server), cwd=elsewhere)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert done.stdout.splitlines()[-1] == f"file://{project}/out/runs/relative"
    checkpoints = sorted(path.name for path in (project / "out/runs/relative/checkpoints").iterdir())
    assert checkpoints == ["step-0000002", "step-0000004"]
    stored = TrainConfig.model_validate_json((project / "out/runs/relative/config.json").read_text())
    assert (stored.output, stored.data[0].manifest, stored.work_dir) == (str(project / "out"), manifest, str(project / "work"))
    assert list(elsewhere.iterdir()) == []
