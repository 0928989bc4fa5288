"""The piece-cached encoder gives SentencePiece's own ids, model option by model option, on the
sample corpus, hostile and random strings, 100 KB lines and empty documents; a model it cannot
reproduce exactly is encoded by plain `encode`, said once in the log."""

from __future__ import annotations

import logging
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
import sentencepiece as spm

from tasks.config import TokenizerTrain
from tasks.piece_cache import PieceCacheEncoder
from tasks.tokenizer import train_model
from tests.tasks.tokenizer_texts import HOSTILE, LONG, corpus_texts, random_texts, train, training_lines

# The models the cache must reproduce: how the build trains one, Llama 2's normalizer and
# options, SentencePiece's defaults (nmt_nfkc, remove_extra_whitespaces, no byte fallback: runs
# of unknown pieces merge) with user-defined symbols, and identity without a dummy prefix.
EXACT = {
    "build": None,  # tasks.tokenizer.train_model
    "llama2": dict(
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=True, remove_extra_whitespaces=False,
        split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True,
    ),
    "defaults": dict(user_defined_symbols=["<tool>", "@@", "東京"], character_coverage=0.98),
    "no-dummy-prefix": dict(normalization_rule_name="identity", add_dummy_prefix=False, split_by_unicode_script=False,
                            split_by_number=False, remove_extra_whitespaces=False),
}
FALLBACK = {
    "unigram": (dict(model_type="unigram", vocab_size=600), "model_type UNIGRAM"),
    "across-spaces": (dict(split_by_whitespace=False), "hold a space after another character"),
    "suffix": (dict(treat_whitespace_as_suffix=True), "treat_whitespace_as_suffix"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    return corpus_texts(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def models(corpus) -> dict[str, bytes]:
    lines = training_lines(corpus)
    built = {"build": train_model(iter(lines), TokenizerTrain(vocab_size=1024))}
    small = lines[::4]  # the other models train on less: they only need some of every script
    built |= {name: train(small, **options) for name, options in EXACT.items() if options is not None}
    built |= {name: train(small, **options) for name, (options, _) in FALLBACK.items()}
    return built


def split(ids: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    assert ids.dtype == np.int32 and lengths.sum() == len(ids)
    return [part.tolist() for part in np.split(ids, np.cumsum(lengths)[:-1])] if len(lengths) else []


def assert_same_ids(encoder: PieceCacheEncoder, processor: spm.SentencePieceProcessor, texts: list[str], batch: int) -> None:
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        expected = processor.encode(chunk)
        got = split(*encoder.encode(chunk))
        assert len(got) == len(expected)
        for text, mine, theirs in zip(chunk, got, expected):
            assert mine == theirs, f"{text[:60]!r}: {mine[:20]} != {theirs[:20]}"


def test_the_models_cover_what_they_should(models):
    processor = spm.SentencePieceProcessor(model_proto=models["defaults"])
    assert processor.encode("<tool>", out_type=str)[-1] == "<tool>"  # a user-defined symbol is one piece
    assert processor.unk_id() in processor.encode("\U0001f680\U0001f681")  # unknown, not bytes
    assert len(processor.encode("\U0001f680\U0001f681")) < 3  # a run of unknown pieces merges
    llama = spm.SentencePieceProcessor(model_proto=models["llama2"])
    assert llama.encode("１２") == llama.encode("12")  # NFKC
    assert llama.id_to_piece(llama.encode("\U0001f680")[-1]).startswith("<0x")  # byte fallback


@pytest.mark.parametrize("name", list(EXACT))
def test_ids_equal_sentencepiece(models, corpus, name):
    processor = spm.SentencePieceProcessor(model_proto=models[name])
    encoder = PieceCacheEncoder(models[name])
    assert encoder.fallback_reason is None
    texts = corpus + HOSTILE + random_texts(3000, seed=1) + LONG + [""] * 3
    assert_same_ids(encoder, processor, texts, batch=500)  # cold cache
    assert encoder.hit_rate > 0.5
    assert_same_ids(encoder, processor, texts[::-1], batch=777)  # warm, other batches
    tiny = PieceCacheEncoder(models[name], cache_bytes=1)  # cleared before every batch that misses
    assert_same_ids(tiny, processor, HOSTILE + random_texts(500, seed=2), batch=7)


def test_empty_batches_and_sliced_arrays(models, corpus):
    processor = spm.SentencePieceProcessor(model_proto=models["build"])
    encoder = PieceCacheEncoder(models["build"])
    for texts in ([], [""], ["", "", ""]):
        ids, lengths = encoder.encode(texts)
        assert ids.size == 0 and lengths.tolist() == [0] * len(texts)
    texts = HOSTILE + corpus[:50]
    array = pa.array(texts, pa.string())  # what a parquet batch may give: string, sliced
    for start, stop in [(0, 5), (3, 40), (17, len(texts))]:
        assert split(*encoder.encode(array.slice(start, stop - start))) == processor.encode(texts[start:stop])
    with pytest.raises(ValueError, match="1 of 2 texts to encode are null"):
        encoder.encode(pa.array(["a", None]))


@pytest.mark.parametrize("name", list(FALLBACK))
def test_models_outside_the_cache_are_encoded_plainly_and_said_once(models, caplog, name):
    caplog.set_level(logging.INFO, logger="tasks.piece_cache")
    encoder = PieceCacheEncoder(models[name], name="the test model")
    assert FALLBACK[name][1] in encoder.fallback_reason
    processor = spm.SentencePieceProcessor(model_proto=models[name])
    assert_same_ids(encoder, processor, HOSTILE + random_texts(300, seed=3), batch=100)
    said = [r.getMessage() for r in caplog.records if "without the piece cache" in r.getMessage()]
    assert said == [f"the test model is encoded without the piece cache: {encoder.fallback_reason}"]


def test_cache_stays_within_its_bytes_as_traced(models):
    """The cache's own count of its bytes is not an underestimate, and it is cleared at its bound."""
    words = [f"w{i:07d}" for i in range(60_000)]  # distinct chunks
    encoder = PieceCacheEncoder(models["build"], cache_bytes=1 << 40)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        encoder.encode([" ".join(words[i : i + 1000]) for i in range(0, len(words), 1000)])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.8 * held <= encoder.cached_bytes <= 2 * held
    bounded = PieceCacheEncoder(models["build"], cache_bytes=encoder.cached_bytes // 4)
    for start in range(0, len(words), 1000):
        bounded.encode([" ".join(words[start : start + 1000])])
        assert bounded.cached_bytes <= encoder.cached_bytes // 4 + encoder.cached_bytes // 50  # bound + one batch
