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
from steplaw.fileio import write_atomic

DEFAULT_BPE_VOCAB = 8192
# The largest BPE vocabulary: 4x the largest in use (~2^18, e.g. Gemma's 256k), so no
# real need is refused. The token files would hold up to 2^32 ids (uint32), but the
# `tokenizers` trainer allocates tables sized by vocab_size up front: 10^9 aborts the
# process with a Rust out-of-memory backtrace (exit 134), while 2^20 trained in 45 MB
# (peak RSS, 2^24: 70 MB), and every id then fits a model's embedding table easily.
MAX_BPE_VOCAB = 2**20


def check_bpe_vocab(vocab_size) -> None:
    """UserError unless `vocab_size` is a whole number in [257, MAX_BPE_VOCAB]."""
    wrong = isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
    if wrong or not 257 <= vocab_size <= MAX_BPE_VOCAB:
        raise UserError(f"vocab_size={vocab_size!r}: expected a BPE vocabulary of at least 257 tokens (the 256 bytes "
                        f"and one merge) and at most 2^20 = {MAX_BPE_VOCAB:,}")


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
        check_bpe_vocab(vocab_size)
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
        # Atomic (steplaw.fileio): a crash while saving leaves no half tokenizer.json.
        write_atomic(Path(directory) / self.FILE, self._backend.to_str())


def load_tokenizer(directory: str | Path | None) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a token directory was made with (bytes for None, the embedded corpus)."""
    if directory is None:
        return ByteTokenizer()
    meta_path = Path(directory) / "train.json"
    name = json.loads(meta_path.read_text()).get("tokenizer", "byte") if meta_path.exists() else "byte"
    return BPETokenizer.load(Path(directory)) if name == "bpe" else ByteTokenizer()
