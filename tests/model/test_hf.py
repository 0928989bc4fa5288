"""Hugging Face export and import, checked against `transformers` itself."""

from __future__ import annotations

import io
import json
import random

import pytest
import sentencepiece as spm
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

from model import Llama, LlamaConfig
from model.hf import hf_config, load_hf, save_hf

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
