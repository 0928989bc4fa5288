"""Checkpoints on the store (a local folder and S3): commit markers, keep-last-k, weights_only
loading, and the Checkpointer's round trip of Stateful components in one gloo process."""

from __future__ import annotations

import io
import json
import pickle
import random
from collections import Counter

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from model.checkpoint import (
    LEGACY_MODEL_FILE,
    METADATA_FILE,
    CheckpointError,
    Checkpointer,
    ModelState,
    OptimizerState,
    RNGState,
    CorruptCheckpoint,
    commit_checkpoint,
    committed_checkpoints,
    complete_checkpoints,
    latest_checkpoint,
    load_model,
    load_value,
    prune_checkpoints,
    read_metadata,
    read_values,
    rng_state,
    set_rng_state,
)
from model.llama import Llama
from model.train import TrainProgress
from model.train_config import TrainConfig
from storage.manifest import ObjectInfo, sha256_bytes
from storage.run_layout import COMMIT, RunLayout
from storage.store import join_key, open_store
from tests.model.runs import NotATensor, train_config


def put_files(store, step: int, names=("__0_0.distcp", METADATA_FILE)) -> list[ObjectInfo]:
    """Files of a checkpoint folder as a save leaves them before its COMMIT."""
    infos = []
    for name in names:
        data = f"{name} of step {step}".encode()
        store.put_bytes(join_key(RunLayout.checkpoint(step), name), data)
        infos.append(ObjectInfo(key=name, size=len(data), sha256="0" * 64))
    return infos


def test_commit_marker_lists_every_file(store):
    checkpoint = commit_checkpoint(store, 7, put_files(store, 7))
    assert checkpoint.prefix == "checkpoints/step-0000007"
    marker = json.loads(store.get_text(join_key(checkpoint.prefix, COMMIT)))
    assert marker["step"] == 7
    assert sorted(f["key"] for f in marker["files"]) == [METADATA_FILE, "__0_0.distcp"]
    assert latest_checkpoint(store).step == 7


def test_checkpoints_without_commit_or_with_missing_files_are_ignored(store):
    commit_checkpoint(store, 1, put_files(store, 1))
    put_files(store, 2)  # a crash mid-save: files, no COMMIT
    commit_checkpoint(store, 3, put_files(store, 3))
    store.put_bytes(join_key(RunLayout.checkpoint(3), "__0_0.distcp"), b"short")  # truncated later
    commit_checkpoint(store, 4, put_files(store, 4))
    store.delete(join_key(RunLayout.checkpoint(4), METADATA_FILE))  # deleted later

    assert [c.step for c in complete_checkpoints(store)] == [1]
    assert latest_checkpoint(store).step == 1


def test_keep_last_k_deletes_older_and_stale_checkpoints_leaving_no_empty_folders(store):
    for step in (10, 20, 30):
        commit_checkpoint(store, step, put_files(store, step))
    put_files(store, 15)  # crashed mid-save
    put_files(store, 40)  # being written now

    assert prune_checkpoints(store, keep=2) == [10, 15]
    assert [c.step for c in complete_checkpoints(store)] == [30, 20]
    assert not list(store.list(RunLayout.checkpoint(10) + "/"))
    assert RunLayout(store).checkpoint_steps() == [20, 30, 40]  # newer than any commit: untouched
    if (root := store.local_path("checkpoints")) is not None:
        assert sorted(p.name for p in root.iterdir()) == ["step-0000020", "step-0000030", "step-0000040"]
    assert prune_checkpoints(store, keep=None) == []


def test_a_prune_keeps_the_newest_keep_steps_unread_and_deletes_a_leftover_once_older(store):
    for step in (10, 20):
        commit_checkpoint(store, step, put_files(store, step))
    put_files(store, 25)  # crashed mid-save, then the run resumed from 20
    commit_checkpoint(store, 30, put_files(store, 30))

    assert prune_checkpoints(store, keep=2, newest=30) == [10, 20]  # 25 takes a place, unread
    commit_checkpoint(store, 40, put_files(store, 40))
    assert prune_checkpoints(store, keep=2, newest=40) == [25]
    assert RunLayout(store).checkpoint_steps() == [30, 40] and not list(store.list(RunLayout.checkpoint(25) + "/"))


