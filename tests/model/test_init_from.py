"""Continued pretraining: a new run's `init_from` (a Hugging Face Llama folder written by
transformers itself), checked against `transformers`' own loss, on a synthetic build in real S3.

One module fixture runs the jobs once:
- fsdp: 2 of 4 steps on 2 ranks (FSDP2, as on GPUs) from the folder on S3; then the folder is
  deleted and the run resumed for the other 2 on 1 rank (DDP);
- ddp: 1 step on 1 rank (DDP) from the local folder.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch
import transformers
from transformers import LlamaForCausalLM

from model.checkpoint import load_model
from model.config import LlamaConfig
from model.data import BlockLoader
from model.hf import hf_config, save_tokenizer
from model.train_config import TrainConfig
from storage.run_layout import RunLayout
from storage.store import open_store
from tasks.train import prepare_config
from tests.model.runs import (
    STEPS, WEIGHTS_ONLY_ADVICE, NotATensor, error_lines, failed_train_task_runs, flow_run_logs, launch_training,
    metrics, run_training, short_documents_build, tinyllama_train, train_config, train_sentencepiece_model,
    with_tokenizer,
)

# The runs' model (tests/model/runs.py: tiny, 2 layers) with the synthetic build's vocabulary.
ARCHITECTURE = LlamaConfig.preset("tiny", n_layers=2, vocab_size=512)


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(train_sentencepiece_model())
    return path


@pytest.fixture(scope="module")
def dataset(s3_bucket_uri, tokenizer_model) -> str:
    """A synthetic build on S3 tokenized (by its fingerprint) with `tokenizer_model`; documents
    end with EOS and start without BOS."""
    manifest_uri = short_documents_build(f"{s3_bucket_uri}/init-from-{uuid.uuid4().hex[:8]}")
    return with_tokenizer(manifest_uri, tokenizer_model.read_bytes())


@pytest.fixture(scope="module")
def released(tmp_path_factory, tokenizer_model) -> tuple[Path, LlamaForCausalLM]:
    """A "released" model: transformers' LlamaForCausalLM with its own random initialization,
    saved by save_pretrained, with the build's tokenizer (no BOS, as the build's documents)."""
    folder = tmp_path_factory.mktemp("released")
    torch.manual_seed(3)
    model = LlamaForCausalLM(transformers.LlamaConfig(**hf_config(ARCHITECTURE, torch.float32))).eval()
    model.save_pretrained(folder)
    save_tokenizer(tokenizer_model, folder, ARCHITECTURE, bos=False)
    return folder, model


def upload_folder(folder: Path, uri: str) -> str:
    store = open_store(uri)
    for path in folder.iterdir():
        store.put_file(path.name, path)
    return uri


@pytest.fixture(scope="module")
def runs(dataset, released, s3_bucket_uri, tmp_path_factory) -> dict[str, TrainConfig]:
    tmp = tmp_path_factory.mktemp("runs")
    output = f"{s3_bucket_uri}/out-{uuid.uuid4().hex[:8]}"
    folder, _ = released
    on_s3 = upload_folder(folder, f"{s3_bucket_uri}/released-{uuid.uuid4().hex[:8]}")
    fsdp = train_config("fsdp", output, dataset, tmp, init_from=on_s3, data_parallel="fsdp",
                        max_steps_this_run=STEPS // 2)
    run_training(fsdp, 2)
    store = open_store(on_s3)
    for key in list(store.list()):
        store.delete(key)  # a resume must not need the folder it started from
    resumed = prepare_config(fsdp.model_copy(update={"max_steps_this_run": None}))  # not checked again
    run_training(resumed, 1)

    ddp = train_config("ddp", output, dataset, tmp, init_from=str(folder), max_steps_this_run=1)
    run_training(ddp, 1)
    return {"fsdp": fsdp, "ddp": ddp}


def step_blocks(config: TrainConfig, step: int, cache_dir: Path) -> torch.Tensor:
    """All ranks' blocks of optimizer step `step` (1-based): the block at a global position is the
    same on any world size, so one loader on 1 rank reads them in order."""
    per_step = config.global_batch_tokens // config.seq_len
    with BlockLoader(config.data, config.seq_len, config.seed, cache_dir=cache_dir) as loader:
        for _ in range(step):
            blocks = loader.next_batch(per_step)
    return blocks


@pytest.mark.parametrize("run", ["fsdp", "ddp"])
def test_first_step_loss_is_transformers_loss_of_the_released_weights(runs, released, run, tmp_path):
    config = runs[run]
    _, model = released
    blocks = step_blocks(config, 1, tmp_path)
    with torch.no_grad():
        expected = model(input_ids=blocks, labels=blocks).loss.item()  # transformers shifts the labels itself
    first = metrics(config.run_uri)[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_resume_continues_from_the_checkpoint_without_the_init_from_folder(runs, tmp_path):
    config = runs["fsdp"]
    records = metrics(config.run_uri)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # Step 3's loss is that of the step-2 checkpoint's weights on step 3's blocks.
    model, _ = load_model(f"{config.run_uri}/{RunLayout.checkpoint(STEPS // 2)}")
    blocks = step_blocks(config, STEPS // 2 + 1, tmp_path)
    with torch.no_grad():
        _, loss = model(blocks[:, :-1], blocks[:, 1:], return_logits=False)
    assert records[STEPS // 2]["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_a_mismatching_folder_is_refused_before_training_starts(dataset, released, tmp_path):
    folder = Path(shutil.copytree(released[0], tmp_path / "released"))
    config = train_config("mismatch", str(tmp_path / "out"), dataset, tmp_path, init_from=str(folder))
    assert prepare_config(config).init_from == str(folder)  # the matching folder passes

    def refusal() -> str:
        with pytest.raises(ValueError) as error:
            prepare_config(config)
        message = str(error.value)
        assert message.startswith(f"init_from {folder}: ") and "\n" not in message
        return message

    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 3, "vocab_size": 600}))
    assert "differs from the run's model: vocab_size 600 (the run's: 512), n_layers 3 (the run's: 2)" in refusal()
    (folder / "config.json").write_text(json.dumps({**hf, "max_position_embeddings": 4096}))
    assert prepare_config(config)  # the context length is the run's to choose

    tokenizer = (folder / "tokenizer.model").read_bytes()
    (folder / "tokenizer.model").write_bytes(train_sentencepiece_model(vocab_size=300))
    message = refusal()
    assert "its tokenizer.model (sha256 " in message and "is not the datasets' tokenizer" in message
    (folder / "tokenizer.model").write_bytes(tokenizer)

    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "add_bos_token": True}))
    assert "its tokenizer adds BOS before each text, but the training data's documents do not start" in refusal()
    # The training program refuses it too, when started without the flow's check.
    result = launch_training(config, 1)
    assert result.returncode == 1
    assert "training failed on its input: ValueError: init_from" in result.stdout + result.stderr
    (folder / "tokenizer_config.json").unlink()  # Llama's releases: BOS without saying so
    assert "its tokenizer adds BOS" in refusal()

    (folder / "config.json").unlink()
    assert "no config.json, so not a Hugging Face model folder" in refusal()


@pytest.mark.slow
def test_weights_holding_pickled_code_fail_tinyllama_train_in_one_line_without_a_retry(
    dataset, released, prefect_server, tmp_path
):
    """The folder passes the launcher's checks (config, tokenizer); its weights are refused when
    rank 0 reads them, as they would be on every retry."""
    folder = Path(shutil.copytree(released[0], tmp_path / "released"))
    (folder / "model.safetensors").unlink()
    torch.save({"model.norm.weight": torch.ones(2), "hook": NotATensor()}, folder / "pytorch_model.bin")
    config = train_config("pickled-weights", str(tmp_path / "out"), dataset, tmp_path, init_from=str(folder))

    result = tinyllama_train(config, prefect_server, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result) == [
        f"error: training failed on its input: ValueError: {folder}/pytorch_model.bin: refused to load: not only "
        "tensors (Unsupported global: GLOBAL eval was not an allowed global by default.)"
    ]
    (task,) = failed_train_task_runs("train-pickled-weights")
    assert task.run_count == 1
    for log in (result.stdout, result.stderr, flow_run_logs("train-pickled-weights")):
        assert not WEIGHTS_ONLY_ADVICE.search(log)


def test_init_from_is_a_config_key_like_the_other_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = train_config("keys", "out", "m.json", tmp_path, init_from="released")
    assert config.with_absolute_paths().init_from == str(tmp_path / "released")
    with pytest.raises(ValueError, match="store URIs must not hold credentials"):
        train_config("keys", "out", "m.json", tmp_path, init_from="s3://key:secret@bucket/released")
    with pytest.raises(ValueError, match="init_from"):
        train_config("keys", "out", "m.json", tmp_path, init_from="")
