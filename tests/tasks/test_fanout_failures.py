"""A shard whose Ray worker dies (os._exit, as an OOM kill or a crash leaves it) is retried alone
while its siblings go on; one that dies every time fails its stage with one line naming it, the
siblings' receipts kept, and a rerun redoes only that shard. Real workers of a local Ray die."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage import build_layout as layout
from storage.store import Store, open_store
from tasks.fanout import SHARD_ATTEMPTS, ShardFailed, run_stage
from tasks.ingest import ingest_file
from tasks.plan import make_plan, shard_of
from tasks.stage import Stage
from tests.builds import tiny_config, tiny_corpus

pytestmark = pytest.mark.usefixtures("ray_local")

FILES = 6
VICTIM = "000002"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    inputs = tiny_corpus(tmp_path_factory.mktemp("inputs"), files=FILES, docs_per_file=5, seed=3)
    return tiny_config(f"{inputs}/*.jsonl", str(tmp_path_factory.mktemp("unused")))


def ingest_stage(config, store: Store, work=None) -> Stage:
    source = config.sources[0]
    plain = lambda f: ingest_file(f, source, config.filters, config.quarantine, store)  # noqa: E731
    return Stage("ingest", make_plan(config), shard_of, work or plain, (layout.DOCS, layout.QUARANTINE))


def dying(config, store: Store, log: Path, deaths: int):
    """The ingest work, logging "start SHARD" and "end SHARD", whose worker exits in VICTIM's
    first `deaths` runs (counted in the log: every run of it is a new worker process)."""
    source = config.sources[0]

    def work(file):
        with log.open("a") as out:
            out.write(f"start {file.shard}\n")
        if file.shard == VICTIM and log.read_text().count(f"start {VICTIM}\n") <= deaths:
            os._exit(1)
        result = ingest_file(file, source, config.filters, config.quarantine, store)
        with log.open("a") as out:
            out.write(f"end {file.shard}\n")
        return result

    return work


def outputs(store: Store) -> dict[str, bytes]:
    return {key: store.get_bytes(key) for key in store.list() if not key.startswith(("receipts/", "summaries/"))}


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> dict[str, bytes]:
    store = open_store(str(tmp_path_factory.mktemp("reference")))
    run_stage(store, ingest_stage(config, store))
    return outputs(store)


def test_a_shard_whose_worker_dies_twice_is_retried_alone_and_the_stage_completes(config, reference, tmp_path):
    store, log = open_store(str(tmp_path / "build")), tmp_path / "runs.log"
    summary = run_stage(store, ingest_stage(config, store, dying(config, store, log, deaths=SHARD_ATTEMPTS - 1)))
    events = log.read_text().splitlines()
    starts = [e.split()[1] for e in events if e.startswith("start")]
    assert starts.count(VICTIM) == SHARD_ATTEMPTS and all(starts.count(s) == 1 for s in set(starts) - {VICTIM})
    last = len(events) - 1 - events[::-1].index(f"start {VICTIM}")
    assert all(e.startswith("end") for e in events[last + 1 :]) and events[-1] == f"end {VICTIM}"
    assert {e for e in events[:last] if e.startswith("end")} == {f"end {s}" for s in set(starts) - {VICTIM}}  # ran alone
    assert len(summary.receipts) == FILES
    assert outputs(store) == reference


def test_a_shard_that_always_dies_fails_its_stage_naming_it_and_a_rerun_redoes_only_it(config, reference, tmp_path):
    store, log = open_store(str(tmp_path / "build")), tmp_path / "runs.log"
    with pytest.raises(ShardFailed) as failed:
        run_stage(store, ingest_stage(config, store, dying(config, store, log, deaths=100)), max_in_flight=2)
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"ingest: shard {VICTIM} failed {SHARD_ATTEMPTS} times (")
    siblings = {f"{n:06d}" for n in range(FILES)} - {VICTIM}
    assert {key.rsplit("/", 1)[1].removesuffix(".json") for key in store.list("receipts/ingest/")} == siblings

    rerun_log = tmp_path / "rerun.log"
    summary = run_stage(store, ingest_stage(config, store, dying(config, store, rerun_log, deaths=0)))
    assert rerun_log.read_text().splitlines() == [f"start {VICTIM}", f"end {VICTIM}"]
    assert len(summary.receipts) == FILES
    assert outputs(store) == reference
