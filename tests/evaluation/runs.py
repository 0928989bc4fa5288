"""A demo-sized training run whose build has a real SentencePiece tokenizer, so it exports and evaluates."""

from __future__ import annotations

import io
import json
import random

import sentencepiece as spm

from storage.manifest import sha256_bytes
from storage.store import open_object
from tests.model.synthetic import write_synthetic_build

VOCAB = 512


def tokenizer_model() -> bytes:
    rng = random.Random(0)
    words = "the sky is blue grass green snow white fire hot ice cold two plus four seven day week".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=300, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )
    return model.getvalue()


def evaluable_build(store_uri: str, name: str = "evaluable") -> str:
    """A synthetic build (random token ids) whose tokenizer is a real SentencePiece model."""
    uri = write_synthetic_build(store_uri, name, {"web": [16] * 400}, vocab_size=VOCAB, seed=0, shard_tokens=4096)
    store, key = open_object(uri)
    manifest = json.loads(store.get_bytes(key))
    model = tokenizer_model()
    store.put_bytes(manifest["tokenizer"]["key"], model)  # keys are relative to the manifest's folder
    manifest["tokenizer"]["sha256"] = sha256_bytes(model)
    store.put_bytes(key, json.dumps(manifest).encode())
    return uri
