"""Export a training checkpoint as a Hugging Face LlamaForCausalLM directory (`tinyllama export-hf`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from model.checkpoint import load_model
from model.data import DataError, load_manifests, read_manifest
from model.hf import save_hf
from storage.manifest import sha256_file


def fetch_tokenizer(manifest_uri: str, dest: Path) -> Path:
    """The build's SentencePiece model (manifest folder + tokenizer.key), checked against its fingerprint."""
    store, manifest = read_manifest(manifest_uri)
    path = store.download(manifest.tokenizer.key, dest)
    if sha256_file(path) != manifest.tokenizer.sha256:
        raise DataError(f"{store.url(manifest.tokenizer.key)}: sha256 differs from the fingerprint in {manifest_uri}")
    return path


def export_hf(checkpoint_uri: str, out_dir: str | Path) -> Path:
    """Write the checkpoint (a checkpoint folder, or a run folder meaning its newest complete one)
    with its datasets' tokenizer and document convention to `out_dir`, loadable by transformers'
    AutoModelForCausalLM and AutoTokenizer."""
    model, config = load_model(checkpoint_uri)
    manifests, _ = load_manifests(config.data)  # one tokenizer and one convention, or a DataError
    with tempfile.TemporaryDirectory(prefix="tinyllama-export-") as tmp:
        tokenizer = fetch_tokenizer(config.data[0].manifest, Path(tmp) / "tokenizer.model")
        return save_hf(model, out_dir, tokenizer_model=tokenizer, bos=manifests[0].documents.bos)
