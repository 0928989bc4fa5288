"""Hugging Face directories <-> the project's Llama, without depending on `transformers`.

`save_hf` writes what `transformers.AutoModelForCausalLM.from_pretrained` loads as
LlamaForCausalLM (and what vLLM, llama.cpp's converter and lm-evaluation-harness read):
model.safetensors, config.json, generation_config.json and, given a SentencePiece model, the
tokenizer files for AutoTokenizer. `load_hf` reads such a directory (single or sharded
safetensors, or pytorch_model.bin loaded with weights_only=True), e.g. released TinyLlama
weights to continue pretraining from (a run's `init_from`, refused by `check_init_from` unless
the architecture, the tokenizer and the document convention are the run's). Parameter names
are identical on both sides.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from model.checkpoint import weights_only_refusal
from model.config import LlamaConfig
from model.llama import Llama
from storage.manifest import DocumentConvention, TokenizerInfo, sha256_file
from storage.store import StoreError, open_store

WEIGHTS_FILE = "model.safetensors"
HF_CONFIG, TOKENIZER_CONFIG, TOKENIZER_MODEL = "config.json", "tokenizer_config.json", "tokenizer.model"
# Weight files in the order they are looked for; an index names the shards of a sharded checkpoint.
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config(config: LlamaConfig, dtype: torch.dtype) -> dict:
    """config.json of a LlamaForCausalLM with this architecture; keys every Llama reader knows."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": config.bos_id,
        "eos_token_id": config.eos_id,
        "torch_dtype": DTYPE_NAMES[dtype],
        "use_cache": True,
    }


def config_from_hf(hf: dict, source: str | Path) -> LlamaConfig:
    """The LlamaConfig of a Hugging Face config.json; refuses variants this model does not implement."""

    def unsupported(what: str) -> ValueError:
        return ValueError(f"{source}: {what} is not supported by this Llama implementation")

    if hf.get("model_type") != "llama":
        raise unsupported(f"model_type {hf.get('model_type')!r} (expected 'llama')")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests rope_theta here
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if hf.get("rope_scaling") or rope_type != "default":
        raise unsupported(f"RoPE scaling {hf.get('rope_scaling') or rope}")
    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act {hf['hidden_act']!r}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise unsupported("attention/MLP biases")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
        raise unsupported(f"head_dim {head_dim} with {n_heads} heads and hidden_size {hf['hidden_size']}")

    def first_id(key: str, default: int) -> int:
        value = hf.get(key)
        value = value[0] if isinstance(value, list) else value  # Llama 3 lists several EOS ids
        return default if value is None else value

    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        n_layers=hf["num_hidden_layers"],
        dim=hf["hidden_size"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        bos_id=first_id("bos_token_id", 1),
        eos_id=first_id("eos_token_id", 2),
    )


