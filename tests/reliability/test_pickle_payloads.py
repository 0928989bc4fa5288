"""A checkpoint's DCP `.metadata` is a pickle an attacker can write: no payload in it runs.

Each payload, if loaded by a plain unpickler, creates a marker file through `os.system`, `eval`
or `posix.system`, named by protocol 0-3's GLOBAL or INST, or protocol 4-5's STACK_GLOBAL
(which resolves dotted names such as `os.system` inside an allowed module). The checkpoint is
committed properly (its COMMIT lists the payload's size and sha256), as an attacker with write
access to the run folder would leave it. Training's resume, `tinyllama export-hf` and the
evaluate task must refuse every one with a line naming the file, and the marker must not exist.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from model.checkpoint import METADATA_FILE, CheckpointError, complete_checkpoints, commit_checkpoint, read_metadata
from storage.manifest import ObjectInfo, sha256_bytes
from storage.run_layout import RunLayout
from storage.store import open_store
from tasks.evaluate import evaluate_checkpoint
from tests.model.runs import launch_training, run_training, short_documents_build, train_config

DCP_METADATA = "torch.distributed.checkpoint.metadata"


def _text(opcode: bytes, value: str) -> bytes:
    """A str pushed the way the protocol would: UNICODE (0-3) or SHORT_BINUNICODE (4-5)."""
    if opcode == pickle.SHORT_BINUNICODE:
        data = value.encode()
        return opcode + bytes([len(data)]) + data
    return pickle.UNICODE + value.encode("raw_unicode_escape") + b"\n"


def payload(protocol: int, module: str, name: str, argument: str, opcode: str = "global") -> bytes:
    """`module.name(argument)` as a pickle of `protocol`, named by GLOBAL, INST or STACK_GLOBAL."""
    header = pickle.PROTO + bytes([protocol]) if protocol >= 2 else b""
    text = pickle.SHORT_BINUNICODE if protocol >= 4 else pickle.UNICODE
    if opcode == "inst":  # MARK args INST: find_class, then call
        return header + pickle.MARK + _text(text, argument) + pickle.INST + f"{module}\n{name}\n".encode() + pickle.STOP
    if protocol >= 4:
        callable_ = _text(text, module) + _text(text, name) + pickle.STACK_GLOBAL
    else:
        callable_ = pickle.GLOBAL + f"{module}\n{name}\n".encode()
    return header + callable_ + pickle.MARK + _text(text, argument) + pickle.TUPLE + pickle.REDUCE + pickle.STOP


def payloads(marker: Path) -> dict[str, bytes]:
    shell = f"touch {marker}"
    python = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    found = {}
    for protocol in range(6):
        found[f"p{protocol}-dcp-os.system"] = payload(protocol, DCP_METADATA, "os.system", shell)
        found[f"p{protocol}-torch-os.system"] = payload(protocol, "torch", "os.system", shell)
        found[f"p{protocol}-posix.system"] = payload(protocol, "posix", "system", shell)
        found[f"p{protocol}-builtins.eval"] = payload(protocol, "builtins", "eval", python)
        found[f"p{protocol}-inst-os.system"] = payload(protocol, "os", "system", shell, opcode="inst")
    return found


def test_each_payload_would_run_under_a_plain_unpickler(tmp_path):
    """The payloads are real: pickle.loads runs each one, except the dotted names of protocols 0-3,
    which a plain unpickler looks up with getattr (and fails on)."""
    marker = tmp_path / "ran"
    for label, data in payloads(marker).items():
        marker.unlink(missing_ok=True)
        if label.endswith("-os.system") and "inst" not in label and int(label[1]) < 4:
            with pytest.raises(AttributeError):
                pickle.loads(data)
        else:
            pickle.loads(data)
            assert marker.exists(), label


@pytest.fixture(scope="module")
def committed_run(tmp_path_factory) -> tuple[object, Path]:
    """A tiny run trained to one complete checkpoint (local store), and its config."""
    root = tmp_path_factory.mktemp("pickled")
    manifest = short_documents_build(str(root / "data"))
    config = train_config("pickled", str(root / "runs"), manifest, root / "work", max_steps=2, checkpoint_every=2)
    run_training(config, nproc=1)
    return config, root


def plant(run_uri: str, data: bytes) -> str:
    """Replace the newest checkpoint's .metadata with `data` and commit it again; its folder's URI."""
    store = open_store(run_uri)
    checkpoint = complete_checkpoints(store)[0]
    store.put_bytes(checkpoint.key(METADATA_FILE), data)
    files = [f if f.key != METADATA_FILE else ObjectInfo(key=METADATA_FILE, size=len(data), sha256=sha256_bytes(data))
             for f in checkpoint.files]
    commit_checkpoint(store, checkpoint.step, files)
    assert complete_checkpoints(store)[0].step == checkpoint.step  # it looks complete and intact
    return store.url(checkpoint.prefix)


def test_read_metadata_refuses_every_payload(committed_run, tmp_path):
    config, _ = committed_run
    store = RunLayout.of(config.output, config.name).store
    original = store.get_bytes(complete_checkpoints(store)[0].key(METADATA_FILE))
    marker = tmp_path / "ran"
    try:
        for label, data in payloads(marker).items():
            plant(store.uri, data)
            with pytest.raises(CheckpointError, match=r"\.metadata: refused to load"):
                read_metadata(store, complete_checkpoints(store)[0])
            assert not marker.exists(), label
    finally:
        plant(store.uri, original)
    assert read_metadata(store, complete_checkpoints(store)[0]).state_dict_metadata  # DCP's own classes load


@pytest.mark.slow
def test_resume_export_and_evaluate_refuse_the_protocol_4_payload_with_no_side_effect(committed_run, tmp_path):
    config, _ = committed_run
    store = RunLayout.of(config.output, config.name).store
    run_uri = store.uri
    original = store.get_bytes(complete_checkpoints(store)[0].key(METADATA_FILE))
    marker = tmp_path / "ran"
    folder = plant(run_uri, payload(4, DCP_METADATA, "os.system", f"touch {marker}"))
    try:
        resumed = launch_training(config.model_copy(update={"max_steps": 4}), nproc=1)
        assert resumed.returncode != 0
        assert ".metadata: refused to load" in resumed.stdout + resumed.stderr
        assert not marker.exists()

        exported = subprocess.run(
            [sys.executable, "-m", "deployments.cli", "export-hf", run_uri, str(tmp_path / "hf")],
            capture_output=True, text=True, timeout=300,
        )
        assert exported.returncode != 0
        assert f"error: {folder}/.metadata: refused to load" in exported.stderr
        assert not (tmp_path / "hf").exists() and not marker.exists()

        with pytest.raises(CheckpointError, match=r"\.metadata: refused to load"):
            evaluate_checkpoint(run_uri, ["tiny_mc"], str(Path(__file__).parents[2] / "demo" / "tiny_mc"))
        assert not marker.exists()
    finally:
        plant(run_uri, original)
