"""Token files and the training/validation token streams of a run.

Format (as nanoGPT's): `NAME.bin` holds the token ids as a headerless little-endian
array (uint16 when the vocabulary fits, else uint32), read with numpy.memmap; the
sidecar `NAME.json` says {"dtype", "vocab_size", "tokens", "tokenizer"}. A token
directory holds `train.bin`/`train.json` and `val.bin`/`val.json` (and
`tokenizer.json` for BPE).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steplaw.data.corpus import corpus_split, split_blocks
from steplaw.data.tokenizers import DEFAULT_BPE_VOCAB, BPETokenizer, ByteTokenizer, check_bpe_vocab
from steplaw.errors import UserError
from steplaw.fileio import write_atomic

DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_token_file(path: str | Path, ids: np.ndarray, vocab_size: int, tokenizer: str = "byte") -> Path:
    """Write ids to `path` (.bin) and its JSON sidecar; returns the .bin path. Each file is
    written to a temporary name and renamed, so a killed writer leaves no half file."""
    path = Path(path).with_suffix(".bin")
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise UserError(
            f"token ids in [{ids.min()}, {ids.max()}] do not fit the vocabulary of {vocab_size}: expected ids in [0, {vocab_size})"
        )
    dtype = dtype_for_vocab(vocab_size)
    meta = {"dtype": dtype, "vocab_size": int(vocab_size), "tokens": int(ids.size), "tokenizer": tokenizer}
    write_atomic(path, ids.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
    write_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return path


def read_token_file(path: str | Path) -> tuple[np.ndarray, dict]:
    """(memmap of the ids, sidecar dict) of a .bin token file. Refused (UserError): a
    missing file or sidecar, a size that does not match the sidecar, and ids outside
    the sidecar's vocabulary (one pass of numpy over the file, cached per file)."""
    path = Path(path).with_suffix(".bin")
    sidecar = path.with_suffix(".json")
    if path.is_dir() or sidecar.is_dir():
        raise UserError(f"token file {str(path)!r} is a directory: expected {path.name} and {sidecar.name} made by `steplaw data prepare`")
    if not path.exists() or not sidecar.exists():
        raise UserError(f"token file {path}: expected {path.name} and {sidecar.name} (make them with `steplaw data prepare`)")
    try:
        meta = json.loads(sidecar.read_text())
        dtype = np.dtype(DTYPES[meta["dtype"]]).newbyteorder("<")
        count = int(meta["tokens"])
        vocab = int(meta["vocab_size"])
        if count < 0 or vocab < 1:
            raise ValueError(f"tokens={count}, vocab_size={vocab}")
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"token sidecar {sidecar}: expected JSON with dtype (uint16/uint32), vocab_size and tokens ({exc})") from None
    expected_bytes = count * dtype.itemsize
    if path.stat().st_size != expected_bytes:
        raise UserError(f"token file {path}: has {path.stat().st_size} bytes, expected {expected_bytes} for {count} {meta['dtype']} tokens")
    if count == 0:
        return np.zeros(0, dtype=dtype), meta
    ids = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
    if vocab <= np.iinfo(dtype).max:  # else every id the dtype holds is in range
        stat = path.stat()
        largest = _largest_id(str(path.resolve()), stat.st_size, stat.st_mtime_ns, dtype.str)
        if largest >= vocab:
            raise UserError(
                f"token file {path} holds token id {largest}, outside its vocabulary of {vocab} tokens "
                f"({sidecar.name}): expected ids in [0, {vocab}); remake it with `steplaw data prepare`"
            )
    return ids, meta


@functools.lru_cache(maxsize=64)
def _largest_id(path: str, size: int, mtime_ns: int, dtype: str) -> int:
    """The largest id in a token file (keyed by size and mtime: a rewritten file is read again)."""
    ids = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    chunk = 1 << 26
    return max(int(ids[start:start + chunk].max()) for start in range(0, len(ids), chunk))