def test_values_load_weights_only():
    buffer = io.BytesIO()
    torch.save({"state": {}, "hook": NotATensor()}, buffer)
    with pytest.raises(CheckpointError, match="refused to load") as refused:
        load_value(buffer.getvalue(), "optimizer.param_groups.0.lr")
    # One line with torch's reason, never its advice to load with weights_only=False.
    assert str(refused.value) == (
        "optimizer.param_groups.0.lr: refused to load: it holds pickled objects other than tensors and plain "
        "containers (Unsupported global: GLOBAL eval was not an allowed global by default.)"
    )
    buffer = io.BytesIO()
    torch.save({"exp_avg": torch.ones(2), "betas": (0.9, 0.95)}, buffer)
    assert torch.equal(load_value(buffer.getvalue(), "x")["exp_avg"], torch.ones(2))


@pytest.fixture
def lone_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def components(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, TrainProgress, dict]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    progress = TrainProgress(world_size=1)
    states = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer), "scheduler": scheduler,
              "progress": progress, "rng": RNGState(0)}
    return model, optimizer, progress, states


def train_one_step(model, optimizer, states, progress) -> None:
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    states["scheduler"].step()
    progress.step += 1
    progress.tokens_seen += 10


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_checkpointer_round_trips_every_component(store, tmp_path, lone_process_group, async_save):
    model, optimizer, progress, states = components(0)
    checkpointer = Checkpointer(RunLayout(store), states, keep=1, staging_dir=tmp_path / "staging", async_save=async_save)
    for _ in range(2):
        train_one_step(model, optimizer, states, progress)
        checkpointer.save(progress.step)
    checkpointer.close()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    expected_draw = torch.rand(3)  # the RNG state saved at step 2 is the one before this draw

    fresh, fresh_optimizer, fresh_progress, fresh_states = components(1)
    restored = Checkpointer(RunLayout(store), fresh_states, keep=1, staging_dir=tmp_path / "staging2")
    assert restored.load() == 2
    assert (fresh_progress.step, fresh_progress.tokens_seen) == (2, 20)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert fresh_states["scheduler"].get_last_lr() == states["scheduler"].get_last_lr() == [0.1 * 0.25]
    assert torch.equal(fresh_optimizer.state[fresh.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_draw)
    assert [c.step for c in complete_checkpoints(store)] == [2]  # keep=1 pruned step 1
    assert read_values(store, complete_checkpoints(store)[0], "progress") == {"step": 2, "tokens_seen": 20, "world_size": 1}
    assert not list((tmp_path / "staging").rglob("*.distcp"))  # staged files removed once uploaded


def test_restore_skips_a_corrupt_newest_checkpoint(store, tmp_path, lone_process_group):
    model, optimizer, progress, states = components(0)
    checkpointer = Checkpointer(RunLayout(store), states, keep=None, staging_dir=tmp_path / "staging")
    saved = {}
    for step in (1, 2):
        train_one_step(model, optimizer, states, progress)
        checkpointer.save(step)
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    key = join_key(RunLayout.checkpoint(2), "__0_0.distcp")
    data = bytearray(store.get_bytes(key))
    data[-1] ^= 0xFF  # flip a bit, keep the size
    store.put_bytes(key, bytes(data))

    fresh, _, fresh_progress, fresh_states = components(1)
    assert Checkpointer(RunLayout(store), fresh_states, keep=None, staging_dir=tmp_path / "s").load() == 1
    assert fresh_progress.step == 1
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved[1].items())


def all_bytes(store) -> dict[str, bytes]:
    return {key: store.get_bytes(key) for key in store.list()}


