"""What reading a checkpoint's model costs (export-hf and evaluate: model/checkpoint/safe_load.py load_model),
on SeaweedFS: only the files that hold the model's tensors are fetched, one whole-file GET each,
and verified; the optimizer's files are neither read nor hashed. A run's initial weights: a fresh
run's are the eager model's, bit for bit, and a loaded model is never initialized first.

Checkpoints are written by 2 gloo ranks under FSDP2 (as on GPUs: each rank its own shards), for
two model sizes, so a cost that grew with the number of tensors would show.
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from model.checkpoint import (
    CheckpointError, Checkpointer, RNGState, commit_checkpoint, latest_checkpoint, load_model, read_metadata,
)
from model.llama import Llama
from model.train import Cluster, TrainProgress, build_model, build_optimizer, build_scheduler, training_states
from storage.manifest import ObjectInfo
from storage.run_layout import RunLayout
from storage.store import open_store
from tests.model.runs import train_config

WORLD_SIZE = 2
LAYERS = (1, 4)  # two model sizes: 11 and 38 tensors


def config_of(run_uri: str, n_layers: int, work_dir: Path):
    output, name = run_uri.rsplit("/runs/", 1)
    return train_config(name, output, "unused.json", work_dir, model_overrides={"n_layers": n_layers}, vocab_size=300)


def train_and_save(rank: int, init_file: str, run_uri: str, n_layers: int, work_dir: str) -> None:
    """One rank: a new run's model (allocated, then initialized), one AdamW step, a checkpoint of
    step 1; rank 0 keeps the full initial and trained weights beside the run for the test."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        config = config_of(run_uri, n_layers, Path(work_dir))
        with torch.device("meta"):
            raw = Llama(config.llama_config())
        model = build_model(raw, Cluster(rank, WORLD_SIZE, torch.device("cpu")), fsdp=True, bf16=False,
                            compile=False, seed=None)
        optimizer = build_optimizer(model, config, torch.device("cpu"))
        raw.init_weights(config.seed)  # after the optimizer, as a new run of model/train.py does
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        initial = get_model_state_dict(model, options=full)
        scheduler, progress = build_scheduler(optimizer, config), TrainProgress(world_size=WORLD_SIZE)
        torch.manual_seed(rank)
        tokens = torch.randint(0, raw.config.vocab_size, (2, 17))
        model(tokens[:, :-1], tokens[:, 1:], return_logits=False)[1].backward()
        optimizer.step()
        scheduler.step()
        progress.step = 1
        layout = RunLayout(open_store(run_uri))
        states = training_states(model, optimizer, scheduler, {"position": 0}, progress, raw.config, RNGState(rank))
        checkpointer = Checkpointer(layout, states, keep=None, staging_dir=Path(work_dir) / f"staging-{rank}")
        checkpointer.save(1)
        checkpointer.close()
        trained = get_model_state_dict(model, options=full)
        if rank == 0:
            layout.write_config(config.to_json())
            torch.save({"initial": initial, "trained": trained}, Path(work_dir) / "weights.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(s3_bucket_uri, tmp_path_factory) -> dict[int, tuple[str, dict]]:
    """n_layers -> (run URI on S3, {"initial", "trained"} full weights)."""
    found = {}
    for n_layers in LAYERS:
        work_dir = tmp_path_factory.mktemp(f"reads-{n_layers}")
        run_uri = f"{s3_bucket_uri}/reads-{uuid.uuid4().hex[:8]}/runs/layers-{n_layers}"
        torch.multiprocessing.spawn(train_and_save, args=(str(work_dir / "init"), run_uri, n_layers, str(work_dir)),
                                    nprocs=WORLD_SIZE, join=True)
        found[n_layers] = run_uri, torch.load(work_dir / "weights.pt", weights_only=True)
    return found


class GetCounter:
    """Every GetObject this process's S3 client sends: (key, Range or None), by botocore's event hooks."""

    def __init__(self):
        from storage.s3 import s3_client

        self.gets: list[tuple[str, str | None]] = []
        self.events = s3_client().meta.events
        self.events.register("provide-client-params.s3.GetObject", self, unique_id="test-checkpoint-reads")

    def __call__(self, params, **_):
        self.gets.append((params["Key"], params.get("Range")))

    def close(self) -> None:
        self.events.unregister("provide-client-params.s3.GetObject", unique_id="test-checkpoint-reads")

    def in_folder(self, folder: str) -> Counter[str]:
        """GETs per file name of a checkpoint folder."""
        return Counter(key.rsplit("/", 1)[1] for key, _ in self.gets if f"/{folder}/" in key)


def load_counting(run_uri: str) -> tuple[Llama, GetCounter]:
    counter = GetCounter()
    try:
        model, _ = load_model(run_uri)
    finally:
        counter.close()
    return model, counter


def assert_weights(model: Llama, expected: dict[str, torch.Tensor]) -> None:
    assert model.state_dict().keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_reading_the_model_fetches_only_its_files_whole_and_the_same_requests_at_any_size(runs):
    gets = {}
    for n_layers, (run_uri, weights) in runs.items():
        model, counter = load_counting(run_uri)
        assert_weights(model, weights["trained"])
        gets[n_layers] = counter.in_folder(RunLayout.checkpoint(1))
        checkpoint = latest_checkpoint(open_store(run_uri))
        chunks = [i for i in read_metadata(open_store(run_uri), checkpoint).storage_data if i.fqn.startswith("model.")]
        assert len(chunks) > sum(gets[n_layers].values())  # fewer requests than tensor chunks
        whole = Counter(key.rsplit("/", 1)[1] for key, byte_range in counter.gets if byte_range is None and ".distcp" in key)
        assert whole == {"__0_0.distcp": 1, "__1_0.distcp": 1}, counter.gets
    # The files of the 2 model shards; COMMIT, .metadata and the architecture value (a range of one of them).
    assert gets[1] == gets[4] and sum(gets[4].values()) == WORLD_SIZE + 3, gets
    assert not any("optimizer" in name for found in gets.values() for name in found)


def flip_a_bit(store, key: str) -> bytes:
    original = store.get_bytes(key)
    corrupt = bytearray(original)
    corrupt[len(corrupt) // 2] ^= 0x01
    store.put_bytes(key, bytes(corrupt))
    return original


def test_a_corrupt_optimizer_file_does_not_stop_the_export_and_a_corrupt_model_file_does(runs):
    run_uri, weights = runs[1]
    store = open_store(run_uri)
    checkpoint = latest_checkpoint(store)
    optimizer_key, model_key = checkpoint.key("__1_optimizer_0.distcp"), checkpoint.key("__1_0.distcp")
    original = flip_a_bit(store, optimizer_key)
    try:
        model, counter = load_counting(run_uri)  # neither read nor hashed: its sha256 is never compared
        assert_weights(model, weights["trained"])
        assert "__1_optimizer_0.distcp" not in counter.in_folder(RunLayout.checkpoint(1))
    finally:
        store.put_bytes(optimizer_key, original)

    original = flip_a_bit(store, model_key)
    try:
        with pytest.raises(CheckpointError) as refused:
            load_model(run_uri)
    finally:
        store.put_bytes(model_key, original)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"corrupt checkpoint {store.url(checkpoint.prefix)}: {store.url(model_key)}: sha256 ")
    assert message.endswith(f"its COMMIT lists {next(f.sha256 for f in checkpoint.files if f.key == '__1_0.distcp')}")


def test_a_new_run_allocated_then_initialized_has_the_eager_initial_weights(runs):
    """FSDP2 shards of a model built on meta, allocated, then `init_weights(seed)`: the eager model."""
    run_uri, weights = runs[4]
    config = config_of(run_uri, 4, Path("unused"))
    torch.manual_seed(config.seed)
    eager = Llama(config.llama_config())
    assert_weights(eager, weights["initial"])


def test_a_checkpoint_of_the_earlier_one_file_per_rank_layout_loads_its_model(s3_bucket_uri, tmp_path):
    """Files that mix the model with the optimizer (checkpoints written before the optimizer had files
    of its own) are read whole, hashed, and only the model's chunks kept."""
    run_uri = f"{s3_bucket_uri}/reads-{uuid.uuid4().hex[:8]}/runs/mixed"
    config = config_of(run_uri, 1, tmp_path)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(3)
        model = Llama(config.llama_config())
        optimizer = build_optimizer(model, config, torch.device("cpu"))
        model(torch.randint(0, 300, (1, 9)), torch.randint(0, 300, (1, 9)), return_logits=False)[1].backward()
        optimizer.step()
        states = training_states(model, optimizer, build_scheduler(optimizer, config), {"position": 0},
                                 TrainProgress(step=1), model.config, RNGState(0))
        dcp.save(states, storage_writer=FileSystemWriter(tmp_path / "step"))
    finally:
        dist.destroy_process_group()
    layout = RunLayout(open_store(run_uri))
    assert sorted(p.name for p in (tmp_path / "step").iterdir()) == [".metadata", "__0_0.distcp"]
    for path in (tmp_path / "step").iterdir():
        layout.store.put_file(f"{RunLayout.checkpoint(1)}/{path.name}", path)
    commit_checkpoint(layout.store, 1, [ObjectInfo.of_file(p.name, p) for p in (tmp_path / "step").iterdir()])
    layout.write_config(config.to_json())
    loaded, counter = load_counting(run_uri)
    assert_weights(loaded, model.state_dict())
    assert counter.in_folder(RunLayout.checkpoint(1)) == {"__0_0.distcp": 2, ".metadata": 1, "COMMIT": 1}


def test_a_resume_merges_the_ranges_it_reads_of_a_file_into_one_get_at_any_size(runs, tmp_path):
    """A resume on 1 rank of the 2 ranks' checkpoint (resharded): each file is hashed (a whole GET)
    then read in one ranged GET of the ranges this rank wants, as many GETs for 11 tensors as for 38."""
    gets = {}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for n_layers, (run_uri, weights) in runs.items():
            config = config_of(run_uri, n_layers, tmp_path)
            model = Llama(config.llama_config())
            optimizer = build_optimizer(model, config, torch.device("cpu"))
            progress = TrainProgress()
            states = training_states(model, optimizer, build_scheduler(optimizer, config), {"position": 5}, progress,
                                     model.config, RNGState(0))
            checkpointer = Checkpointer(RunLayout(open_store(run_uri)), states, keep=None, staging_dir=tmp_path)
            counter = GetCounter()
            try:
                assert checkpointer.load() == 1
            finally:
                counter.close()
                checkpointer.close()
            assert_weights(model, weights["trained"])
            assert progress.step == 1 and states["loader"] == {"position": 0}
            assert len(optimizer.state) == len(list(model.parameters()))  # AdamW's moments, resharded
            gets[n_layers] = counter.in_folder(RunLayout.checkpoint(1))
            ranged = Counter(key.rsplit("/", 1)[1] for key, byte_range in counter.gets if byte_range and ".distcp" in key)
            assert set(ranged.values()) == {1}, counter.gets  # one span per file
    finally:
        dist.destroy_process_group()
    assert gets[1] == gets[4], gets
