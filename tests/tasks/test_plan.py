"""The plan: which input files a source's glob names (local folders and S3 keys alike)."""

from __future__ import annotations

import pytest

from storage.store import Store
from tasks.config import SourceConfig
from tasks.plan import list_source

TREE = [
    "a/one.jsonl",
    "a/two.jsonl",
    "a/.hidden.jsonl",
    "a/notes.txt",
    "a/sub/three.jsonl",
    "a/sub/deeper/four.jsonl",
    "a/.git/five.jsonl",
]


def matched(store: Store, pattern: str) -> list[str]:
    source = SourceConfig(name="web", uri=f"{store.uri}/{pattern}", format="jsonl")
    return [uri.removeprefix(store.uri + "/") for uri, _ in list_source(source)]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("a/*.jsonl", ["a/one.jsonl", "a/two.jsonl"]),  # not below a/, not hidden
        ("a/?ne.jsonl", ["a/one.jsonl"]),
        ("a/[!o]*.jsonl", ["a/two.jsonl"]),
        ("a/*/*.jsonl", ["a/sub/three.jsonl"]),
        ("a/**/*.jsonl", ["a/one.jsonl", "a/sub/deeper/four.jsonl", "a/sub/three.jsonl", "a/two.jsonl"]),
        ("a/sub/**", ["a/sub/deeper/four.jsonl", "a/sub/three.jsonl"]),
        ("a/.*.jsonl", ["a/.hidden.jsonl"]),  # hidden files when the pattern names them
        ("a/.git/*.jsonl", ["a/.git/five.jsonl"]),
    ],
)
def test_a_glob_matches_by_posix_rules_on_every_store(store, pattern, expected):
    for key in TREE:
        store.put_bytes(key, b'{"text": "x"}\n')
    assert matched(store, pattern) == expected
