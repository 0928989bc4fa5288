"""The training program under torchrun with 2 gloo processes, on a synthetic build in real S3.

One module fixture runs the jobs once (each launch costs seconds of start-up); the tests
then check what they left on the store:
- straight: 4 steps on 2 ranks;
- segmented: 2 steps on 2 ranks (max_steps_this_run, async checkpoints), crash leftovers
  planted, 2 more;
- resized: 2 steps on 1 rank (DDP), then 2 more on 2 ranks (FSDP2, as on GPUs): 1 -> 2;
- shrunk: straight's step-2 checkpoint (2 ranks) resumed on 1 rank: 2 -> 1.
"""

from __future__ import annotations

import math
import uuid

import pytest
import torch

from model.checkpoint import complete_checkpoints, load_model, read_metadata
from model.export import export_hf
from model.hf import load_hf
from model.config import LlamaConfig
from model.llama import Llama
from model.train import learning_rate, materialize
from model.train_config import LRSchedule, TrainConfig
from storage.run_layout import RunLayout
from storage.store import join_key, open_store
from tests.model.runs import (
    STEPS, metrics, run_training, short_documents_build, train_config, train_sentencepiece_model, train_state, with_tokenizer,
)


@pytest.fixture(scope="module")
def sentencepiece_model() -> bytes:
    return train_sentencepiece_model()


@pytest.fixture(scope="module")
def dataset(s3_bucket_uri, sentencepiece_model) -> str:
    """A synthetic build on S3 whose tokenizer file is a real SentencePiece model (for export)."""
    return with_tokenizer(short_documents_build(f"{s3_bucket_uri}/train-{uuid.uuid4().hex[:8]}"), sentencepiece_model)


