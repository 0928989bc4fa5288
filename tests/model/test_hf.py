"""Hugging Face export and import, checked against `transformers` itself."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from model import Llama, LlamaConfig
from model.hf import hf_config, load_hf, save_hf
from storage.manifest import DocumentConvention, TokenizerInfo
from tasks.config import TokenizerTrain
from tasks.tokenizer import train_model
from tests.tasks.tokenizer_texts import corpus_texts

# GQA and a non-default RoPE base, so that a dropped rope_theta or a head mix-up would show.
CONFIG = LlamaConfig.preset("tiny", vocab_size=320, rope_theta=500000.0)


def hf_model(config: LlamaConfig, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(1)
    return LlamaForCausalLM(transformers.LlamaConfig(**{**hf_config(config, torch.float32), **overrides})).eval()


def assert_same_logits(ours: Llama, theirs: LlamaForCausalLM) -> None:
    torch.manual_seed(2)
    idx = torch.randint(0, ours.config.vocab_size, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx), theirs(idx).logits, atol=1e-5, rtol=0)


def test_state_dict_names_and_shapes_equal_hf():
    ours = {name: t.shape for name, t in Llama(CONFIG).state_dict().items()}
    theirs = {name: t.shape for name, t in hf_model(CONFIG).state_dict().items()}
    assert ours == theirs


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    model = Llama(CONFIG)
    save_hf(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is LlamaForCausalLM and loaded.dtype == torch.float32
    assert loaded.config.num_key_value_heads == 2 and loaded.config.tie_word_embeddings is False
    assert_same_logits(model, loaded)
    generation = GenerationConfig.from_pretrained(tmp_path)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)


def test_export_in_bfloat16(tmp_path):
    save_hf(Llama(CONFIG), tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert load_hf(tmp_path, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_import_of_transformers_checkpoint_has_equal_logits(tmp_path):
    theirs = hf_model(CONFIG)
    theirs.save_pretrained(tmp_path)  # transformers 5 nests rope_theta in rope_parameters
    ours = load_hf(tmp_path)
    assert ours.config == CONFIG
    assert_same_logits(ours, theirs)


def test_import_sharded_safetensors(tmp_path):
    theirs = hf_model(CONFIG)
    theirs.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_same_logits(load_hf(tmp_path), theirs)


def test_import_pytorch_bin_with_legacy_rope_buffers(tmp_path):
    theirs = hf_model(CONFIG)
    state = {**theirs.state_dict(), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(CONFIG, torch.float32)))
    assert_same_logits(load_hf(tmp_path), theirs)


def test_import_tied_embeddings_unties_them(tmp_path):
    theirs = hf_model(CONFIG, tie_word_embeddings=True)
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
    assert_same_logits(ours, theirs)


def test_import_refuses_what_it_cannot_represent(tmp_path):
    save_hf(Llama(CONFIG), tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
    with pytest.raises(ValueError, match=f"{config_path}: RoPE scaling"):
        load_hf(tmp_path)

    config_path.write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.raises(ValueError, match=r"weights do not match config.json: missing \['model.layers.4"):
        load_hf(tmp_path)

    config_path.write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(ValueError, match="size mismatch"):
        load_hf(tmp_path)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        load_hf(tmp_path)


@pytest.fixture(scope="module", params=[True, False], ids=["dummy_prefix", "no_dummy_prefix"])
def sentencepiece_model(request, tmp_path_factory):
    """A BPE model with byte fallback, trained as the project trains its tokenizers (identity
    normalization), with and without SentencePiece's dummy prefix (HF's add_prefix_space)."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog def return import class lambda numbers 42 data".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=request.param,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def test_exported_tokenizer_loads_in_transformers_and_encodes_as_sentencepiece(tmp_path, sentencepiece_model):
    save_hf(Llama(CONFIG), tmp_path, tokenizer_model=sentencepiece_model)
    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    texts = [
        "the quick brown fox",
        "def f(x):\n    return  x  # two spaces, tab\there",
        "unseen: Ünïcödé 東京 ~ 🙂",  # bytes through byte fallback
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == [sp.bos_id(), *sp.encode(text)], text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_must_agree_with_the_model(tmp_path, sentencepiece_model):
    with pytest.raises(ValueError, match="EOS id 2 differs from the model's 5"):
        save_hf(Llama(CONFIG.model_copy(update={"eos_id": 5})), tmp_path, tokenizer_model=sentencepiece_model)
    with pytest.raises(ValueError, match="300 pieces exceed the model's vocab 256"):
        save_hf(Llama(CONFIG.model_copy(update={"vocab_size": 256})), tmp_path, tokenizer_model=sentencepiece_model)


# Texts a tokenizer conversion gets wrong first: whitespace at the ends or alone, digits, code,
# non-Latin scripts, characters only byte fallback can spell, and special tokens written as text.
HOSTILE_TEXTS = [
    "", " ", "   ", "\n", "\t", " \n\t ", "\n\nparagraph", "trailing spaces   ", "trailing newline\n",
    "    def f(x):\n        return x  # indented\n", "\tif a:\n\t\tpass", "x  =  1;;  y=2\r\n",
    "0", "1234567890", "3.14159e-10 and 2,147,483,647", "v1.2.3-rc4", "٣٤٥ ١٢",
    "東京タワー", "Ünïcödé naïve café", "Привет, мир", "مرحبا بالعالم", "नमस्ते दुनिया", "한국어 텍스트",
    "emoji 🙂🚀 and ZWJ 👩‍💻", "\u200b zero width \u00a0 nbsp", "combining e\u0301", "\x01\x7f control",
    "<s> literal </s> and <unk>", "<0x41> looks like a byte piece", "▁ the meta symbol itself ▁▁",
]


def build_documents(root) -> list[str]:
    """The documents of the sample corpus the build tokenizes (prose and code)."""
    texts = corpus_texts(root)
    corpus = json.loads((root / "corpus.json").read_text())
    assert len(texts) == sum(source["documents"] for source in corpus["sources"].values())
    return texts


@pytest.fixture(scope="module")
def build_tokenizer(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tokenizer trained as the build trains one (tasks.tokenizer.train_model), and its documents."""
    texts = build_documents(tmp_path_factory.mktemp("corpus"))
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    path = tmp_path_factory.mktemp("build-tokenizer") / "tokenizer.model"
    path.write_bytes(train_model(lines, TokenizerTrain(vocab_size=1024)))
    return path, texts


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no_bos"])
def test_export_tokenizes_every_document_as_the_build_wrote_it(tmp_path, build_tokenizer, bos):
    model_path, texts = build_tokenizer
    texts = texts + HOSTILE_TEXTS
    assert len(texts) > 300 and sum(t != t.lstrip(" ") for t in texts) > 20  # indented code among them
    save_hf(Llama(LlamaConfig.preset("tiny", vocab_size=1024)), tmp_path, tokenizer_model=model_path, bos=bos)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer.model").exists()
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    info = TokenizerInfo(key="k", sha256="s", vocab_size=sp.vocab_size(), bos_id=1, eos_id=2, trained=True)
    convention = DocumentConvention(bos=bos)
    fast = AutoTokenizer.from_pretrained(tmp_path)  # tokenizer.json
    slow = SentencePieceBackend.from_pretrained(tmp_path)  # transformers' SentencePiece-backed tokenizer
    assert fast.is_fast and not slow.is_fast
    for text in texts:
        written = convention.frame(sp.encode(text), info)  # what tasks.tokenize writes for the document
        assert fast(text).input_ids + [info.eos_id] == written, repr(text[:80])
        assert [1] * bos + slow(text, add_special_tokens=False).input_ids + [info.eos_id] == written, repr(text[:80])
        assert fast.decode(fast(text).input_ids, skip_special_tokens=True) == sp.decode(sp.encode(text))


def test_tokenizer_options_the_export_cannot_reproduce_are_refused(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["some text to train on"] * 50), model_writer=model, vocab_size=40,
        model_type="bpe", remove_extra_whitespaces=True, minloglevel=2,  # nmt_nfkc normalization by default
    )
    path = tmp_path / "nfkc.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="normalization 'nmt_nfkc' .*remove_extra_whitespaces"):
        save_hf(Llama(CONFIG), tmp_path / "out", tokenizer_model=path)


def test_import_follows_the_document_convention(tmp_path, sentencepiece_model):
    save_hf(Llama(CONFIG), tmp_path, tokenizer_model=sentencepiece_model, bos=True)
    assert load_hf(tmp_path, documents=DocumentConvention(bos=True)).config == CONFIG
    with pytest.raises(ValueError, match=f"{tmp_path}: its tokenizer adds BOS .* do not start with BOS"):
        load_hf(tmp_path, documents=DocumentConvention(bos=False))
    save_hf(Llama(CONFIG), tmp_path, tokenizer_model=sentencepiece_model, bos=False)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert AutoTokenizer.from_pretrained(tmp_path)("the fox").input_ids[0] != 1
    assert load_hf(tmp_path, documents=DocumentConvention(bos=False)).config == CONFIG