@dataclass
class TokenData:
    """The token streams of a run (numpy arrays or memmaps of ids)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    source: str  # "embedded:kjv" or the directory

    def check_model_vocab(self, vocab_size: int) -> None:
        """UserError unless a model of `vocab_size` tokens can embed every id of this data:
        the one check of `steplaw train` (before training) and of a sweep (before any run)."""
        if vocab_size < self.vocab_size:
            raise UserError(f"data {self.source!r} holds tokens of a {self.vocab_size}-token vocabulary but the model's "
                            f"vocab_size is {vocab_size}: expected vocab_size >= {self.vocab_size}")


def load_token_data(data: str | Path | None = None) -> TokenData:
    """Token streams of a token directory, or of the embedded corpus (bytes) for None."""
    if data is None:
        train, val = corpus_split()
        return TokenData(np.frombuffer(train, dtype=np.uint8), np.frombuffer(val, dtype=np.uint8), 256, "embedded:kjv")
    directory = Path(data)
    if directory.is_file():
        raise UserError(
            f"data {str(data)!r} is a file: expected the directory `steplaw data prepare` made (holding train.bin and val.bin)"
        )
    if not directory.is_dir():
        raise UserError(f"data directory {str(data)!r} does not exist: expected a directory made by `steplaw data prepare`")
    train, train_meta = read_token_file(directory / "train.bin")
    val, val_meta = read_token_file(directory / "val.bin")
    vocab = max(int(train_meta["vocab_size"]), int(val_meta["vocab_size"]))
    return TokenData(train, val, vocab, str(directory))


def prepare(
    text_files: list[str | Path],
    out_dir: str | Path,
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    val_fraction: float = 0.05,
    block_chars: int = 8192,
) -> dict:
    """Tokenize text files into a token directory (train.bin, val.bin, sidecars).

    The files are read as UTF-8 and joined with blank lines; validation is every
    round(1/val_fraction)-th block of `block_chars` characters. `vocab_size` applies to
    the BPE only (trained here on the training text; default DEFAULT_BPE_VOCAB), and is
    refused with the byte tokenizer rather than ignored. Returns a summary dict.
    """
    if tokenizer not in ("byte", "bpe"):
        raise UserError(f"tokenizer={tokenizer!r}: expected 'byte' or 'bpe'")
    if tokenizer == "byte" and vocab_size is not None:
        raise UserError(f"vocab_size={vocab_size!r} applies to the BPE tokenizer only: "
                        "expected none with tokenizer 'byte', whose vocabulary is the 256 byte values")
    if tokenizer == "bpe":
        vocab_size = DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
        check_bpe_vocab(vocab_size)
    if not 0 < val_fraction < 0.5:
        raise UserError(f"val_fraction={val_fraction}: expected a fraction between 0 and 0.5")
    if not text_files:
        raise UserError("no text files given: expected at least one TEXT_FILE")
    texts = []
    for name in text_files:
        path = Path(name)
        if path.is_dir():
            raise UserError(f"text file {str(name)!r} is a directory: expected a UTF-8 text file")
        if not path.is_file():
            raise UserError(f"text file {str(name)!r} does not exist")
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise UserError(f"text file {str(name)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    text = "\n\n".join(texts)
    train_parts, val_parts = split_blocks(text, val_fraction, block_chars)
    if not train_parts or not val_parts:
        raise UserError(f"the text has {len(text)} characters: too little to split off validation blocks of {block_chars} characters")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {str(out)!r} is a file: expected a directory (or a new name)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output directory {str(out)!r} cannot be made: {exc.strerror or exc}") from None
    tok = BPETokenizer.train(train_parts, vocab_size) if tokenizer == "bpe" else ByteTokenizer()
    tok.save(out)
    summary = {"out_dir": str(out), "tokenizer": tok.name, "vocab_size": int(tok.vocab_size)}
    for split, parts in (("train", train_parts), ("val", val_parts)):
        ids = tok.encode("".join(parts))
        write_token_file(out / f"{split}.bin", ids, tok.vocab_size, tok.name)
        summary[f"{split}_tokens"] = int(ids.size)
    return summary
