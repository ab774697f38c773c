"""Tokenizers: bytes (the default, vocabulary 256) or a byte-level BPE trained locally.

The BPE needs the optional `tokenizers` package (`pip install steplaw[bpe]`), imported
only when a BPE tokenizer is made or loaded.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from steplaw.errors import UserError


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to train, nothing to store."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        pass


def _import_tokenizers():
    try:
        import tokenizers
    except ModuleNotFoundError:
        raise UserError("tokenizer 'bpe' needs the optional package tokenizers: pip install 'steplaw[bpe]'") from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) from the `tokenizers` package."""

    name = "bpe"
    FILE = "tokenizer.json"

    def __init__(self, backend):
        self._backend = backend
        self.vocab_size = backend.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        if not 257 <= vocab_size <= 2**32 - 1:
            raise UserError(f"vocab_size={vocab_size}: expected a BPE vocabulary of at least 257 tokens")
        tk = _import_tokenizers()
        backend = tk.Tokenizer(tk.models.BPE())
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def load(cls, directory: Path) -> BPETokenizer:
        tk = _import_tokenizers()
        return cls(tk.Tokenizer.from_file(str(Path(directory) / cls.FILE)))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._backend.encode(text).ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode([int(i) for i in ids])

    def save(self, directory: Path) -> None:
        self._backend.save(str(Path(directory) / self.FILE))


def load_tokenizer(directory: str | Path | None) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a token directory was made with (bytes for None, the embedded corpus)."""
    if directory is None:
        return ByteTokenizer()
    meta_path = Path(directory) / "train.json"
    name = json.loads(meta_path.read_text()).get("tokenizer", "byte") if meta_path.exists() else "byte"
    return BPETokenizer.load(Path(directory)) if name == "bpe" else ByteTokenizer()