def flip_a_bit(store, step: int, name: str = "__0_0.distcp") -> tuple[str, str]:
    """Corrupt a committed file, keeping its size; returns its sha256 before and after."""
    key = join_key(RunLayout.checkpoint(step), name)
    data = bytearray(store.get_bytes(key))
    before = sha256_bytes(bytes(data))
    data[len(data) // 2] ^= 0x01
    store.put_bytes(key, bytes(data))
    return before, sha256_bytes(bytes(data))


def set_aside_folders(store) -> dict[str, dict[str, bytes]]:
    """Folder name -> {file name: bytes} of every checkpoint folder set aside as corrupt."""
    found: dict[str, dict[str, bytes]] = {}
    for key in store.list("checkpoints/"):
        _, folder, name = key.split("/", 2)
        if ".corrupt-" in folder:
            found.setdefault(folder, {})[name] = store.get_bytes(key)
    return found


def test_a_corrupt_newest_checkpoint_is_reported_and_set_aside_unchanged_and_the_previous_one_resumes(
    store, tmp_path, lone_process_group, caplog
):
    model, optimizer, progress, states = components(0)
    checkpointer = Checkpointer(RunLayout(store), states, keep=2, staging_dir=tmp_path / "staging")
    saved = {}
    for step in (1, 2):
        train_one_step(model, optimizer, states, progress)
        checkpointer.save(step)
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    expected, actual = flip_a_bit(store, 2)
    corrupt_files = {key.rsplit("/", 1)[1]: data for key, data in all_bytes(store).items() if "step-0000002/" in key}

    fresh, fresh_optimizer, fresh_progress, fresh_states = components(1)
    resumed = Checkpointer(RunLayout(store), fresh_states, keep=1, staging_dir=tmp_path / "s")
    assert resumed.load() == 1
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved[1].items())
    file = store.url(join_key(RunLayout.checkpoint(2), "__0_0.distcp"))
    assert f"checkpoint {store.url(RunLayout.checkpoint(2))} is corrupt: {file}: sha256 {actual}, its COMMIT lists {expected}" in caplog.text
    (folder,) = set_aside_folders(store)
    assert folder.startswith("step-0000002.corrupt-") and set_aside_folders(store)[folder] == corrupt_files
    assert f"set aside, unchanged, as {store.url('checkpoints/' + folder)}" in caplog.text

    # Training on saves step 2 again (and prunes with keep=1): the evidence stays as it was.
    train_one_step(fresh, fresh_optimizer, fresh_states, fresh_progress)
    resumed.save(2)
    assert [c.step for c in complete_checkpoints(store)] == [2]
    assert set_aside_folders(store) == {folder: corrupt_files}
    assert Checkpointer(RunLayout(store), components(2)[3], keep=1, staging_dir=tmp_path / "s2").load() == 2


def test_when_no_checkpoint_verifies_the_resume_refuses_and_changes_nothing_unless_told_to_start_over(
    store, tmp_path, lone_process_group, caplog
):
    model, optimizer, progress, states = components(0)
    checkpointer = Checkpointer(RunLayout(store), states, keep=None, staging_dir=tmp_path / "staging")
    train_one_step(model, optimizer, states, progress)
    checkpointer.save(1)
    expected, actual = flip_a_bit(store, 1)
    before = all_bytes(store)

    _, _, fresh_progress, fresh_states = components(1)
    with pytest.raises(CheckpointError) as refused:
        Checkpointer(RunLayout(store), fresh_states, keep=None, staging_dir=tmp_path / "s").load()
    file = store.url(join_key(RunLayout.checkpoint(1), "__0_0.distcp"))
    message = str(refused.value)
    assert "\n" not in message and f"{file}: sha256 {actual}, its COMMIT lists {expected}" in message
    assert "Nothing was changed" in message and "--start-over" in message
    assert all_bytes(store) == before and fresh_progress.step == 0

    restarted = Checkpointer(RunLayout(store), fresh_states, keep=None, staging_dir=tmp_path / "s")
    assert restarted.load(start_over=True) is None
    assert "starting over from step 0" in caplog.text
    (folder,) = set_aside_folders(store)
    assert set_aside_folders(store)[folder] == {k.rsplit("/", 1)[1]: v for k, v in before.items()}
    restarted.save(1)  # the step of the corrupt one: its folder is free now
    assert [c.step for c in complete_checkpoints(store)] == [1]
    assert set(set_aside_folders(store)) == {folder}


def test_a_committed_checkpoint_with_a_missing_or_short_file_is_corrupt_and_never_pruned(store):
    commit_checkpoint(store, 10, put_files(store, 10))
    commit_checkpoint(store, 20, put_files(store, 20))
    store.put_bytes(join_key(RunLayout.checkpoint(20), "__0_0.distcp"), b"short")  # truncated after its commit
    commit_checkpoint(store, 30, put_files(store, 30))

    (corrupt,) = [c for c in committed_checkpoints(store) if isinstance(c, CorruptCheckpoint)]
    file = store.url(join_key(RunLayout.checkpoint(20), "__0_0.distcp"))
    assert corrupt.step == 20 and corrupt.problem == f"{file}: 5 bytes, its COMMIT lists 23 bytes"  # "__0_0.distcp of step 20"
    assert prune_checkpoints(store, keep=1) == [10]
    assert RunLayout(store).checkpoint_steps() == [20, 30]


def test_a_save_never_deletes_a_committed_checkpoint_of_its_step(store, tmp_path, lone_process_group):
    commit_checkpoint(store, 1, put_files(store, 1))
    before = all_bytes(store)
    _, _, _, states = components(0)
    with pytest.raises(CheckpointError, match="holds a committed checkpoint this run did not resume from"):
        Checkpointer(RunLayout(store), states, keep=None, staging_dir=tmp_path).save(1)
    assert all_bytes(store) == before


