"""Hostile inputs, generated into a folder at test time (a zstd bomb and a 50 MB document do
not belong in git). `write_hostile_corpus(root)` returns the build sources and what each file
is expected to produce."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zstandard

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda", "theta", "zeta"]
BOMB_FRAME_BYTES = 64 << 20
BOMB_FRAMES = 48  # ~3 GiB once decompressed, ~100 KB on disk
MAX_RECORD_BYTES = 4 << 20


def _documents(count: int, seed: int) -> list[str]:
    rows = np.random.default_rng(seed).choice(WORDS, size=(count, 80))
    return [" ".join(row) for row in rows]


def write_hostile_corpus(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    good = _documents(8, seed=3)
    lines: list[bytes] = [json.dumps({"text": t}).encode() for t in good[:4]]
    lines += [
        b'{"text": "truncated record',  # malformed JSON
        b'{"text": "\xff\xfe not utf-8 ' + b"x" * 300 + b'"}',  # invalid UTF-8
        json.dumps({"text": ""}).encode(),  # empty document: filtered
        json.dumps({"text": "nul\x00bytes " + good[4]}).encode(),  # NUL stripped, kept
        b'{"text": "lone \\ud800 surrogate ' + b"y" * 300 + b'"}',  # malformed
        b"[" * 100_000 + b"]" * 100_000,  # nesting far past the parser's limit
        b'{"text": "deep", "meta": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",  # nested inside an object
        b"[1, 2]",  # not an object
        json.dumps({"text": "w " * (3 * MAX_RECORD_BYTES // 4)}).encode(),  # over the cap (~6 MB)
        json.dumps({"text": "v " * (25 << 20)}).encode(),  # one 50 MB document
    ]
    lines += [json.dumps({"text": t}).encode() for t in good[5:]]
    (root / "web").mkdir(exist_ok=True)
    (root / "web" / "hostile.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    compressor = zstandard.ZstdCompressor(level=3)
    zst = root / "zst"
    zst.mkdir(exist_ok=True)
    # one frame per record, cut inside the last frame: 39 records survive, the 40th is malformed
    frames = [compressor.compress(json.dumps({"text": t}).encode() + b"\n") for t in _documents(40, seed=4)]
    (zst / "truncated.jsonl.zst").write_bytes(b"".join(frames)[: -len(frames[-1]) // 2])
    # A zstd bomb: one JSON record whose text frame after frame expands to ~3 GiB.
    frame = compressor.compress(b"a" * BOMB_FRAME_BYTES)
    (zst / "bomb.jsonl.zst").write_bytes(compressor.compress(b'{"text": "') + frame * BOMB_FRAMES)
    return {
        "sources": [
            {"name": "web", "uri": str(root / "web" / "*.jsonl"), "format": "jsonl"},
            {"name": "zst", "uri": str(root / "zst" / "*.jsonl.zst"), "format": "jsonl.zst"},
        ],
        # web: 7 good + the NUL one kept; "" filtered; 8 malformed (2 of them over the cap)
        "web": {"docs_in": 17, "kept": 8, "filtered": 1, "malformed": 8},
        "zst": {"docs_in": 41, "malformed": 2},
        "bomb_bytes": BOMB_FRAME_BYTES * BOMB_FRAMES,
    }