@pytest.fixture(scope="module")
def runs(dataset, s3_bucket_uri, tmp_path_factory) -> dict[str, str]:
    """Run the jobs; returns the run URIs by name."""
    tmp = tmp_path_factory.mktemp("train")
    output = f"{s3_bucket_uri}/out-{uuid.uuid4().hex[:8]}"
    straight = train_config("straight", output, dataset, tmp)
    run_training(straight, 2)

    segmented = train_config("segmented", output, dataset, tmp, max_steps_this_run=STEPS // 2, keep_checkpoints=1,
                             async_checkpoint=True)
    run_training(segmented, 2)
    plant_crash_leftovers(segmented.run_uri, STEPS // 2)
    run_training(segmented, 2)

    resized = train_config("resized", output, dataset, tmp, max_steps_this_run=STEPS // 2)
    run_training(resized, 1)
    # The GPU layout on CPUs: FSDP2 shards load the 1-rank DDP checkpoint.
    run_training(resized.model_copy(update={"data_parallel": "fsdp"}), 2)

    shrunk = train_config("shrunk", output, dataset, tmp)
    copy_checkpoint(straight.run_uri, shrunk.run_uri, STEPS // 2)
    run_training(shrunk, 1)
    return {"straight": straight.run_uri, "segmented": segmented.run_uri, "resized": resized.run_uri,
            "shrunk": shrunk.run_uri}


def copy_checkpoint(from_run: str, to_run: str, step: int) -> None:
    source, dest = open_store(from_run), open_store(to_run)
    for key in source.list(RunLayout.checkpoint(step) + "/"):
        dest.put_bytes(key, source.get_bytes(key))


def plant_crash_leftovers(run_uri: str, step: int) -> None:
    """What a job killed after step+1 but mid-save leaves: a checkpoint without COMMIT, the metrics
    and TensorBoard segments uploaded before it."""
    store = open_store(run_uri)
    store.put_bytes(join_key(RunLayout.checkpoint(step + 1), "__0_0.distcp"), b"half written")
    store.put_text(RunLayout.metrics_segment(step + 1, step + 1), '{"step": %d, "loss": 99.0}\n' % (step + 1))
    store.put_bytes(RunLayout.tensorboard_segment(step + 1, step + 1), b"events of a lost step")


def test_resume_is_bit_exact(runs):
    straight, segmented = metrics(runs["straight"]), metrics(runs["segmented"])
    assert [r["step"] for r in segmented] == list(range(1, STEPS + 1))  # no duplicate, no planted line
    layout = RunLayout.at(runs["segmented"])
    segments = [(s.first, s.last) for s in layout.metrics_segments()[0]]
    assert segments == [(1, 2), (3, 4)] == [(s.first, s.last) for s in layout.tensorboard_segments()]
    assert [r["loss"] for r in segmented] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in segmented] == [r["grad_norm"] for r in straight]
    straight_model, _ = load_model(runs["straight"])
    segmented_model, _ = load_model(runs["segmented"])
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(tensor, segmented_model.state_dict()[name]), name


def test_uncommitted_checkpoint_is_ignored_and_keep_last_k_prunes(runs):
    # The planted step-3 folder had no COMMIT: the resume came from step 2, and once step 4
    # was committed, keep_checkpoints=1 removed both.
    store = open_store(runs["segmented"])
    assert [c.step for c in complete_checkpoints(store)] == [STEPS]
    assert not list(store.list(RunLayout.checkpoint(STEPS // 2 + 1) + "/"))
    assert [c.step for c in complete_checkpoints(open_store(runs["straight"]))] == [4, 2]


def test_resume_on_more_ranks_and_fsdp_continues_the_same_token_sequence(runs):
    straight, resized = train_state(runs["straight"]), train_state(runs["resized"])
    assert resized["world_size"] == 2 and straight["world_size"] == 2
    assert resized["loader"] == straight["loader"]
    assert resized["tokens_seen"] == straight["tokens_seen"] == STEPS * 512
    # Same blocks in every step; only the summation order differs (1 rank; FSDP's reduce-scatter).
    assert [r["loss"] for r in metrics(runs["resized"])] == pytest.approx(
        [r["loss"] for r in metrics(runs["straight"])], rel=1e-5
    )


def test_resume_on_fewer_ranks_continues_within_float_tolerance(runs):
    assert train_state(runs["shrunk"])["loader"] == train_state(runs["straight"])["loader"]
    assert [r["step"] for r in metrics(runs["shrunk"])] == [3, 4]
    assert [r["loss"] for r in metrics(runs["shrunk"])] == pytest.approx(
        [r["loss"] for r in metrics(runs["straight"])][2:], rel=1e-5
    )


def test_fsdp_ranks_write_their_own_shards(runs):
    store = open_store(runs["resized"])
    newest = complete_checkpoints(store)[0]  # written by 2 FSDP2 ranks
    metadata = read_metadata(store, newest)
    matrices = [fqn for fqn, meta in metadata.state_dict_metadata.items()
                if fqn.startswith("model.") and len(getattr(meta, "size", ())) == 2]
    assert matrices
    files_by_tensor = {fqn: set() for fqn in matrices}
    for index, info in metadata.storage_data.items():
        if index.fqn in files_by_tensor:
            files_by_tensor[index.fqn].add(info.relative_path)
    assert all(files == {"__0_0.distcp", "__1_0.distcp"} for files in files_by_tensor.values()), files_by_tensor
    assert {f.key for f in newest.files} == {".metadata", "__0_0.distcp", "__1_0.distcp",
                                             "__0_optimizer_0.distcp", "__1_optimizer_0.distcp"}


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_meta_device_construction_gives_the_eager_initial_weights(activation_checkpointing):
    config = LlamaConfig.preset("tiny", n_layers=2, vocab_size=300)
    torch.manual_seed(11)
    eager = Llama(config, activation_checkpointing=activation_checkpointing)
    with torch.device("meta"):
        lazy = Llama(config, activation_checkpointing=activation_checkpointing)
    torch.manual_seed(0)  # the global generator is not what materialize draws from
    materialize(lazy, torch.device("cpu"), seed=11)
    for name, tensor in eager.state_dict().items():
        assert torch.equal(tensor, lazy.state_dict()[name]), name
    assert torch.equal(eager.rope_cos, lazy.rope_cos)


def _materialize_sharded(rank: int, world_size: int, init_file: str, out: str) -> None:
    """One rank of test_meta_device_construction_shards...: FSDP2 on meta, then materialize."""
    import torch.distributed as dist

    from model.train import Cluster, build_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        with torch.device("meta"):
            model = Llama(LlamaConfig.preset("tiny", n_layers=2, vocab_size=301))  # 301: uneven shards
        build_model(model, Cluster(rank, world_size, torch.device("cpu")), fsdp=True, bf16=False, compile=False, seed=11)
        local_bytes = sum(p.to_local().numel() for p in model.parameters())
        full = {name: p.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save({"full": full, "local": local_bytes}, out)
    finally:
        dist.destroy_process_group()


def test_meta_device_construction_shards_then_initializes_each_shard_as_the_eager_model(tmp_path):
    torch.multiprocessing.spawn(
        _materialize_sharded, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True
    )
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.manual_seed(11)
    eager = Llama(LlamaConfig.preset("tiny", n_layers=2, vocab_size=301))
    assert result["local"] < eager.num_params()  # rank 0 held only its shards
    for name, tensor in eager.named_parameters():
        assert torch.equal(tensor.detach(), result["full"][name]), name


def test_metrics_tensorboard_and_plot_reach_the_store(runs):
    store = open_store(runs["straight"])
    records = metrics(runs["straight"])
    for record in records:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "mfu"} <= record.keys()
        assert record["mfu"] is None  # no GPU peak to compare with
    assert [r["tokens"] for r in records] == [512 * s for s in range(1, STEPS + 1)]
    assert store.get_bytes("plots/loss.png").startswith(b"\x89PNG")
    assert any(key.startswith("tensorboard/events.out.tfevents") for key in store.list("tensorboard/"))


def test_export_hf_writes_the_checkpoint_and_the_builds_tokenizer(runs, dataset, sentencepiece_model, tmp_path):
    out = export_hf(runs["straight"], tmp_path / "hf")
    assert (out / "tokenizer.model").read_bytes() == sentencepiece_model
    exported = load_hf(out)
    trained, config = load_model(f"{runs['straight']}/{RunLayout.checkpoint(STEPS)}")
    assert config.name == "straight"
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, exported.state_dict()[name]), name


def test_learning_rate_warms_up_then_follows_a_cosine_to_min():
    schedule = LRSchedule(max=1.0, min=0.1, warmup_steps=4)
    lrs = [learning_rate(step, schedule, max_steps=20) for step in range(25)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[20:] == [0.1] * 5


def test_config_errors_are_explicit(tmp_path):
    with pytest.raises(ValueError, match="global_batch_tokens 500 is not a multiple of micro_batch 4 x seq_len 32"):
        train_config("bad", "out", "m.json", tmp_path, global_batch_tokens=500)
    with pytest.raises(ValueError, match="seq_len 512 exceeds model 'tiny'"):
        train_config("bad", "out", "m.json", tmp_path, seq_len=512, global_batch_tokens=4096)
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        train_config("bad", "out", "m.json", tmp_path, model="huge")
    with pytest.raises(ValueError, match="run name"):
        train_config("../escape", "out", "m.json", tmp_path)
    config = train_config("ok", "out", "m.json", tmp_path)
    assert config.accum_steps(1) == 4 and config.accum_steps(2) == 2
    with pytest.raises(ValueError, match="world size 3"):
        config.accum_steps(3)
    (tmp_path / "m.json").touch()  # a relative input is read from the config's folder and must be there
    (tmp_path / "run.yaml").write_text(
        "name: y\noutput: out\nmodel: tiny\ndata: [{manifest: m.json, weight: 1.0}]\nseq_len: 64\n"
        "global_batch_tokens: 1024\nmicro_batch: 8\nlr: {max: 4.0e-4, min: 4.0e-5, warmup_steps: 2}\n"
        "max_steps: 4\ncheckpoint_every: 2\nlauncher: {kind: ray, workers: 2, gpus_per_worker: 0}\n"
    )
    loaded = TrainConfig.from_yaml(tmp_path / "run.yaml")
    assert loaded.launcher.world_size == 2 and loaded.run_uri == f"file://{tmp_path}/out/runs/y"