class PickledHook(Stateful):
    """A component whose state holds a pickled callable: saved as a value, refused on load."""

    def state_dict(self) -> dict:
        return {"hook": NotATensor()}

    def load_state_dict(self, state: dict) -> None:
        raise AssertionError("a refused value must never reach its component")


def test_a_committed_value_pickle_with_a_foreign_global_is_refused_in_one_line(store, tmp_path, lone_process_group):
    _, _, _, states = components(0)
    Checkpointer(RunLayout(store), {**states, "extra": PickledHook()}, keep=None, staging_dir=tmp_path / "a").save(1)
    assert complete_checkpoints(store)[0].step == 1  # committed, and its sha256s verify
    with pytest.raises(CheckpointError) as refused:  # not DCP's CheckpointException with every rank's traceback
        Checkpointer(RunLayout(store), {**states, "extra": PickledHook()}, keep=None, staging_dir=tmp_path / "b").load()
    message = str(refused.value)
    assert message.startswith(f"{store.url(RunLayout.checkpoint(1))} value extra.hook: refused to load: ")
    assert "\n" not in message and "GLOBAL eval" in message and "weights_only" not in message


def test_metadata_with_a_pickled_object_is_refused(store, tmp_path, lone_process_group):
    model, optimizer, progress, states = components(0)
    Checkpointer(RunLayout(store), states, keep=None, staging_dir=tmp_path / "staging").save(1)
    checkpoint = latest_checkpoint(store)
    assert read_metadata(store, checkpoint).state_dict_metadata  # DCP's own classes load
    evil = pickle.dumps(NotATensor())
    store.put_bytes(checkpoint.key(METADATA_FILE), evil)
    with pytest.raises(CheckpointError, match=r"\.metadata: sha256 .*, its COMMIT lists"):
        read_metadata(store, checkpoint)  # checked against its COMMIT before it is unpickled
    committed = commit_checkpoint(store, 1, [f if f.key != METADATA_FILE else ObjectInfo(
        key=METADATA_FILE, size=len(evil), sha256=sha256_bytes(evil)) for f in checkpoint.files])
    with pytest.raises(CheckpointError, match="refused to load.*builtins.eval"):  # committed, as an attacker would
        read_metadata(store, committed)


def test_a_checkpoint_in_the_old_full_state_format_fails_saying_how_to_convert(store, tmp_path, lone_process_group):
    store.put_bytes(join_key(RunLayout.checkpoint(3), LEGACY_MODEL_FILE), b"weights")
    commit_checkpoint(store, 3, [ObjectInfo(key=LEGACY_MODEL_FILE, size=7, sha256="0" * 64)])
    _, _, _, states = components(0)
    with pytest.raises(CheckpointError, match="full-state format.*python -m model.convert_checkpoint"):
        Checkpointer(RunLayout(store), states, keep=None, staging_dir=tmp_path).load()


def test_rng_state_round_trips_through_weights_only_loading():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_value(buffer.getvalue(), "rng"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_no_checkpoint_means_a_fresh_start(store, tmp_path, lone_process_group):
    _, _, progress, states = components(0)
    assert Checkpointer(RunLayout(store), states, keep=None, staging_dir=tmp_path).load() is None
    assert progress.step == 0
    assert not list(store.list())


def test_run_layout_owns_the_run_folder_keys(tmp_path):
    layout = RunLayout.of(str(tmp_path), "run-1")
    assert layout.uri == f"file://{tmp_path}/runs/run-1"
    uri = layout.write_config('{"name": "run-1"}')
    assert uri == f"file://{tmp_path}/runs/run-1/config.json" and layout.read_config() == '{"name": "run-1"}'
    assert RunLayout.split_checkpoint_uri(layout.store.url(RunLayout.checkpoint(40))) == (layout.uri, 40)
    assert RunLayout.split_checkpoint_uri(layout.uri) is None


def test_run_layout_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, storage.run_layout; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)



