"""Token files and the training/validation token streams of a run.

Format (as nanoGPT's): `NAME.bin` holds the token ids as a headerless little-endian
array (uint16 when the vocabulary fits, else uint32), read with numpy.memmap; the
sidecar `NAME.json` says {"dtype", "vocab_size", "tokens", "tokenizer"}. A token
directory holds `train.bin`/`train.json` and `val.bin`/`val.json` (and
`tokenizer.json` for BPE).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steplaw.errors import UserError

DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_token_file(path: str | Path, ids: np.ndarray, vocab_size: int, tokenizer: str = "byte") -> Path:
    """Write ids to `path` (.bin) and its JSON sidecar; returns the .bin path."""
    path = Path(path).with_suffix(".bin")
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids out of range [0, {vocab_size})")
    dtype = dtype_for_vocab(vocab_size)
    ids.astype(np.dtype(dtype).newbyteorder("<")).tofile(path)
    meta = {"dtype": dtype, "vocab_size": int(vocab_size), "tokens": int(ids.size), "tokenizer": tokenizer}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_token_file(path: str | Path) -> tuple[np.ndarray, dict]:
    """(memmap of the ids, sidecar dict) of a .bin token file."""
    path = Path(path).with_suffix(".bin")
    sidecar = path.with_suffix(".json")
    if not path.exists() or not sidecar.exists():
        raise UserError(f"token file {path}: expected {path.name} and {sidecar.name} (make them with `steplaw data prepare`)")
    try:
        meta = json.loads(sidecar.read_text())
        dtype = np.dtype(DTYPES[meta["dtype"]]).newbyteorder("<")
        count = int(meta["tokens"])
        int(meta["vocab_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"token sidecar {sidecar}: expected JSON with dtype (uint16/uint32), vocab_size and tokens ({exc})") from None
    expected_bytes = count * dtype.itemsize
    if path.stat().st_size != expected_bytes:
        raise UserError(f"token file {path}: has {path.stat().st_size} bytes, expected {expected_bytes} for {count} {meta['dtype']} tokens")
    if count == 0:
        return np.zeros(0, dtype=dtype), meta
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)), meta


@dataclass
class TokenData:
    """The token streams of a run (numpy arrays or memmaps of ids)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    source: str  # "embedded:kjv" or the directory


def load_token_data(data: str | Path | None = None) -> TokenData:
    """Token streams of a token directory, or of the embedded corpus (bytes) for None."""
    if data is None:
        from steplaw.data.corpus import corpus_split

        train, val = corpus_split()
        return TokenData(np.frombuffer(train, dtype=np.uint8), np.frombuffer(val, dtype=np.uint8), 256, "embedded:kjv")
    directory = Path(data)
    if not directory.is_dir():
        raise UserError(f"data directory {str(data)!r} does not exist: expected a directory made by `steplaw data prepare`")
    train, train_meta = read_token_file(directory / "train.bin")
    val, val_meta = read_token_file(directory / "val.bin")
    vocab = max(int(train_meta["vocab_size"]), int(val_meta["vocab_size"]))
    return TokenData(train, val, vocab, str(directory))


def split_blocks(text, val_fraction: float, block: int):
    """(train, val) pieces of a str or bytes: every round(1/val_fraction)-th block of
    `block` characters (from the 10th on) goes to validation. Short texts get smaller
    blocks, so that at least two blocks go to validation."""
    val_every = max(2, round(1 / val_fraction))
    block = max(1, min(block, len(text) // (2 * val_every + 9)))
    train, val = [], []
    for index, start in enumerate(range(0, len(text), block)):
        (val if index % val_every == 9 % val_every else train).append(text[start:start + block])
    return train, val


def prepare(
    text_files: list[str | Path],
    out_dir: str | Path,
    tokenizer: str = "byte",
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    block_chars: int = 8192,
) -> dict:
    """Tokenize text files into a token directory (train.bin, val.bin, sidecars).

    The files are read as UTF-8 and joined with blank lines; validation is every
    round(1/val_fraction)-th block of `block_chars` characters. `vocab_size` applies to
    the BPE only (trained here on the training text). Returns a summary dict.
    """
    if tokenizer not in ("byte", "bpe"):
        raise UserError(f"tokenizer={tokenizer!r}: expected 'byte' or 'bpe'")
    if not 0 < val_fraction < 0.5:
        raise UserError(f"val_fraction={val_fraction}: expected a fraction between 0 and 0.5")
    if not text_files:
        raise UserError("no text files given: expected at least one TEXT_FILE")
    texts = []
    for name in text_files:
        path = Path(name)
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

    from steplaw.data.tokenizers import BPETokenizer, ByteTokenizer

    tok = BPETokenizer.train(train_parts, vocab_size) if tokenizer == "bpe" else ByteTokenizer()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    summary = {"out_dir": str(out), "tokenizer": tok.name, "vocab_size": int(tok.vocab_size)}
    for split, parts in (("train", train_parts), ("val", val_parts)):
        ids = tok.encode("".join(parts))
        write_token_file(out / f"{split}.bin", ids, tok.vocab_size, tok.name)
        summary[f"{split}_tokens"] = int(ids.size)
    return summary