def save_hf(
    model: Llama,
    out_dir: str | Path,
    tokenizer_model: str | Path | None = None,
    dtype: torch.dtype | None = None,
    bos: bool = True,
) -> Path:
    """Write `model` as a Hugging Face LlamaForCausalLM directory; dtype defaults to the weights' own,
    `bos` is the training data's document convention (documents start with BOS)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / HF_CONFIG).unlink(missing_ok=True)  # written last, so its presence marks a complete export
    config = model.config
    dtype = dtype or model.lm_head.weight.dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"cannot export weights as {dtype}; choose one of {', '.join(DTYPE_NAMES.values())}")
    if tokenizer_model is not None:
        save_tokenizer(tokenizer_model, out, config, bos)
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})  # transformers requires format=pt
    # No max_length: generate() would warn whenever a caller passes max_new_tokens (the usual call);
    # the context length is config.json's max_position_embeddings.
    generation = {"bos_token_id": config.bos_id, "eos_token_id": config.eos_id}
    _write_json(out / "generation_config.json", generation)
    # safetensors writes through a 0600 temporary file: give the weights the mode (umask) of the others
    shutil.copymode(out / "generation_config.json", out / WEIGHTS_FILE)
    _write_json(out / HF_CONFIG, hf_config(config, dtype))
    return out


def save_tokenizer(tokenizer_model: str | Path, out_dir: Path, config: LlamaConfig, bos: bool = True) -> None:
    """tokenizer.model, tokenizer.json and the configs with which AutoTokenizer encodes a text exactly as
    the build encoded a document: [BOS if `bos`] + SentencePiece's ids (the build appends EOS at a
    document's end; a prompt is a document's unfinished start, so the tokenizer adds none)."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    for name, sp_id, model_id in (("BOS", sp.bos_id(), config.bos_id), ("EOS", sp.eos_id(), config.eos_id)):
        if sp_id != model_id:
            raise ValueError(f"{tokenizer_model}: {name} id {sp_id} differs from the model's {model_id}")
    if sp.vocab_size() > config.vocab_size:
        raise ValueError(f"{tokenizer_model}: {sp.vocab_size()} pieces exceed the model's vocab {config.vocab_size}")
    shutil.copyfile(tokenizer_model, out_dir / TOKENIZER_MODEL)
    fast_tokenizer(sp, bos).save(str(out_dir / "tokenizer.json"))
    special = {
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
    }
    if sp.pad_id() >= 0:
        special["pad_token"] = sp.id_to_piece(sp.pad_id())
    tokenizer_config = {
        # tokenizer.json as written: the LlamaTokenizer class rebuilds its own pre-tokenizer, which drops
        # the dummy prefix before leading spaces
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bos,
        "add_eos_token": False,
        "add_prefix_space": _adds_dummy_prefix(sp),
        # legacy: SentencePiece's own encode (dummy prefix included) on the whole text; the
        # non-legacy path drops the dummy prefix before leading spaces ("▁▁▁▁" "def", not "▁▁▁▁▁def").
        "legacy": True,
        # "<s>" written in a document is text to SentencePiece, not the BOS token
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_seq_len,
        "sp_model_kwargs": {},
    }
    _write_json(out_dir / TOKENIZER_CONFIG, tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", special)


def _adds_dummy_prefix(sp: spm.SentencePieceProcessor) -> bool:
    # SentencePiece's add_dummy_prefix shows as a leading "▁" on the first piece; HF calls it add_prefix_space.
    return sp.encode("a", out_type=str)[0].startswith("▁")


def check_convertible(sp: spm.SentencePieceProcessor) -> None:
    """Refuse SentencePiece options the `tokenizers` pipeline below does not reproduce."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    unsupported = [
        what for what, present in (
            (f"model type {sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)} (not BPE)",
             trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE),
            (f"normalization {spec.name!r} (not identity)", spec.name != "identity" or bool(spec.precompiled_charsmap)),
            ("remove_extra_whitespaces", spec.remove_extra_whitespaces),
            ("no escape_whitespaces", not spec.escape_whitespaces),
            ("treat_whitespace_as_suffix", trainer.treat_whitespace_as_suffix),
        ) if present
    ]
    if unsupported:
        raise ValueError(f"tokenizer cannot be exported as tokenizer.json: {', '.join(unsupported)}")


def fast_tokenizer(sp: spm.SentencePieceProcessor, bos: bool) -> Tokenizer:
    """The `tokenizers` pipeline of a BPE SentencePiece model as the project trains it (identity
    normalization, whitespace kept, byte fallback, split digits): SentencePiece's normalization is then
    only the dummy prefix and " " -> "▁", and its BPE merges the highest-scored adjacent pair, leftmost
    first, over the whole text; tokenizers' BPE does the same with merges ranked by the merged piece's
    score. Split digits and whitespace-only pieces need nothing at encode time: they shape the vocabulary."""
    check_convertible(sp)
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    ranked = []
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        ranked += [(-sp.get_score(i), i, piece[:k], piece[k:]) for k in range(1, len(piece))
                   if piece[:k] in vocab and piece[k:] in vocab]
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = sp.id_to_piece(sp.unk_id())
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", "▁")]
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if _adds_dummy_prefix(sp):
        steps.insert(0, normalizers.Prepend("▁"))
        decode.append(decoders.Strip(content=" ", left=1))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(decode)
    control = [sp.id_to_piece(i) for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)]
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in control])
    bos_piece = sp.id_to_piece(sp.bos_id())
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_piece} $A", pair=f"{bos_piece} $A {bos_piece} $B", special_tokens=[(bos_piece, sp.bos_id())]
        )
    return tokenizer


def weight_files(names: Collection[str], read_text: Callable[[str], str]) -> list[str]:
    """The files that hold a Hugging Face folder's weights, given the names of its files: an index
    and the shards it names, or the one weights file (layouts looked for in WEIGHT_LAYOUTS order)."""
    for index_name, single_name in WEIGHT_LAYOUTS:
        if index_name in names:
            return [index_name, *sorted(set(json.loads(read_text(index_name))["weight_map"].values()))]
        if single_name in names:
            return [single_name]
    expected = ", ".join(name for layout in WEIGHT_LAYOUTS for name in layout)
    raise FileNotFoundError(f"no weights found (looked for {expected})")


def read_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint directory, on the CPU, in their stored dtype."""
    root = Path(path)
    try:
        files = weight_files({p.name for p in root.iterdir()}, lambda name: (root / name).read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{root}: {e}") from None
    state: dict[str, torch.Tensor] = {}
    for name in files:
        file = root / name
        try:
            if name.endswith(".safetensors"):
                state.update(load_file(file, device="cpu"))
            elif name.endswith(".bin"):
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as e:
            raise ValueError(f"{file}: refused to load: not only tensors ({weights_only_refusal(e)})") from None
        except (SafetensorError, RuntimeError) as e:  # RuntimeError: torch's reader of a damaged archive
            raise ValueError(f"{file}: unreadable weights: {str(e).split('. ')[0]}") from None
    return state


def hf_documents(path: str | Path) -> DocumentConvention:
    """The document convention a Hugging Face directory's tokenizer encodes with: BOS first when its
    tokenizer_config adds one (Llama 2's and TinyLlama's releases do, and so does a missing config)."""
    config_path = Path(path) / TOKENIZER_CONFIG
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return DocumentConvention(bos=config.get("add_bos_token", True))


def check_documents(path: str | Path, documents: DocumentConvention, source: str | None = None) -> None:
    """Refuse weights whose tokenizer frames documents otherwise than the training data (continuing
    TinyLlama, which saw BOS before every document, on BOS-less data); `source` names the folder."""
    adds_bos = hf_documents(path).bos
    if adds_bos != documents.bos:
        raise ValueError(
            f"{source or path}: its tokenizer {'adds' if adds_bos else 'does not add'} BOS before each text, "
            f"but the training data's documents {'start' if documents.bos else 'do not start'} with BOS; "
            "build the data with the same `bos` setting"
        )


def load_hf(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    documents: DocumentConvention | None = None,
) -> Llama:
    """A Llama with the weights of a Hugging Face LlamaForCausalLM directory, cast to `dtype`.
    Given the convention of the data it will train on, refuses weights whose tokenizer frames
    documents otherwise (check_documents)."""
    root = Path(path)
    if documents is not None:
        check_documents(root, documents)
    hf = json.loads((root / HF_CONFIG).read_text())
    config = config_from_hf(hf, root / HF_CONFIG)
    state = read_hf_state_dict(root)
    # Old exports carry RoPE frequencies as buffers; they follow from the config.
    state = {name: t for name, t in state.items() if not name.endswith("rotary_emb.inv_freq")}
    if hf.get("tie_word_embeddings") and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # this model's head is untied
    with torch.device("meta"):
        model = Llama(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{root}: weights do not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    try:
        model.load_state_dict(state, assign=True)  # takes the loaded tensors instead of copying into meta ones
    except RuntimeError as e:
        raise ValueError(f"{root}: weights do not match config.json: {e}") from e
    model.reset_rope_cache()  # still on meta: it is not in the state dict
    return model.to(device=device, dtype=dtype)


# What a continued run may choose otherwise than the weights it starts from: RoPE has no learned
# positions, so the context length is the run's.
CONTEXT_FIELDS = frozenset({"max_seq_len"})


@contextlib.contextmanager
def local_hf_folder(source: str, staging_dir: str | Path | None = None, weights: bool = True) -> Iterator[Path]:
    """The Hugging Face folder `source` (a path or store URI) as a local folder: a local one as it is;
    from another store its config and tokenizer files and, with `weights`, its weight files, downloaded
    into a temporary folder in `staging_dir` that is removed afterwards."""
    store = open_store(source)
    if (folder := store.local_path()) is not None:
        yield folder
        return
    names = {key for key in store.list() if "/" not in key}
    wanted = [name for name in (HF_CONFIG, TOKENIZER_CONFIG, TOKENIZER_MODEL) if name in names]
    if weights:
        wanted += weight_files(names, store.get_text)
    with tempfile.TemporaryDirectory(prefix="hf-", dir=staging_dir) as tmp:
        for name in wanted:
            store.download(name, Path(tmp) / name)
        yield Path(tmp)


def check_init_from(
    source: str, config: LlamaConfig, tokenizer: TokenizerInfo, documents: DocumentConvention
) -> None:
    """Refuse to start a run of architecture `config` on data of `tokenizer` and `documents` from the
    Hugging Face folder `source` (a path or store URI) unless its config.json is that architecture
    (the context length aside), its tokenizer.model is the data's tokenizer byte for byte (so every
    id means the same piece), and its tokenizer frames documents as the data does. Reads no weights;
    each error is one line that starts with "init_from SOURCE:"."""
    where = f"init_from {source}"
    try:
        with local_hf_folder(source, weights=False) as folder:
            if not (folder / HF_CONFIG).is_file():
                raise ValueError(
                    f"{where}: no {HF_CONFIG}, so not a Hugging Face model folder (download a Hub model "
                    "first: huggingface-cli download REPO --local-dir DIR)"
                )
            try:
                theirs = config_from_hf(json.loads((folder / HF_CONFIG).read_text()), f"{where}/{HF_CONFIG}")
            except (KeyError, json.JSONDecodeError) as e:
                raise ValueError(f"{where}/{HF_CONFIG}: not a Llama config ({type(e).__name__}: {e})") from None
            differences = [
                f"{name} {getattr(theirs, name)} (the run's: {getattr(config, name)})"
                for name in LlamaConfig.model_fields
                if name not in CONTEXT_FIELDS and getattr(theirs, name) != getattr(config, name)
            ]
            if differences:
                raise ValueError(
                    f"{where}: its architecture differs from the run's model: {', '.join(differences)}; "
                    "set model, model_overrides or vocab_size to match"
                )
            if not (folder / TOKENIZER_MODEL).is_file():
                raise ValueError(f"{where}: no {TOKENIZER_MODEL} to compare with the datasets' tokenizer")
            if (theirs_sha256 := sha256_file(folder / TOKENIZER_MODEL)) != tokenizer.sha256:
                raise ValueError(
                    f"{where}: its {TOKENIZER_MODEL} (sha256 {theirs_sha256[:12]}) is not the datasets' tokenizer "
                    f"({tokenizer.sha256[:12]}), so the same ids would mean other pieces; build the data with "
                    f"tokenizer: {{model: <init_from>/{TOKENIZER_MODEL}}}"
                )
            check_documents(folder, documents, source=where)
    except StoreError as e:
        raise ValueError(f"{where}: {e}") from None


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")