def write_legacy_checkpoint(store, tmp_path: Path, step: int) -> tuple[dict, TrainConfig]:
    """A checkpoint as the full-state format of earlier versions wrote it (2 ranks' RNG states)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from model.train import build_optimizer

    config = train_config("legacy", "out", "m.json", tmp_path, vocab_size=300)
    llama_config = config.llama_config()
    torch.manual_seed(5)
    model = Llama(llama_config)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    model(torch.randint(0, 300, (2, 8)), torch.randint(0, 300, (2, 8)))[1].backward()
    optimizer.step()
    folder = tmp_path / "legacy"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        full = StateDictOptions(full_state_dict=True)
        torch.save(get_optimizer_state_dict(model, optimizer, options=full), folder / "optimizer.pt")
    finally:
        dist.destroy_process_group()
    torch.save({"rank-0": rng_state(), "rank-1": rng_state()}, folder / "rng.pt")
    state = {"step": step, "tokens_seen": step * 512, "loader": {"position": 64, "seed": 7, "seq_len": 32},
             "world_size": 2, "model_config": llama_config.model_dump(), "config": config.model_dump(mode="json")}
    (folder / "train_state.json").write_text(json.dumps(state))
    prefix = RunLayout.checkpoint(step)
    for path in folder.iterdir():
        store.put_file(join_key(prefix, path.name), path)
    commit_checkpoint(store, step, [ObjectInfo.of_file(p.name, p) for p in folder.iterdir()])
    RunLayout(store).write_config(config.to_json())
    return {k: v.clone() for k, v in model.state_dict().items()}, config


def test_convert_rewrites_a_full_state_checkpoint_as_a_sharded_one(store, tmp_path):
    from model.convert_checkpoint import main as convert_main

    weights, _ = write_legacy_checkpoint(store, tmp_path, step=4)
    assert convert_main([store.uri]) == 0

    checkpoint = latest_checkpoint(store)
    assert checkpoint.step == 4 and not checkpoint.is_legacy
    assert {f.key for f in checkpoint.files} == {METADATA_FILE, "__0_0.distcp", "__0_optimizer_0.distcp"}
    assert not store.exists(checkpoint.key(LEGACY_MODEL_FILE))
    assert read_values(store, checkpoint, "progress") == {"step": 4, "tokens_seen": 2048, "world_size": 2}
    assert read_values(store, checkpoint, "loader") == {"position": 64, "seed": 7, "seq_len": 32}
    assert read_values(store, checkpoint, "scheduler")["last_epoch"] == 4
    model, config = load_model(store.uri)
    assert config.name == "legacy"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def checkpoint_requests(store, tmp_path, kept: int) -> tuple[Counter, Counter, Counter]:
    """S3 calls of a save with `kept` checkpoints there and keep = kept (its prune deletes the
    oldest), of a resume, then of pruning to 1 (botocore's event hooks on this process's client).
    The older checkpoints are committed folders of dummy files: only a prune deletes them."""
    from tests.builds import RequestCounter

    for step in range(1, kept):
        commit_checkpoint(store, step, put_files(store, step))
    model, optimizer, progress, states = components(0)
    progress.step = kept - 1
    checkpointer = Checkpointer(RunLayout(store), states, keep=kept, staging_dir=tmp_path / f"staging-{kept}")
    train_one_step(model, optimizer, states, progress)
    checkpointer.save(kept)
    counter = RequestCounter()
    train_one_step(model, optimizer, states, progress)
    checkpointer.save(kept + 1)
    saved = counter.take()
    assert RunLayout(store).checkpoint_steps() == list(range(2, kept + 2))
    counter.take()
    fresh = Checkpointer(RunLayout(store), components(1)[3], keep=kept, staging_dir=tmp_path / f"resume-{kept}")
    assert fresh.load() == kept + 1
    resumed = counter.take()
    assert prune_checkpoints(store, keep=1) == list(range(2, kept + 1))
    return saved, resumed, counter.take()


def test_a_save_and_a_resume_cost_the_same_requests_with_1_20_or_60_checkpoints_kept(
    s3_bucket_uri, tmp_path, lone_process_group
):
    """A folder listing, then only the folders taken: a save (and its prune) and a resume cost
    the same with 1, 20 or 60 checkpoints kept; pruning many is three DeleteObjects calls
    (counted on SeaweedFS)."""
    costs = {kept: checkpoint_requests(open_store(f"{s3_bucket_uri}/kept-{kept}-{tmp_path.name}"), tmp_path, kept)
             for kept in (1, 20, 60)}
    (saved_1, resumed_1, _), (saved_20, resumed_20, _), (saved_60, resumed_60, pruned_60) = costs.values()
    assert saved_1 == saved_20 == saved_60 and resumed_1 == resumed_20 == resumed_60, costs
    # the step's folder (leftovers of a crashed save), the step folders, the one deleted; its COMMIT
    assert saved_60["ListObjectsV2"] == 3 and saved_60["GetObject"] == 1, saved_60
    # its COMMIT, its files, the emptied folder (SeaweedFS would list it)
    assert saved_60["DeleteObjects"] == 3 and "HeadObject" not in saved_60, saved_60
    assert resumed_60["ListObjectsV2"] == 2, resumed_60  # the step folders, the newest one's files
    assert pruned_60["DeleteObjects"] == 3 and "DeleteObject" not in pruned_60, pruned_60
